"""ONNX export of the sentence model: the graph's vectors against PyTorch fp32, and the export command."""
from __future__ import annotations

import numpy as np
import pytest

from allmpnet import Encoder

TEXTS = ["hello world", "the cat is on the moon", "", "   ", "a dog and a car", "x" * 40,
         "this is a test sentence with more words than the others in the list", "sun", "plant search query"]


def test_onnx_export_matches_pytorch(tiny_model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from allmpnet.export.onnx import OnnxEncoder, check_parity, export_onnx
    enc = Encoder(tiny_model_dir, device="cpu")
    graph = export_onnx(enc, tmp_path / "onnx")
    assert (tmp_path / "onnx" / "tokenizer.json").is_file()
    parity = check_parity(enc, graph, TEXTS)  # lengths other than the traced example's: dynamic axes hold
    assert parity.max_abs_diff < 1e-5 and parity.min_cosine > 0.99999
    got = OnnxEncoder(graph, enc.tokenizer, max_batch_tokens=16).encode(TEXTS, batch_size=2)
    np.testing.assert_allclose(got, enc.encode(TEXTS), atol=1e-5)
    assert OnnxEncoder(graph, enc.tokenizer).encode([]).shape == (0, enc.dim)


def test_onnx_export_gives_texts_holding_special_tokens_the_reference_vectors(tiny_model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from allmpnet.export.onnx import OnnxEncoder, export_onnx
    from special_texts import SPECIAL_TEXTS, sentence_transformers_vectors
    enc = Encoder(tiny_model_dir, device="cpu")
    graph = export_onnx(enc, tmp_path / "onnx")  # traced on texts without a pad id: the graph must still skip it
    got = OnnxEncoder(graph, enc.tokenizer).encode(SPECIAL_TEXTS, batch_size=4)
    np.testing.assert_allclose(got, sentence_transformers_vectors(tiny_model_dir), atol=1e-5)


def test_parity_check_runs_fp32_whatever_the_encoders_precision(tiny_model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from allmpnet.export.onnx import check_parity, export_onnx
    enc = Encoder(tiny_model_dir, device="cpu", precision="bf16")
    parity = check_parity(enc, export_onnx(enc, tmp_path / "onnx"), TEXTS)
    assert parity.max_abs_diff < 1e-5
    assert enc.precision == "bf16"  # and the encoder it was given is left as it was


def test_export_onnx_cli(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from allmpnet.cli import main
    assert main(["export", "onnx", str(tmp_path / "out"), "--model", str(tiny_model_dir), "--int8"]) == 0
    printed = capsys.readouterr().out
    assert "model.onnx" in printed and "model.int8.onnx" in printed and "max |diff|" in printed
    assert (tmp_path / "out" / "model.int8.onnx").stat().st_size < (tmp_path / "out" / "model.onnx").stat().st_size
