"""The Encoder front door on a tiny random model: order, shapes, types, truncation, pooling, save/load."""
from __future__ import annotations

import gc
import json
import os
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from allmpnet import Encoder, TruncationWarning
from allmpnet.model import PackedBatch, Pooling


@pytest.fixture(scope="module")
def enc(tiny_model_dir):
    return Encoder(tiny_model_dir, device="cpu")


TEXTS = ["a cat", "the dog is on the car and the sun is on the moon", "", "   ", "hello world", "x" * 30,
         "ümlaut façade", "12 34 56"]


def test_order_is_restored_whatever_the_batching(enc):
    batched = enc.encode(TEXTS, batch_size=3)
    one_by_one = np.stack([enc.encode(t) for t in TEXTS])
    assert batched.shape == (len(TEXTS), enc.dim)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-6)
    # reversing the input reverses the output rows
    np.testing.assert_allclose(enc.encode(TEXTS[::-1], batch_size=3), batched[::-1], atol=1e-6)


def test_shapes_types_and_normalisation(enc):
    single = enc.encode("hello world")
    assert single.shape == (enc.dim,) and single.dtype == np.float32
    assert enc.encode([]).shape == (0, enc.dim)
    t = enc.encode(["a", "b"], convert_to="torch")
    assert isinstance(t, torch.Tensor) and t.shape == (2, enc.dim)
    np.testing.assert_allclose(np.linalg.norm(enc.encode(TEXTS), axis=1), 1.0, atol=1e-6)
    raw = enc.encode(TEXTS, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), enc.encode(TEXTS), atol=1e-6)
    assert enc.normalize is True  # the override did not stick


def test_empty_and_whitespace_texts_are_embedded_not_dropped(enc):
    out = enc.encode(["", " ", "\t\n"])
    assert out.shape == (3, enc.dim)
    assert np.all(np.isfinite(out))
    # all three normalise to "<s></s>": same vector
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)


@pytest.mark.parametrize("bad, index, kind", [(["a", None], 1, "NoneType"), ([3, "a"], 0, "int"),
                                              (["a", "b", b"c"], 2, "bytes")])
def test_non_strings_raise_type_error_naming_the_index(enc, bad, index, kind):
    with pytest.raises(TypeError, match=rf"texts\[{index}\] is {kind}"):
        enc.encode(bad)


def test_none_as_input_raises_type_error(enc):
    with pytest.raises(TypeError):
        enc.encode(None)


