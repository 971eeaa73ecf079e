"""Every user-facing CLI error is one line naming the file and what is wrong, with exit code 2; damaged model
files raise one ModelFileError naming the file; `encode` writes exactly the path it prints."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from allmpnet import Encoder, ModelFileError
from allmpnet.cli import main


def run(*args) -> int:
    return main([str(a) for a in args])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


def test_encode_writes_exactly_the_path_it_prints(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "t.txt"
    src.write_text("a cat\nthe dog\n")
    out = tmp_path / "out.bin"
    assert run("encode", src, "-o", out, "--model", tiny_model_dir) == 0
    assert f"to {out}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "t.txt"]  # no out.bin.npy, no leftovers
    assert np.load(out).shape == (2, 32)


def test_encode_to_a_directory_is_refused_before_encoding(tiny_model_dir, tmp_path, capsys, monkeypatch):
    src = tmp_path / "t.txt"
    src.write_text("a cat\n")
    target = tmp_path / "vectors"
    target.mkdir()
    monkeypatch.setattr("allmpnet.cli.core.load_encoder", lambda args: pytest.fail("the model was loaded"))
    assert run("encode", src, "-o", target, "--model", tiny_model_dir) == 2
    line = one_error_line(capsys)
    assert str(target) in line and "is a directory" in line
    assert list(target.iterdir()) == [] and not (tmp_path / "vectors.npy").exists()


def test_unwritable_output_is_found_before_encoding(tiny_model_dir, tmp_path, capsys, monkeypatch):
    src = tmp_path / "t.txt"
    src.write_text("a cat\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setattr("allmpnet.cli.core.load_encoder", lambda args: pytest.fail("the model was loaded"))
    assert run("encode", src, "-o", blocker / "out.npy", "--model", tiny_model_dir) == 2  # its folder is a file
    assert str(blocker / "out.npy") in one_error_line(capsys)


def test_failed_encode_leaves_the_previous_output_whole(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "t.jsonl"
    src.write_text('{"text": "a"}\nnot json\n')
    out = tmp_path / "out.npy"
    np.save(out, np.ones(3))
    assert run("encode", src, "-o", out, "--model", tiny_model_dir) == 2
    assert np.load(out).tolist() == [1, 1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npy", "t.jsonl"]


@pytest.mark.parametrize("make, says", [
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: p.write_text(""), "the file is empty"),
    (lambda p: None, "no such file"),
])
def test_bad_inputs_are_one_line(tiny_model_dir, tmp_path, capsys, make, says):
    src = tmp_path / "input.txt"
    make(src)
    assert run("encode", src, "-o", tmp_path / "o.npy", "--model", tiny_model_dir) == 2
    line = one_error_line(capsys)
    assert str(src) in line and says in line
    assert not (tmp_path / "o.npy").exists()


def test_jsonl_and_csv_with_a_byte_order_mark(tiny_model_dir, tmp_path):
    enc = Encoder(tiny_model_dir, device="cpu")
    jsonl, csv = tmp_path / "bom.jsonl", tmp_path / "bom.csv"
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "a cat"}\n{"text": "the dog"}\n')
    csv.write_bytes(b"\xef\xbb\xbftext,id\na cat,1\n")
    assert run("encode", jsonl, "-o", tmp_path / "j.npy", "--model", tiny_model_dir) == 0
    np.testing.assert_allclose(np.load(tmp_path / "j.npy"), enc.encode(["a cat", "the dog"]), atol=1e-6)
    assert run("encode", csv, "-o", tmp_path / "c.npy", "--model", tiny_model_dir) == 0
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), enc.encode(["a cat"]), atol=1e-6)


def test_unknown_device_is_one_line(tiny_model_dir, capsys):
    assert run("info", "--model", tiny_model_dir, "--device", "tpu:9") == 2
    assert "tpu:9" in one_error_line(capsys)
    with pytest.raises(ValueError, match="tpu:9"):
        Encoder(tiny_model_dir, device="tpu:9")


DAMAGE = [
    ("tokenizer.json", lambda p: p.write_bytes(p.read_bytes()[:200]), "not a readable tokenizer file"),
    ("tokenizer.json", lambda p: p.write_text("{}"), "not a readable tokenizer file"),
    ("tokenizer.json", lambda p: p.write_bytes(os.urandom(3000)), "not a readable tokenizer file"),
    ("config.json", lambda p: p.write_text('{"hidden_size": 32,'), "not valid JSON"),
    ("config.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "hidden_size": -1})),
     "hidden_size must be a positive integer"),
    ("config.json", lambda p: p.write_text("[1, 2]"), "holds a JSON list, expected a JSON object"),
    ("modules.json", lambda p: p.write_text("not json"), "not valid JSON"),
    ("modules.json", lambda p: p.write_text('[{"path": ""}]'), "'type' string"),
    ("1_Pooling/config.json", lambda p: p.write_text("{}"), "word_embedding_dimension"),
    ("1_Pooling/config.json", lambda p: p.write_text('{"word_embedding_dimension": 32}'), "enables no pooling mode"),
    ("1_Pooling/config.json", lambda p: p.write_text('{"word_embedding_dimension": 7, "pooling_mode_mean_tokens": true}'),
     "hidden_size is 32"),
    ("sentence_bert_config.json", lambda p: p.write_bytes(b"\xff\xfe"), "not UTF-8"),
]


@pytest.mark.parametrize("name, damage, says", DAMAGE, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(DAMAGE)])
def test_damaged_model_file_is_one_error_naming_it(model_copy, capsys, name, damage, says):
    damage(model_copy / name)
    with pytest.raises(ModelFileError, match=says) as caught:
        Encoder(model_copy, device="cpu")
    assert str(model_copy / name) in str(caught.value)
    assert run("info", "--model", model_copy) == 2
    line = one_error_line(capsys)
    assert str(model_copy / name) in line and says in line
    assert run("serve", "--model", model_copy, "--port", "0") == 2  # fails while loading, before listening
    assert str(model_copy / name) in one_error_line(capsys)


def test_console_script_prints_no_traceback_unless_debug(model_copy):
    (model_copy / "tokenizer.json").write_text("{}")
    cli = [sys.executable, "-m", "allmpnet"]
    plain = subprocess.run(cli + ["info", "--model", str(model_copy)], capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == [plain.stderr.strip()] and "tokenizer.json" in plain.stderr
    for args in (["--debug", "info", "--model", str(model_copy)], ["info", "--model", str(model_copy), "--debug"]):
        debug = subprocess.run(cli + args, capture_output=True, text=True)
        assert debug.returncode == 2 and "Traceback" in debug.stderr and "tokenizer.json" in debug.stderr


def test_unexpected_errors_are_one_line_with_a_hint(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something internal\nwith a second line")

    monkeypatch.setattr("allmpnet.cli.core.cmd_info", broken)
    assert main(["info"]) == 1
    line = one_error_line(capsys)
    assert "internal error: RuntimeError: something internal with a second line" in line and "--debug" in line


@pytest.mark.parametrize("error, code", [(TypeError("an internal slip"), 1), (ValueError("an internal slip"), 1),
                                         (KeyError("an internal slip"), 1)])
def test_a_plain_python_error_is_ours_not_the_users(monkeypatch, capsys, error, code):
    def broken(args):
        raise error

    monkeypatch.setattr("allmpnet.cli.core.cmd_info", broken)
    assert main(["info"]) == code
    line = one_error_line(capsys)
    assert f"internal error: {type(error).__name__}" in line and "--debug" in line


def test_every_error_a_user_can_cause_shares_one_base_class(monkeypatch, capsys):
    import allmpnet
    from allmpnet.bulk.job import BadRowsError
    from allmpnet.errors import AllmpnetError
    from allmpnet.evaluate.data import DatasetError
    from allmpnet.search.index import IndexMismatchError
    from allmpnet.search.storage import IndexFormatError
    from allmpnet.train.data import DataError
    user_errors = [allmpnet.ModelFileError, allmpnet.WeightsError, allmpnet.ChecksumError, allmpnet.ModelNotFoundError,
                   allmpnet.NonFiniteOutputError, allmpnet.InvalidInput, allmpnet.InvalidInputType,
                   allmpnet.PrecisionUnavailable, BadRowsError, DatasetError, IndexMismatchError, IndexFormatError,
                   DataError]
    assert all(issubclass(e, AllmpnetError) for e in user_errors)
    for error in user_errors:
        def broken(args, error=error):
            raise error("data.tsv", "the user's mistake") if error is DatasetError else error("the user's mistake")
        monkeypatch.setattr("allmpnet.cli.core.cmd_info", broken)
        assert main(["info"]) == 2, error
        assert "the user's mistake" in one_error_line(capsys)
    with pytest.raises(allmpnet.PrecisionUnavailable, match="not available"):
        from allmpnet.encode.precision import Capabilities, plan_precision
        plan_precision("int8", "cpu", Capabilities("cpu"))
    with pytest.raises(allmpnet.InvalidInputType, match=r"texts\[1\]"):
        allmpnet.Encoder.encode(None, ["fine", 3])


def test_serve_on_a_taken_port_is_one_line_before_the_model_loads(tiny_model_dir, capsys, monkeypatch):
    import socket
    monkeypatch.setattr("allmpnet.cli.core.load_encoder", lambda args: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run("serve", "--model", tiny_model_dir, "--port", port) == 2
    line = one_error_line(capsys)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line
