"""`allmpnet eval` on the tiny random model: results files, the card table, the cache, and bad folders."""
from __future__ import annotations

import json

import pytest

from allmpnet.cli import main

STS_ROWS = "sentence1\tsentence2\tscore\n" + "".join(
    f"{a}\t{b}\t{s}\n" for a, b, s in [("the cat", "the cat", 5), ("a dog", "the dog", 4), ("hello world", "sun", 1),
                                       ("a car", "the moon", 0.5), ("test text", "text test", 3)])


@pytest.fixture
def sts_data(tmp_path):
    folder = tmp_path / "data" / "TinySTS"
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps({"name": "TinySTS", "type": "STS", "main_score": "cosine_spearman"}))
    (folder / "sts.tsv").write_text(STS_ROWS)
    card = tmp_path / "card.md"
    card.write_text("---\nmodel-index:\n- name: tiny\n  results:\n  - task:\n      type: STS\n    dataset:\n"
                    "      name: MTEB TinySTS\n      config: default\n    metrics:\n    - type: cos_sim_spearman\n"
                    "      value: 12.5\n---\n# tiny\n")
    return tmp_path


def test_eval_writes_results_and_compares_with_the_card(tiny_model_dir, sts_data, capsys):
    out, cache = sts_data / "out", sts_data / "cache"
    args = ["eval", "TinySTS", "--data", str(sts_data / "data"), "--model", str(tiny_model_dir), "--card",
            str(sts_data / "card.md"), "--out", str(out), "--cache-dir", str(cache), "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "TinySTS.json").read_text())
    assert result["main_score"] == "cos_sim_spearman" and result["precision"] == "fp32"
    ours = result["scores"]["cos_sim_spearman"]
    assert -100 <= ours <= 100
    row = f"| TinySTS | STS | cos_sim_spearman | {ours:.2f} | 12.50 | {ours - 12.5:+.2f} |"
    assert row in printed and row in (out / "table.md").read_text()
    # a second run reads every vector from the cache and gives the same figure
    assert len(list(cache.glob("*.sqlite"))) == 1
    assert main(args) == 0
    assert json.loads((out / "TinySTS.json").read_text())["scores"]["cos_sim_spearman"] == pytest.approx(ours)


def test_eval_bad_folder_is_one_clear_error(tiny_model_dir, sts_data, capsys):
    (sts_data / "data" / "TinySTS" / "sts.tsv").write_text(STS_ROWS + "only one column\n")
    code = main(["eval", "TinySTS", "--data", str(sts_data / "data"), "--model", str(tiny_model_dir),
                 "--out", str(sts_data / "out"), "--no-cache"])
    assert code == 2
    err = capsys.readouterr().err
    assert "TinySTS/sts.tsv:7: expected 3 tab-separated columns" in err
    assert main(["eval", "Missing", "--data", str(sts_data / "data"), "--model", str(tiny_model_dir)]) == 2
    assert "no task folder 'Missing'; tasks in" in capsys.readouterr().err


def test_unknown_name_without_data_explains_the_hub_route(tiny_model_dir, capsys, monkeypatch, tmp_path):
    import sys

    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a machine without the datasets package
    assert main(["eval", "SciFact", "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert "needs the `datasets` package" in err and 'pip install "allmpnet[eval-hub]"' in err  # names its extra
    assert main(["eval", "NoSuchTask", "--model", str(tiny_model_dir)]) == 2
    assert "no task folder 'NoSuchTask'" in capsys.readouterr().err


def test_a_bad_second_task_stops_the_run_before_any_encoding(tiny_model_dir, sts_data, capsys):
    bad = sts_data / "data" / "BadClassification"
    bad.mkdir()
    (bad / "task.json").write_text(json.dumps({"type": "Classification"}))
    (bad / "train.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    (bad / "test.jsonl").write_text('{"text": "c", "label": "x"}\n{"text": "d", "label": "w"}\n')
    out = sts_data / "out"
    code = main(["eval", "TinySTS", "BadClassification", "--data", str(sts_data / "data"), "--model",
                 str(tiny_model_dir), "--out", str(out), "--no-cache"])
    assert code == 2
    assert "BadClassification/test.jsonl:2: label 'w' never occurs in train.jsonl" in capsys.readouterr().err
    assert not out.exists()  # TinySTS was not run first
