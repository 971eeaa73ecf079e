"""The card's scores built in: the packaged model-index, which card a model is compared with, and the table."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from allmpnet.cli import main
from allmpnet.evaluate.card import (EXPECTED_MATCH, Comparison, builtin_card, card_for_model, compare,
                                    is_published_model, markdown_table, model_index_results, scores_by_task)

CARD_WITH_INDEX = ("---\nmodel-index:\n- name: mine\n  results:\n  - task:\n      type: STS\n    dataset:\n"
                   "      name: MTEB STSBenchmark\n      config: default\n      split: test\n    metrics:\n"
                   "    - type: cos_sim_spearman\n      value: 12.5\n---\n# mine\n")


def test_builtin_card_holds_the_published_model_index():
    card = builtin_card()
    assert card["model"] == "sentence-transformers/all-mpnet-base-v2"
    results = card["results"]
    # the 56 MTEB English tasks, CQADupstack listed as its 12 forums plus their mean: 68 results
    assert len(results) == 68
    assert Counter(r["type"] for r in results) == {"Retrieval": 27, "Classification": 12, "Clustering": 11,
                                                   "STS": 10, "Reranking": 4, "PairClassification": 3,
                                                   "Summarization": 1}
    assert len({r["task"] for r in results if not r["task"].startswith("CQADupstack")}) == 55
    assert all(r["split"] == ("dev" if r["task"] == "MSMARCO" else "test") for r in results)
    scores = scores_by_task(results)
    # figures as printed on the card
    assert scores["STSBenchmark"]["cos_sim_spearman"] == pytest.approx(83.421898505618)
    assert scores["Banking77Classification"]["accuracy"] == pytest.approx(81.8603896103896)
    assert scores["AmazonCounterfactualClassification"]["accuracy"] == pytest.approx(65.26865671641791)
    assert scores["SciFact"]["ndcg_at_10"] == pytest.approx(65.57)
    assert "STS17 (en-en)" in scores and "STS22" in scores  # 'en' drops out of the name, other subsets stay


def test_builtin_card_equals_the_seed_card(seed_card):
    assert builtin_card()["results"] == model_index_results(seed_card)


def test_a_model_directorys_own_model_index_wins(tiny_model_dir, tmp_path):
    # the tiny model directory has no README: nothing to compare with, and the message says why
    card, source = card_for_model(tiny_model_dir)
    assert card is None and "README.md does not exist" in source and "--card" in source
    assert not is_published_model(tiny_model_dir)
    own = tmp_path / "own"
    own.mkdir()
    (own / "README.md").write_text(CARD_WITH_INDEX)
    card, source = card_for_model(own)
    assert card == {"STSBenchmark": {"cos_sim_spearman": 12.5}} and str(own / "README.md") in source
    (own / "README.md").write_text("---\nlicense: mit\n---\n")
    card, source = card_for_model(own)
    assert card is None and "no model-index results" in source


@pytest.mark.real_weights
def test_the_published_weights_get_the_builtin_card(real_model_dir):
    assert is_published_model(real_model_dir)
    card, source = card_for_model(real_model_dir)  # its README has no model-index
    assert "built in" in source
    assert card["STSBenchmark"]["cos_sim_spearman"] == pytest.approx(83.421898505618)


def test_table_says_how_exactly_each_type_can_match():
    rows = [Comparison("STSBenchmark", "STS", "cos_sim_spearman", 83.42, 83.42),
            Comparison("Banking77Classification", "Classification", "accuracy", 81.70, 81.86),
            Comparison("Mine", "Clustering", "v_measure", 40.0, None)]
    table = markdown_table(rows, "the card")
    assert "| STSBenchmark | STS | cos_sim_spearman | 83.42 | 83.42 | +0.00 | exact |" in table
    assert "| Banking77Classification | Classification | accuracy | 81.70 | 81.86 | -0.16 | within sampling noise |" \
        in table
    assert "| Mine | Clustering | v_measure | 40.00 | – | – | – |" in table
    assert "Card: the card." in table
    assert f"- Classification: within sampling noise: {EXPECTED_MATCH['Classification'][1]}." in table
    assert "unseeded" in table and "- Clustering" not in table  # only types that were compared are explained


def write_sts_task(root, name: str):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps({"type": "STS", "main_score": "cosine_spearman"}))
    (folder / "sts.tsv").write_text("sentence1\tsentence2\tscore\nthe cat\tthe cat\t5\na dog\tthe dog\t4\n"
                                    "hello world\tsun\t1\na car\tthe moon\t0.5\n")
    return folder


def test_eval_without_card_uses_the_model_directorys_model_index(tiny_model_dir, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "README.md").write_text(CARD_WITH_INDEX)
    write_sts_task(tmp_path / "data", "STSBenchmark")
    assert main(["eval", "STSBenchmark", "--data", str(tmp_path / "data"), "--model", str(model), "--out",
                 str(tmp_path / "out"), "--no-cache", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert f"card comparison: the model-index in {model / 'README.md'}" in captured.err
    assert "| 12.50 |" in captured.out and "| exact |" in captured.out


@pytest.mark.real_weights
def test_eval_of_the_published_weights_prints_the_card_comparison(real_model_dir, tmp_path, capsys):
    write_sts_task(tmp_path / "data", "STSBenchmark")  # four pairs: the card's figure beside whatever they give
    assert main(["eval", "STSBenchmark", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                 "--no-cache", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "card comparison: the model card of sentence-transformers/all-mpnet-base-v2 (built in)" in captured.err
    assert "| STSBenchmark | STS | cos_sim_spearman |" in captured.out and "| 83.42 |" in captured.out


def test_a_malformed_model_index_is_one_clear_error(tmp_path):
    (tmp_path / "README.md").write_text("---\nmodel-index:\n- name: x\n  results:\n  - task: {type: STS}\n"
                                        "    dataset: {name: MTEB STS12}\n    metrics:\n    - type: cos_sim_spearman\n"
                                        "      value: high\n---\n")
    with pytest.raises(ValueError, match=r"README\.md: model-index is not in the expected form"):
        model_index_results(tmp_path)
    card, source = card_for_model(tmp_path)
    assert card is None and "not in the expected form" in source


def test_the_summeval_fixed_mean_is_not_expected_to_match_the_cards_legacy_figure():
    from allmpnet.evaluate.runner import table_rows

    result = {"task": "SummEval", "type": "Summarization", "main_score": "cos_sim_spearman",
              "scores": {"cos_sim_spearman": 23.89, "cos_sim_spearman_legacy": 27.43}}
    table = markdown_table(table_rows([result], {"SummEval": {"cos_sim_spearman": 27.49}}))
    assert "| SummEval | Summarization | cos_sim_spearman | 23.89 | 27.49 | -3.60 | differs by design (fixed mean) |" \
        in table
    legacy = "| SummEval | Summarization | cos_sim_spearman (legacy mean) | 27.43 | 27.49 | -0.06 | exact (legacy mean) |"
    assert legacy in table


# --- the expected-agreement column follows the precision that ran ------------------------------------------

def sts_result(task: str, value: float, precision: str | None, exact: bool | None = None) -> dict:
    result = {"task": task, "type": "STS", "main_score": "cos_sim_spearman", "scores": {"cos_sim_spearman": value},
              "precision": precision}
    if exact is not None:
        result["exact"] = exact
    return result


CARD = {"STSBenchmark": {"cos_sim_spearman": 83.42}, "STS12": {"cos_sim_spearman": 72.63},
        "SciFact": {"ndcg_at_10": 65.57}, "SummEval": {"cos_sim_spearman": 27.49}}


def test_a_fast_precision_is_not_called_exact_and_states_its_tolerance():
    from allmpnet.evaluate.runner import table_rows

    results = [sts_result("STSBenchmark", 83.50, "int8", exact=False), sts_result("STS12", 72.45, "int8", exact=False),
               {"task": "SciFact", "type": "Retrieval", "main_score": "ndcg_at_10", "scores": {"ndcg_at_10": 65.45},
                "precision": "int8", "exact": False},
               {"task": "SummEval", "type": "Summarization", "main_score": "cos_sim_spearman", "precision": "int8",
                "exact": False, "scores": {"cos_sim_spearman": 23.9, "cos_sim_spearman_legacy": 27.40}}]
    table = markdown_table(table_rows(results, CARD), "the card")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 5 and not any("exact" in row for row in rows), table
    # the contract's own figure: STSBenchmark within 0.1 of fp32; the other deterministic rows near fp32
    assert "| STSBenchmark | STS | cos_sim_spearman | 83.50 | 83.42 | +0.08 | within 0.1 of fp32 (int8) |" in table
    assert "| STS12 | STS | cos_sim_spearman | 72.45 | 72.63 | -0.18 | near fp32 (int8) |" in table
    assert "| SciFact | Retrieval | ndcg_at_10 | 65.45 | 65.57 | -0.12 | near fp32 (int8) |" in table
    assert "| near fp32 (int8, legacy mean) |" in table
    assert "| differs by design (fixed mean) |" in table
    notes = table.split("\n\n", 1)[1]
    assert "cosine of at least 0.99" in notes and "STSBenchmark's Spearman within 0.1 of fp32's" in notes
    assert "- STS: exact" not in notes and "- Retrieval: exact" not in notes


@pytest.mark.parametrize("precision, exact, says", [
    ("bf16", None, "bf16"), ("fp16", None, "fp16"), ("bf16+int8", False, "bf16+int8"),
    ("fp32", False, "inexact fp32"),  # an fp32 run its plan calls inexact is not exact either
])
def test_every_inexact_run_says_so(precision, exact, says):
    table = markdown_table(compare([sts_result("STSBenchmark", 83.40, precision, exact)], CARD))
    assert f"| within 0.1 of fp32 ({says}) |" in table and "| exact |" not in table
    assert f"- {says}: the project's quality contract for a precision other than exact fp32:" in table


@pytest.mark.parametrize("precision, exact", [("fp32", True), ("fp32", None), (None, None)])
def test_an_exact_fp32_run_still_says_exact(precision, exact):
    table = markdown_table(compare([sts_result("STSBenchmark", 83.42, precision, exact)], CARD), "the card")
    assert "| STSBenchmark | STS | cos_sim_spearman | 83.42 | 83.42 | +0.00 | exact |" in table
    assert f"- STS: exact: {EXPECTED_MATCH['STS'][1]}." in table and "0.99" not in table


class FixedPlanEncoder:
    """Encodes like a wrapped encoder, reporting another precision plan (evaluate_task records what it says)."""

    def __init__(self, encoder, plan):
        self.encoder, self.plan, self.precision = encoder, plan, plan.name

    def encode(self, texts, batch_size=32, show_progress_bar=False):
        return self.encoder.encode(texts, batch_size=batch_size, show_progress_bar=show_progress_bar)


def test_evaluate_task_records_whether_its_plan_was_exact(tiny_model_dir, tmp_path):
    from allmpnet import Encoder
    from allmpnet.encode.precision import PrecisionPlan
    from allmpnet.evaluate.runner import evaluate_task, table_rows
    import torch

    task = write_sts_task(tmp_path, "STSBenchmark")
    encoder = Encoder(tiny_model_dir, device="cpu")
    exact = evaluate_task(task, encoder)
    assert exact["precision"] == "fp32" and exact["exact"] is True
    int8 = evaluate_task(task, FixedPlanEncoder(encoder, PrecisionPlan("int8", torch.bfloat16, "int8-x86")))
    assert int8["precision"] == "int8" and int8["exact"] is False
    card = {"STSBenchmark": {"cos_sim_spearman": 50.0}}
    assert "| exact |" in markdown_table(table_rows([exact], card))
    assert "| within 0.1 of fp32 (int8) |" in markdown_table(table_rows([int8], card))


def test_eval_cli_labels_rows_by_the_precision_it_ran(tiny_model_dir, tmp_path, capsys):
    from allmpnet.encode.precision import plan_precision

    try:
        plan_precision("bf16", "cpu")
    except ValueError as e:
        pytest.skip(f"bf16 does not run here: {e}")
    model = tmp_path / "model"
    import shutil
    shutil.copytree(tiny_model_dir, model)
    (model / "README.md").write_text(CARD_WITH_INDEX)
    write_sts_task(tmp_path / "data", "STSBenchmark")
    assert main(["eval", "STSBenchmark", "--data", str(tmp_path / "data"), "--model", str(model), "--out",
                 str(tmp_path / "out"), "--no-cache", "--device", "cpu", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "| within 0.1 of fp32 (bf16) |" in out and "| exact |" not in out
    assert json.loads((tmp_path / "out" / "STSBenchmark.json").read_text())["exact"] is False


# --- tasks the card lists under a subset ------------------------------------------------------------------

def test_sts17_is_matched_with_the_cards_en_en_figure():
    card = scores_by_task(builtin_card()["results"])
    [row] = compare([sts_result("STS17", 90.1, "fp32")], card)
    assert row.card == pytest.approx(90.59523263123734)
    assert "| STS17 | STS | cos_sim_spearman | 90.10 | 90.60 | -0.50 | exact |" in markdown_table([row])
    # named with its subset, or a task folder saying which subset it holds, finds the same figure
    assert compare([sts_result("STS17 (en-en)", 90.1, "fp32")], card)[0].card == pytest.approx(90.59523263123734)
    assert compare([{**sts_result("STS17", 90.1, "fp32"), "subset": "en-en"}], card)[0].card == \
        pytest.approx(90.59523263123734)
    # a subset the card does not have has no figure, rather than en-en's
    assert compare([{**sts_result("STS17", 80.0, "fp32"), "subset": "en-de"}], card)[0].card is None
    assert card["STS22"]["cos_sim_spearman"] == compare([sts_result("STS22", 60.0, "fp32")], card)[0].card


def test_a_local_sts17_folder_is_compared_with_the_cards_figure(tiny_model_dir, tmp_path):
    from allmpnet import Encoder
    from allmpnet.evaluate.runner import evaluate_task, table_rows

    encoder = Encoder(tiny_model_dir, device="cpu")
    card = scores_by_task(builtin_card()["results"])
    plain = evaluate_task(write_sts_task(tmp_path, "STS17"), encoder)  # named as in MTEB, holding en-en
    assert plain["task"] == "STS17" and "| 90.60 |" in markdown_table(table_rows([plain], card))
    folder = write_sts_task(tmp_path / "other", "STS17")
    (folder / "task.json").write_text(json.dumps({"type": "STS", "subset": "en-de"}))
    other = evaluate_task(folder, encoder)
    assert other["subset"] == "en-de" and table_rows([other], card)[0].card is None
