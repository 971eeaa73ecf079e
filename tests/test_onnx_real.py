"""The ONNX export of the published weights: every loader's vectors against our fp32 Encoder and sentence-transformers
on texts up to 384 word pieces (and past it), and the int8 graph's quality on a bounded sample."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from test_onnx import ort_and_tokenizers, peer_vectors

pytestmark = [pytest.mark.real_weights]
pytest.importorskip("onnxruntime")

WORDS = ("the committee reviewed evidence that protein folding rates depend on temperature and solvent viscosity "
         "while several independent laboratories reported consistent measurements across species").split()


def passage(words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=words)) + "."


# short texts, texts past 128 word pieces (what the published tokenizer.json kept), ~384, and longer (truncated)
TEXTS = ["This is an example sentence", "A man is playing a guitar.", "", "hello <pad> world",
         passage(150, 1), passage(250, 2), passage(310, 3), passage(345, 4), passage(600, 5)]


@pytest.fixture(scope="module")
def real_export(real_model_dir, tmp_path_factory) -> Path:
    from allmpnet import Encoder
    from allmpnet.export.int8 import export_int8
    from allmpnet.export.onnx import export_onnx
    folder = tmp_path_factory.mktemp("onnx-real") / "export"
    enc = Encoder(real_model_dir, device="cpu", precision="fp32")
    export_int8(enc, export_onnx(enc, folder))
    return folder


@pytest.fixture(scope="module")
def fp32_vectors(real_model_dir) -> np.ndarray:
    from allmpnet import Encoder
    enc = Encoder(real_model_dir, device="cpu", precision="fp32")
    lengths = [len(ids) for ids in enc.tokenize(TEXTS).ids]
    assert max(lengths) == 384 and sum(128 < n < 384 for n in lengths) >= 3  # the lengths this test is about
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one truncated text
        return enc.encode(TEXTS, show_progress_bar=False)


def test_onnx_runtime_and_onnx_encoder_match_fp32_up_to_384_tokens(real_model_dir, real_export, fp32_vectors):
    from allmpnet.export.onnx import OnnxEncoder
    from special_texts import sentence_transformers_vectors
    pooled, mean_pooled = ort_and_tokenizers(real_export, TEXTS)
    np.testing.assert_allclose(pooled, fp32_vectors, atol=1e-5)
    np.testing.assert_allclose(mean_pooled, fp32_vectors, atol=1e-5)
    np.testing.assert_allclose(OnnxEncoder(real_export).encode(TEXTS), fp32_vectors, atol=1e-5)
    np.testing.assert_allclose(pooled, sentence_transformers_vectors(real_model_dir, TEXTS), atol=1e-5)


def test_sentence_transformers_onnx_backend_and_fastembed_match_fp32(real_export, fp32_vectors, tmp_path):
    peers = peer_vectors(real_export, TEXTS, tmp_path)
    assert int(peers["st_max_seq_length"]) == 384
    np.testing.assert_allclose(peers["st"], fp32_vectors, atol=1e-5)
    np.testing.assert_allclose(peers["fastembed"], fp32_vectors, atol=1e-5)


# the STSBenchmark sentences where earlier int8 graphs fell below 0.99 (one scale per weight row under alpha 0.8
# smoothing: 0.9893 on the first; <s> and </s> alone given the residual pass: 0.9873 on the second)
INT8_HARD = ["Afghan police kill 5 Taliban fighters",
             "According to SunnComm's Peter Jacobs, \"MediaMax performs exactly as 'advertised' to the companies who "
             "purchased it.", "To give this an answer:", "It depends on what you want to be able to do.",
             "The best thing you can do is to know your stuff.", "What the Papers Say, Aug. 19, 2013"]


def test_the_int8_graph_keeps_min_cosine_099(real_export, shared_data):
    from allmpnet.export.onnx import OnnxEncoder, compare
    lines = (shared_data / "STSBenchmark" / "sts.tsv").read_text(encoding="utf-8").splitlines()[1:201]
    sentences = [part for line in lines for part in line.split("\t")[:2]]  # 400 sentences
    texts = INT8_HARD + sentences + TEXTS
    fp32 = OnnxEncoder(real_export).encode(texts)
    int8 = OnnxEncoder(real_export / "onnx" / "model_int8.onnx").encode(texts)
    assert compare(int8, fp32).min_cosine >= 0.99


class _Quiet:
    """evaluate_sts's encoder interface over an OnnxEncoder (which has no progress bar to switch off)."""

    def __init__(self, encoder):
        self.encoder = encoder

    def encode(self, texts, batch_size=32, show_progress_bar=False):
        return self.encoder.encode(texts, batch_size=batch_size)


def test_the_int8_graph_keeps_stsbenchmark_within_01_of_fp32(real_export, shared_data):
    """The whole STSBenchmark test split (1,379 pairs) through both graphs: the fp32 graph gives the card's 83.42,
    and the int8 graph's cosine Spearman is within 0.1 of it."""
    from allmpnet.evaluate.sts import evaluate_sts
    from allmpnet.export.onnx import OnnxEncoder
    rows = [line.split("\t") for line in
            (shared_data / "STSBenchmark" / "sts.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    first, second, gold = [r[0] for r in rows], [r[1] for r in rows], [float(r[2]) for r in rows]
    assert len(gold) == 1379
    scores = {name: evaluate_sts(_Quiet(OnnxEncoder(real_export / "onnx" / name)), first, second,
                                 gold)["cos_sim_spearman"] for name in ("model.onnx", "model_int8.onnx")}
    assert abs(scores["model.onnx"] - 83.42) < 0.01, scores
    assert abs(scores["model_int8.onnx"] - scores["model.onnx"]) <= 0.1, scores
