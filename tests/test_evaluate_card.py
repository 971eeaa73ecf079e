"""The card's scores built in: the packaged model-index, which card a model is compared with, and the table."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from allmpnet.cli import main
from allmpnet.evaluate.card import (EXPECTED_MATCH, Comparison, builtin_card, card_for_model, is_published_model,
                                    markdown_table, model_index_results, scores_by_task)

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
