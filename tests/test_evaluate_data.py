"""Task folders: good ones load, bad ones fail with the file and line named; card parsing; the embedding cache."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from allmpnet.evaluate import CachedEncoder, DatasetError, load_task, read_card
from allmpnet.evaluate.card import Comparison, compare, markdown_table
from allmpnet.evaluate.data import (read_classification, read_clustering, read_pairs, read_reranking,
                                   read_retrieval, read_sts, read_summarization, read_task)


def make_task(root: Path, task_type: str, files: dict[str, str | list], **params) -> Path:
    folder = root / params.pop("name", task_type)
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps({"name": folder.name, "type": task_type, **params}))
    for name, content in files.items():
        text = content if isinstance(content, str) else "".join(json.dumps(r) + "\n" for r in content)
        (folder / name).write_text(text)
    return folder


def test_sts_folder_reads_and_bad_rows_name_file_and_line(tmp_path):
    good = make_task(tmp_path, "STS", {"sts.tsv": 'sentence1\tsentence2\tscore\nA "quoted" one\tB\t2.5\nC\tD\t4\n'})
    data = read_sts(load_task(good))
    assert data.sentences1 == ['A "quoted" one', "C"] and data.scores == [2.5, 4.0]  # quotes kept verbatim

    bad = make_task(tmp_path, "STS", {"sts.tsv": "sentence1\tsentence2\tscore\nA\tB\t1\nC\tD\n"}, name="cols")
    with pytest.raises(DatasetError, match=r"cols/sts\.tsv:3: expected 3 tab-separated columns"):
        read_sts(load_task(bad))
    header = make_task(tmp_path, "STS", {"sts.tsv": "s1\ts2\tscore\nA\tB\t1\n"}, name="header")
    with pytest.raises(DatasetError, match=r"header/sts\.tsv:1: expected header columns"):
        read_sts(load_task(header))
    number = make_task(tmp_path, "STS", {"sts.tsv": "sentence1\tsentence2\tscore\nA\tB\thigh\n"}, name="num")
    with pytest.raises(DatasetError, match=r"num/sts\.tsv:2: column 'score' must be a number"):
        read_sts(load_task(number))


def test_missing_files(tmp_path):
    missing = make_task(tmp_path, "STS", {})
    with pytest.raises(DatasetError, match=r"STS/sts\.tsv: missing file"):
        read_sts(load_task(missing))
    (tmp_path / "nojson").mkdir()
    with pytest.raises(DatasetError, match=r"nojson/task\.json: missing"):
        load_task(tmp_path / "nojson")
    with pytest.raises(FileNotFoundError, match="no task folder 'Nope'"):
        load_task("Nope", tmp_path)
    typo = make_task(tmp_path, "Sts", {}, name="typo")
    with pytest.raises(DatasetError, match="'type' must be one of"):
        load_task(typo)


def test_classification_label_not_in_train_and_wrong_fields(tmp_path):
    folder = make_task(tmp_path, "Classification",
                       {"train.jsonl": [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}],
                        "test.jsonl": [{"text": "c", "label": "x"}, {"text": "d", "label": "z"}]})
    with pytest.raises(DatasetError, match=r"test\.jsonl:2: label 'z' never occurs in train\.jsonl"):
        read_classification(load_task(folder))

    wrong = make_task(tmp_path, "Classification",
                      {"train.jsonl": '{"text": "a", "label": "x"}\n{"sentence": "b", "label": "y"}\n',
                       "test.jsonl": [{"text": "c", "label": "x"}]}, name="fields")
    with pytest.raises(DatasetError, match=r"fields/train\.jsonl:2: missing field 'text'"):
        read_classification(load_task(wrong))
    broken = make_task(tmp_path, "Classification",
                       {"train.jsonl": '{"text": "a", "label": "x"}\n\n{"text": "b", "label": \n',
                        "test.jsonl": [{"text": "c", "label": "x"}]}, name="json")
    with pytest.raises(DatasetError, match=r"json/train\.jsonl:3: not valid JSON"):
        read_classification(load_task(broken))
    typed = make_task(tmp_path, "Classification",
                      {"train.jsonl": [{"text": 5, "label": "x"}], "test.jsonl": [{"text": "c", "label": "x"}]},
                      name="typed")
    with pytest.raises(DatasetError, match=r"typed/train\.jsonl:1: field 'text' must be a string"):
        read_classification(load_task(typed))


def test_retrieval_folder_and_dangling_qrels(tmp_path):
    corpus = [{"_id": "d1", "title": "T", "text": "one"}, {"_id": "d2", "text": "two"}]
    queries = [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "unjudged"}]
    good = make_task(tmp_path, "Retrieval", {"corpus.jsonl": corpus, "queries.jsonl": queries,
                                             "qrels.tsv": "query-id\tcorpus-id\tscore\nq1\td2\t1\n"})
    data = read_retrieval(load_task(good))
    assert data.queries == {"q1": "first"}  # only judged queries are evaluated
    assert data.corpus["d2"] == {"title": "", "text": "two"} and data.qrels == {"q1": {"d2": 1}}

    dangling = make_task(tmp_path, "Retrieval", {"corpus.jsonl": corpus, "queries.jsonl": queries,
                                                 "qrels.tsv": "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td9\t1\n"},
                         name="dangling")
    with pytest.raises(DatasetError, match=r"dangling/qrels\.tsv:3: document id 'd9' is not in corpus\.jsonl"):
        read_retrieval(load_task(dangling))
    dup = make_task(tmp_path, "Retrieval", {"corpus.jsonl": corpus + corpus[:1], "queries.jsonl": queries,
                                            "qrels.tsv": "query-id\tcorpus-id\tscore\nq1\td1\t1\n"}, name="dup")
    with pytest.raises(DatasetError, match=r"dup/corpus\.jsonl:3: duplicate document id 'd1'"):
        read_retrieval(load_task(dup))


def test_other_task_types_check_their_rows(tmp_path):
    pairs = make_task(tmp_path, "PairClassification",
                      {"pairs.jsonl": [{"sentence1": "a", "sentence2": "b", "label": 1},
                                       {"sentence1": "a", "sentence2": "b", "label": 2}]})
    with pytest.raises(DatasetError, match=r"pairs\.jsonl:2: field 'label' must be 0 or 1"):
        read_pairs(load_task(pairs))
    summ = make_task(tmp_path, "Summarization",
                     {"summeval.jsonl": [{"text": "t", "human_summaries": ["h"], "machine_summaries": ["m", "n"],
                                          "relevance": [1.0]}]})
    with pytest.raises(DatasetError, match=r"summeval\.jsonl:1: 2 machine summaries but 1 relevance scores"):
        read_summarization(load_task(summ))
    clus = make_task(tmp_path, "Clustering", {"sets.jsonl": [{"sentences": ["a", "b"], "labels": [1, 2]},
                                                             {"sentences": ["a"], "labels": [1, 2]}]})
    with pytest.raises(DatasetError, match=r"sets\.jsonl:2: 1 sentences but 2 labels"):
        read_clustering(load_task(clus))
    rerank = make_task(tmp_path, "Reranking", {"samples.jsonl": [{"query": ["a", "b"], "positive": ["p"],
                                                                  "negative": []}]})
    assert read_reranking(load_task(rerank))[0].query == ["a", "b"]


def test_shared_data_folders_all_load(shared_data):
    for folder in sorted(p for p in shared_data.iterdir() if (p / "task.json").is_file()):
        assert read_task(load_task(folder))
    sts = read_sts(load_task(shared_data / "STSBenchmark"))
    assert len(sts.scores) == 1379  # the row count the data README states
    scifact = read_retrieval(load_task(shared_data / "SciFact"))
    assert (len(scifact.corpus), len(scifact.queries)) == (5183, 300)


# --- card ----------------------------------------------------------------------------------------------------

def test_read_seed_card(seed_card):
    card = read_card(seed_card)
    assert card["STSBenchmark"]["cos_sim_spearman"] == pytest.approx(83.421898505618)
    assert card["SciFact"]["ndcg_at_10"] == pytest.approx(65.57)
    assert card["Banking77Classification"]["accuracy"] == pytest.approx(81.8603896103896)
    assert card["AmazonCounterfactualClassification"]["accuracy"] == pytest.approx(65.26865671641791)  # "(en)"
    assert card["SummEval"]["cos_sim_spearman"] == pytest.approx(27.485869639926136)


def test_card_errors_and_table(tmp_path):
    (tmp_path / "plain.md").write_text("# no front matter\n")
    with pytest.raises(ValueError, match="no YAML front matter"):
        read_card(tmp_path / "plain.md")
    (tmp_path / "empty.md").write_text("---\nlicense: mit\n---\n# card\n")
    with pytest.raises(ValueError, match="no model-index results"):
        read_card(tmp_path / "empty.md")
    results = [{"task": "STSBenchmark", "type": "STS", "main_score": "cos_sim_spearman",
                "scores": {"cos_sim_spearman": 83.4}},
               {"task": "Mine", "type": "STS", "main_score": "cos_sim_spearman", "scores": {"cos_sim_spearman": 50.0}}]
    rows = compare(results, {"STSBenchmark": {"cos_sim_spearman": 83.5}})
    assert rows[0] == Comparison("STSBenchmark", "STS", "cos_sim_spearman", 83.4, 83.5)
    assert rows[0].difference == pytest.approx(-0.1) and rows[1].card is None
    table = markdown_table(rows)
    assert "| STSBenchmark | STS | cos_sim_spearman | 83.40 | 83.50 | -0.10 |" in table
    assert "| Mine | STS | cos_sim_spearman | 50.00 | – | – |" in table


# --- cache ---------------------------------------------------------------------------------------------------

class CountingEncoder:
    dim = 3

    def __init__(self):
        self.encoded: list[str] = []

    def encode(self, texts, batch_size=32, show_progress_bar=None):
        self.encoded += texts
        return np.array([[len(t), t.count("a"), 1.0] for t in texts], dtype=np.float32)


def test_cache_encodes_each_text_once_and_survives_reopening(tmp_path):
    inner = CountingEncoder()
    cached = CachedEncoder(inner, tmp_path, key="counting")
    first = cached.encode(["aa", "b", "aa", "ccc"])
    assert first.tolist() == [[2, 2, 1], [1, 0, 1], [2, 2, 1], [3, 0, 1]]
    assert inner.encoded == ["aa", "b", "ccc"]  # the repeated text once
    second = cached.encode(["ccc", "dd", "b"])
    assert second.tolist() == [[3, 0, 1], [2, 0, 1], [1, 0, 1]]
    assert inner.encoded == ["aa", "b", "ccc", "dd"]
    cached.close()
    again = CachedEncoder(CountingEncoder(), tmp_path, key="counting")
    assert again.encode(["dd", "aa"]).tolist() == [[2, 0, 1], [2, 2, 1]]
    assert again.encoder.encoded == [] and again.hits == 2


def test_cache_key_follows_what_changes_the_vectors(tiny_model_dir, tmp_path):
    from allmpnet import Encoder
    from allmpnet.evaluate.cache import model_key

    enc = Encoder(tiny_model_dir, device="cpu")
    base = model_key(enc)
    assert model_key(Encoder(tiny_model_dir, device="cpu")) == base
    assert model_key(Encoder(tiny_model_dir, device="cpu", precision="bf16")) != base
    assert model_key(Encoder(tiny_model_dir, device="cpu", max_seq_length=16)) != base
    cached = CachedEncoder(enc, tmp_path)
    texts = ["a test sentence", "the cat", "a test sentence"]
    np.testing.assert_allclose(cached.encode(texts), enc.encode(texts), atol=1e-6)
    with pytest.raises(TypeError, match="pass key="):
        CachedEncoder(CountingEncoder(), tmp_path)
