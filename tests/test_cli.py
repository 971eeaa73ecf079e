"""The `allmpnet` command on the tiny model: encode files, bad rows, similarity, info, demo."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from allmpnet import Encoder
from allmpnet.cli import main


def run(*args: str) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def enc(tiny_model_dir):
    return Encoder(tiny_model_dir, device="cpu")


def test_encode_text_file_keeps_empty_lines(tiny_model_dir, enc, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("a cat\n\nthe dog\r\n  \n")
    assert run("encode", src, "-o", tmp_path / "out.npy", "--model", tiny_model_dir) == 0
    out = np.load(tmp_path / "out.npy")
    np.testing.assert_allclose(out, enc.encode(["a cat", "", "the dog", "  "]), atol=1e-6)


def test_encode_jsonl_reports_bad_rows_by_line(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "a cat"}\n{"text": 5}\nnot json\n{"body": "x"}\n{"text": "ok \xff"}\n{"text": "dog"}\n')
    assert run("encode", src, "-o", tmp_path / "out.npy", "--model", tiny_model_dir) == 2
    err = capsys.readouterr().err
    assert "4 bad row(s)" in err and "line 2" in err and "line 3: not JSON" in err and "line 5: not valid UTF-8" in err
    assert not (tmp_path / "out.npy").exists()
    assert run("encode", src, "-o", tmp_path / "out.npy", "--model", tiny_model_dir, "--skip-bad") == 0
    assert np.load(tmp_path / "out.npy").shape[0] == 2
    assert np.load(tmp_path / "out.lines.npy").tolist() == [1, 6]
    assert "skipped 4 bad row(s)" in capsys.readouterr().out


def test_encode_csv_column(tiny_model_dir, enc, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text('id,body\n1,"a cat, and a dog"\n2,the sun\n')
    assert run("encode", src, "-o", tmp_path / "out.npy", "--field", "body", "--model", tiny_model_dir) == 0
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), enc.encode(["a cat, and a dog", "the sun"]), atol=1e-6)
    assert run("encode", src, "-o", tmp_path / "o2.npy", "--field", "text", "--model", tiny_model_dir) == 2


def test_similarity_and_info(tiny_model_dir, enc, capsys):
    assert run("similarity", "a cat", "the dog", "--model", tiny_model_dir) == 0
    a, b = enc.encode(["a cat", "the dog"])
    assert capsys.readouterr().out.strip() == f"{float(a @ b):.4f}"
    assert run("info", "--model", tiny_model_dir) == 0
    out = capsys.readouterr().out
    assert "dimensions" in out and " 32" in out and "max_seq_length" in out and "fp32" in out


def test_info_reports_autos_guard(tiny_model_dir, capsys, tmp_path, monkeypatch):
    from allmpnet.encode.precision import plan_precision
    plan = plan_precision("auto", "cpu")
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path))  # calibrate afresh
    assert run("info", "--model", tiny_model_dir, "--precision", "auto") == 0
    out = capsys.readouterr().out
    assert plan.name in out
    if plan.guard_fallback is not None:  # our x86 int8 here: the guard ran and its figure is printed
        assert "quality guard passed: min cosine" in out


def test_demo_prints_ranked_hits(tiny_model_dir, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat\nthe dog\nthe sun\n")
    assert run("demo", "--corpus", corpus, "-q", "a cat", "-k", "2", "--model", tiny_model_dir) == 0
    out = capsys.readouterr().out
    assert "query: a cat" in out and "  1. " in out and "  2. " in out and "  3. " not in out


def test_missing_input_file_is_one_clear_error(tiny_model_dir, tmp_path, capsys):
    assert run("encode", tmp_path / "nope.txt", "-o", tmp_path / "o.npy", "--model", tiny_model_dir) == 2
    assert "no such file" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "allmpnet", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "download" in out.stdout and "encode" in out.stdout
