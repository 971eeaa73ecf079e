"""Quantized embeddings: equal to sentence-transformers' quantize_embeddings on the same vectors and ranges, the
encodings checked by hand on small cases, and the same output from encode(), the CLI and the server."""
from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from allmpnet import Encoder, Quantizer, calibration_ranges, quantize_embeddings
from allmpnet.cli import main
from allmpnet.serve import ServeConfig, create_app
from allmpnet.serve.background import BackgroundServer

TEXTS = ["the cat sat on the mat", "a dog in the car", "the sun and the moon", "hello world",
         "search query text", "this is an example sentence"]


def sentence_like(n: int, dim: int = 768, seed: int = 0) -> np.ndarray:
    """Unit vectors with per-dimension offsets and spreads, like sentence embeddings (not centred noise)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.02, 0.04, size=(n, dim)) * rng.uniform(0.5, 2.0, size=dim) + rng.normal(0, 0.01, size=dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model_dir):
    return Encoder(tiny_model_dir, device="cpu")


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_equal_to_sentence_transformers(precision):
    from sentence_transformers.quantization import quantize_embeddings as st_quantize

    vectors = sentence_like(300)
    calibration = sentence_like(2000, seed=1)
    queries = sentence_like(7, seed=2)
    queries[0, :5] = [10.0, -10.0, 0.0, -0.0, 1e-9]  # outside the ranges, and on the sign edge
    for embeddings in (vectors, queries):
        # ranges given, ranges from calibration embeddings, ranges from the embeddings themselves
        ours = quantize_embeddings(embeddings, precision, calibration_ranges(calibration))
        theirs = st_quantize(embeddings, precision, calibration_embeddings=calibration)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)
        ranges = np.vstack([calibration.min(0) - 0.01, calibration.max(0) + 0.02])
        np.testing.assert_array_equal(quantize_embeddings(embeddings, precision, ranges),
                                      st_quantize(embeddings, precision, ranges=ranges))
        np.testing.assert_array_equal(quantize_embeddings(embeddings, precision),
                                      st_quantize(embeddings, precision))
        np.testing.assert_array_equal(Quantizer.calibrate(precision, calibration)(embeddings), ours)


def test_encodings_by_hand():
    ranges = np.array([[0.0, -1.0, 5.0], [2.55, 1.0, 5.0]], dtype=np.float32)  # third dimension: empty range
    x = np.array([[0.0, -1.0, 5.0], [3.0, 1.5, 7.0], [1.015, 0.0, 4.0], [-3.0, 3.0, 5.5]], dtype=np.float32)
    # steps 0.01, 2/255 and (empty range) 1: floor((x - low) / step), clipped to 0..255 (values kept off the
    # bucket edges, where float32 rounding could go either way)
    expected_uint8 = np.array([[0, 0, 0], [255, 255, 2], [101, 127, 0], [0, 255, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(quantize_embeddings(x, "uint8", ranges), expected_uint8)
    np.testing.assert_array_equal(quantize_embeddings(x, "int8", ranges), expected_uint8.astype(np.int16) - 128)
    bits = np.array([[0.3, -0.1, 0.0, 2.0, -5.0, 0.1, 0.1, -0.2, 0.5, -0.5]], dtype=np.float32)
    # > 0 -> 1, first dimension in the highest bit: 1001 0110 | 10 (padded with zeros)
    np.testing.assert_array_equal(quantize_embeddings(bits, "ubinary"), [[0b10010110, 0b10000000]])
    np.testing.assert_array_equal(quantize_embeddings(bits, "binary"), [[0b10010110 - 128, 0b10000000 - 128]])
    assert quantize_embeddings(bits[0], "ubinary").shape == (2,)  # one vector in, one vector out


def test_bad_inputs_are_refused():
    x = sentence_like(4, dim=8)
    with pytest.raises(ValueError, match="quantization must be one of"):
        quantize_embeddings(x, "int4")
    with pytest.raises(ValueError, match="needs calibration ranges"):
        quantize_embeddings(x[0], "int8")
    with pytest.raises(ValueError, match="shape"):
        quantize_embeddings(x, "uint8", np.zeros((2, 7), np.float32))
    with pytest.raises(ValueError, match="below its minimum"):
        quantize_embeddings(x, "uint8", np.vstack([np.ones(8), np.zeros(8)]).astype(np.float32))
    with pytest.raises(TypeError, match="float"):
        quantize_embeddings(x.astype(np.int8), "ubinary")
    with pytest.raises(ValueError, match="at least 2"):
        Quantizer.calibrate("int8", x[:1])
    with pytest.raises(ValueError, match="8-d"):
        Quantizer.calibrate("int8", x)(sentence_like(2, dim=16))


def test_encode_returns_quantized_vectors(tiny_encoder):
    floats = tiny_encoder.encode(TEXTS)
    np.testing.assert_array_equal(tiny_encoder.encode(TEXTS, quantize="ubinary"), np.packbits(floats > 0, axis=1))
    low, high = floats.min(0), floats.max(0)
    by_hand = np.clip(np.floor((floats - low) / ((high - low) / 255)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(tiny_encoder.encode(TEXTS, quantize="uint8"), by_hand)
    # a calibrated quantizer cuts a lone text into the same buckets as the whole collection
    quantizer = Quantizer.calibrate("int8", floats)
    one = tiny_encoder.encode(TEXTS[2], quantize=quantizer, convert_to="torch")
    alone = tiny_encoder.encode(TEXTS[2])  # (may differ from its batch's vector in the last bit)
    expected = np.clip(np.floor((alone - low) / ((high - low) / 255)), 0, 255) - 128
    np.testing.assert_array_equal(one.numpy(), expected.astype(np.int8))
    with pytest.raises(ValueError, match="calibration"):
        tiny_encoder.encode(TEXTS[0], quantize="int8")


def test_cli_writes_quantized_arrays_and_reuses_ranges(tmp_path, tiny_model_dir, tiny_encoder):
    (tmp_path / "a.txt").write_text("\n".join(TEXTS) + "\n")
    (tmp_path / "b.txt").write_text(TEXTS[1] + "\n")
    model = ["--model", str(tiny_model_dir)]
    assert main(["encode", str(tmp_path / "a.txt"), "-o", str(tmp_path / "a.npy"), "--quantize", "int8"] + model) == 0
    floats = tiny_encoder.encode(TEXTS)
    ranges = np.load(tmp_path / "a.ranges.npy")
    np.testing.assert_array_equal(ranges, np.vstack([floats.min(0), floats.max(0)]))
    expected = quantize_embeddings(floats, "int8", ranges)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), expected)
    # a second file, alone, quantized with the first one's ranges
    assert main(["encode", str(tmp_path / "b.txt"), "-o", str(tmp_path / "b.npy"), "--quantize", "int8",
                 "--calibration", str(tmp_path / "a.ranges.npy")] + model) == 0
    alone = tiny_encoder.encode(TEXTS[1:2])  # (a batch of one may differ from the batch above in the last bit)
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), quantize_embeddings(alone, "int8", ranges))
    assert main(["encode", str(tmp_path / "b.txt"), "-o", str(tmp_path / "c.npy"), "--quantize", "ubinary"]
                + model) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), np.packbits(alone > 0, axis=1))
    assert main(["encode", str(tmp_path / "b.txt"), "-o", str(tmp_path / "d.npy"), "--quantize", "int8"]
                + model) == 2  # one text: no ranges to take from it


def test_server_embedding_types(tmp_path, tiny_encoder):
    floats = tiny_encoder.encode(TEXTS)
    calibration = tmp_path / "ranges.npy"
    np.save(calibration, calibration_ranges(floats))
    with BackgroundServer(create_app(tiny_encoder, ServeConfig(calibration=str(calibration)))) as url:
        for kind in ("int8", "uint8", "binary", "ubinary"):
            expected = quantize_embeddings(floats, kind, calibration_ranges(floats))
            r = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS, "embedding_type": kind})
            assert r.status_code == 200, r.text
            assert r.json()["embedding_type"] == kind
            np.testing.assert_array_equal([d["embedding"] for d in r.json()["data"]], expected)
            r = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS[3], "embedding_type": kind,
                                                         "encoding_format": "base64"})
            raw = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype=expected.dtype)
            np.testing.assert_array_equal(raw, expected[3])  # one input: the server's ranges, not its own
        r = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS, "embedding_type": "int4"})
        assert r.status_code == 422
        r = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS})
        assert "embedding_type" not in r.json()
        np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], floats, atol=1e-6)
    with BackgroundServer(create_app(tiny_encoder, ServeConfig())) as url:  # no calibration
        r = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS[0], "embedding_type": "uint8"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "calibration_required"
        r = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS, "embedding_type": "uint8"})
        np.testing.assert_array_equal([d["embedding"] for d in r.json()["data"]],
                                      quantize_embeddings(floats, "uint8"))