def test_truncation_is_reported_and_warned(enc):
    long = " ".join(["cat"] * (enc.max_seq_length + 10))
    texts = ["short", long, "also short", long]
    assert enc.truncated_indices(texts) == [1, 3]
    with pytest.warns(TruncationWarning, match="2 of 4 texts"):
        enc.encode(texts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode(["short"])  # nothing to warn about


def test_max_seq_length_comes_from_the_directory_and_can_be_changed(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu")
    assert enc.max_seq_length == json.loads((tiny_model_dir / "sentence_bert_config.json").read_text())[
        "max_seq_length"]
    text = " ".join(["dog"] * 20)
    assert len(enc.tokenize([text]).ids[0]) == 22
    enc.max_seq_length = 8
    ids = enc.tokenize([text]).ids[0]
    assert len(ids) == 8 and ids[0] == 0 and ids[-1] == 2  # truncation keeps <s> … </s>
    assert enc.truncated_indices([text, "dog"]) == [0]


def test_baked_in_tokenizer_padding_and_truncation_do_not_leak(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok["truncation"] = {"direction": "Right", "max_length": 5, "strategy": "LongestFirst", "stride": 0}
    tok["padding"] = {"strategy": {"Fixed": 40}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 1,
                      "pad_type_id": 0, "pad_token": "<pad>"}
    (model_dir / "tokenizer.json").write_text(json.dumps(tok))
    enc = Encoder(model_dir, device="cpu")
    ids = enc.tokenize(["the cat is on the car and the dog"]).ids[0]
    assert len(ids) == 11  # 9 words + <s> + </s>: neither cut at 5 nor padded to 40


def test_pooling_modes_by_hand():
    batch = PackedBatch.from_ids([[7, 8, 9, 10, 11]], bucket_rows=True)  # 5 real tokens, then filler rows up to 8
    assert batch.ids.shape == (8,)
    tokens = torch.full((8, 2), 100.0)  # (N', C): the filler rows must not count
    tokens[:5] = torch.tensor([[1.0, 2.0], [3.0, 6.0], [2.0, 4.0], [2.0, 4.0], [2.0, 4.0]])

    def pool(**modes):
        return Pooling(**{"word_embedding_dimension": 2, "pooling_mode_mean_tokens": False, **modes})(tokens, batch)

    assert pool(pooling_mode_cls_token=True).tolist() == [[1.0, 2.0]]
    assert pool(pooling_mode_mean_tokens=True).tolist() == [[2.0, 4.0]]
    assert pool(pooling_mode_max_tokens=True).tolist() == [[3.0, 6.0]]
    sqrt5 = 5 ** 0.5
    assert torch.allclose(pool(pooling_mode_mean_sqrt_len_tokens=True), torch.tensor([[10 / sqrt5, 20 / sqrt5]]))
    both = pool(pooling_mode_cls_token=True, pooling_mode_mean_tokens=True)
    assert both.tolist() == [[1.0, 2.0, 2.0, 4.0]]
    with pytest.raises(ValueError, match="no mode"):
        Pooling(pooling_mode_mean_tokens=False)


def test_directory_without_normalize_or_modules_json(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "modules.json").unlink()
    shutil.rmtree(model_dir / "1_Pooling")
    enc = Encoder(model_dir, device="cpu")
    assert enc.normalize is False and enc.pooling.modes == ["mean_tokens"]
    reference = Encoder(tiny_model_dir, device="cpu").encode(TEXTS, normalize=False)
    np.testing.assert_allclose(enc.encode(TEXTS), reference, atol=1e-6)


def test_cls_pooling_from_the_directory(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "cls"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    enc = Encoder(model_dir, device="cpu")
    ids, mask = enc.tokenizer.pad(enc.tokenize(["hello world"]).ids)
    with torch.inference_mode():
        cls = enc.model.network.token_embeddings(ids, mask)[0, 0]
    np.testing.assert_allclose(enc.encode("hello world"), (cls / cls.norm()).numpy(), atol=1e-6)


def test_save_then_load_gives_the_same_vectors(enc, tmp_path):
    enc.save(tmp_path / "saved")
    for name in ["modules.json", "sentence_bert_config.json", "1_Pooling/config.json", "config.json",
                 "model.safetensors", "tokenizer.json"]:
        assert (tmp_path / "saved" / name).is_file(), name
    again = Encoder(tmp_path / "saved", device="cpu")
    np.testing.assert_array_equal(again.encode(TEXTS), enc.encode(TEXTS))


def test_saved_directory_loads_in_sentence_transformers(enc, tmp_path):
    from sentence_transformers import SentenceTransformer
    enc.save(tmp_path / "for-st")
    st = SentenceTransformer(str(tmp_path / "for-st"), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS), enc.encode(TEXTS), atol=1e-6)
    # and one sentence-transformers saves loads in ours
    st.save(str(tmp_path / "from-st"))
    np.testing.assert_allclose(Encoder(tmp_path / "from-st", device="cpu").encode(TEXTS), enc.encode(TEXTS),
                               atol=1e-6)


def resident_mb() -> float:
    """This process's resident memory: what torch's CPU allocations (invisible to tracemalloc) really cost."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads RSS from /proc (Linux)")
def test_memory_stays_flat_over_repeated_calls(enc):
    texts = [f"the cat {i} is on the car " * (1 + i % 4) for i in range(400)]
    for _ in range(2):  # first calls build the inference copy and settle the allocator's pools
        enc.encode(texts)
    gc.collect()
    first = resident_mb()
    for _ in range(10):
        enc.encode(texts)
    gc.collect()
    grown = resident_mb() - first
    assert grown < 16, f"resident memory grew by {grown:.1f} MB over 10 calls"


def test_bad_arguments(enc):
    with pytest.raises(ValueError, match="convert_to"):
        enc.encode(["a"], convert_to="list")
    with pytest.raises(ValueError, match="batch_size"):
        enc.encode(["a"], batch_size=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_encoder_serves_eight_threads_with_mixed_options(tiny_model_dir, precision):
    texts = [f"the cat {i} " + "is on the car " * (i % 9) for i in range(60)] + ["", "sun"]
    reference = Encoder(tiny_model_dir, device="cpu", precision=precision)
    expected = {flag: reference.encode(texts, normalize=flag) for flag in (True, False)}
    assert np.abs(expected[True] - expected[False]).max() > 0.1  # the option really changes the vectors
    shared = Encoder(tiny_model_dir, device="cpu", precision=precision)  # its inference copy not built yet
    start, failures = threading.Barrier(8), []

    def work(thread: int) -> None:
        start.wait()  # all at once, racing to build the inference copy too
        for call in range(3):
            normalize = (thread + call) % 2 == 0
            convert_to = "torch" if (thread + call) % 3 == 0 else "numpy"
            got = shared.encode(texts, normalize=normalize, convert_to=convert_to)
            got = got.numpy() if convert_to == "torch" else got
            error = float(np.abs(got - expected[normalize]).max())
            if error > 1e-6:
                failures.append((thread, call, normalize, convert_to, error))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
