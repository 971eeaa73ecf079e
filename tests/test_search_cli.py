"""The index/search/cluster/mine-paraphrases commands, end to end on the tiny model."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from allmpnet.cli import main
from allmpnet.search import Index
from boundaries import EPS, assert_clear_of, cosines64

DOCS = [("a", "the cat"), ("b", "a dog"), ("c", "hello world"), ("d", "the sun and the moon"), ("e", "a car")]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t, "lang": "en"}) + "\n" for i, t in DOCS))
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_build_search_info_add(tmp_path, corpus, tiny_model_dir, capsys):
    ix = tmp_path / "ix"
    code, out, _ = run(capsys, "index", "build", corpus, "--out", ix, "--model", tiny_model_dir, "--device", "cpu")
    assert code == 0 and "5 row(s)" in out and "built" in out and "5 rows, 32-d" in out
    code, out, _ = run(capsys, "search", ix, "a dog", "hello world", "-k", "2")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "query: a dog" and "[b]  a dog" in lines[1] and lines[1].strip().startswith("1. 1.0000")
    assert lines[3] == "query: hello world" and "[c]  hello world" in lines[4]

    queries = tmp_path / "q.txt"
    queries.write_text("the cat\n\na car\n")
    code, out, err = run(capsys, "search", ix, "--queries", queries, "-k", "1", "--json", "--exact")
    assert "skipped 1 blank query line(s)" in err
    answers = [json.loads(line) for line in out.splitlines()]
    assert [(a["query"], a["hits"][0]["id"], a["hits"][0]["metadata"]) for a in answers] == [
        ("the cat", "a", {"lang": "en"}), ("a car", "e", {"lang": "en"})]

    more = tmp_path / "more.jsonl"
    more.write_text('{"id": "f", "text": "the plant"}\n{"id": "a", "text": "clash"}\n')
    code, _, err = run(capsys, "index", "add", ix, more)
    assert code == 2 and "line 2: id 'a' is already in the index" in err
    code, out, _ = run(capsys, "index", "add", ix, more, "--skip-bad")
    assert code == 0 and "1 bad row(s) skipped" in out and "6 rows" in out
    code, out, _ = run(capsys, "index", "info", ix, "--json")
    info = json.loads(out)
    assert (info["count"], info["dim"], info["version"], info["checksums"]) == (6, 32, "v000002", "ok")


def test_build_refusals_are_one_line_errors(tmp_path, corpus, tiny_model_dir, capsys):
    ix = tmp_path / "ix"
    model = ["--model", tiny_model_dir, "--device", "cpu"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run(capsys, "index", "build", empty, "--out", ix, *model)
    assert code == 2 and "no rows to index" in err and not ix.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": 1, "text": "ok"}\n{"id": 2, "text": ["list"]}\n\xc3\x28\n')
    code, _, err = run(capsys, "index", "build", bad, "--out", ix, *model)
    assert code == 2 and "2 bad row(s)" in err and "line 3: not valid UTF-8" in err and not ix.exists()
    assert run(capsys, "index", "build", corpus, "--out", ix, *model)[0] == 0
    code, _, err = run(capsys, "index", "build", corpus, "--out", ix, *model)
    assert code == 2 and "already holds an index" in err
    vectors = tmp_path / "v.npy"
    np.save(vectors, np.ones((4, 32), dtype=np.float32))
    code, _, err = run(capsys, "index", "build", corpus, "--out", tmp_path / "ix2", "--vectors", vectors, *model)
    assert code == 2 and "expected (5, 32)" in err
    code, _, err = run(capsys, "search", tmp_path / "nowhere", "q")
    assert code == 2 and "no such index directory" in err
    code, _, err = run(capsys, "search", ix)
    assert code == 2 and "at least one query" in err


def test_build_from_precomputed_vectors_keeps_the_model_for_queries(tmp_path, corpus, tiny_model_dir, capsys):
    from allmpnet import Encoder
    vectors = Encoder(tiny_model_dir, device="cpu").encode([t for _, t in DOCS])
    np.save(tmp_path / "v.npy", vectors)
    ix = tmp_path / "ix"
    assert run(capsys, "index", "build", corpus, "--out", ix, "--vectors", tmp_path / "v.npy",
               "--model", tiny_model_dir, "--dtype", "i8")[0] == 0
    np.testing.assert_array_equal(np.asarray(Index.open(ix).vectors), vectors)
    code, out, _ = run(capsys, "search", ix, "the sun and the moon", "-k", "1")
    assert code == 0 and "[d]" in out


def test_cluster_and_mine_paraphrases(tmp_path, tiny_model_dir, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("the cat\nthe cat\nthe cat\n\nhello world\nhello world\na dog\n")
    model = ["--model", tiny_model_dir, "--device", "cpu"]
    # the expectations below are exact: repeated texts score 1, the others clear of --threshold 0.99 and far
    # enough below 1 for the four pairs of repeated texts to come first
    from allmpnet import Encoder
    vectors = Encoder(tiny_model_dir, device="cpu").encode(["the cat", "hello world", "a dog"])
    others = cosines64(vectors, vectors)[np.triu_indices(3, 1)]
    assert_clear_of(others, 0.99, what="cosine")
    assert others.max() < 1 - 100 * EPS
    code, out, _ = run(capsys, "cluster", texts, "--min-size", "2", "--threshold", "0.99", *model)
    assert code == 0 and "2 cluster(s) over 6 texts; 1 texts in no community" in out and "1 blank line(s)" in out
    assert "cluster 0: 3 texts" in out and "cluster 1: 2 texts" in out
    with open(tmp_path / "t.txt.clusters.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["line"], r["cluster"]) for r in rows] == [("1", "0"), ("2", "0"), ("3", "0"), ("5", "1"), ("6", "1"),
                                                         ("7", "-1")]
    code, out, _ = run(capsys, "cluster", texts, "--method", "kmeans", "-n", "3", "-o", tmp_path / "k.csv", *model)
    with open(tmp_path / "k.csv") as f:
        labels = [r["cluster"] for r in csv.DictReader(f)]
    assert code == 0 and labels[0] == labels[1] == labels[2] and labels[3] == labels[4] and len(set(labels)) == 3
    code, out, _ = run(capsys, "mine-paraphrases", texts, "--show", "2", "--out", tmp_path / "p.csv", *model)
    assert code == 0 and "15 pair(s) among 6 texts" in out
    with open(tmp_path / "p.csv") as f:
        pairs = list(csv.DictReader(f))
    assert len(pairs) == 15 and float(pairs[0]["score"]) == pytest.approx(1.0, abs=1e-5)
    assert {(p["id1"], p["id2"]) for p in pairs[:4]} == {("1", "2"), ("1", "3"), ("2", "3"), ("5", "6")}


class RecordingBar:
    """Stands in for tqdm: records every update the indexing loop makes."""
    updates: list[int] = []

    def __init__(self, *args, total=None, **kwargs):
        self.total = total
        RecordingBar.updates = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        RecordingBar.updates.append(n)


@pytest.mark.parametrize("chunk", [False, True])
def test_index_build_progress_moves_every_batch(tmp_path, tiny_model_dir, capsys, monkeypatch, chunk):
    """300 rows: the bar moves once per model batch (here 10 rows), not once per 4,096-row chunk; vectors as encode."""
    import tqdm.auto

    from allmpnet import Encoder
    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    texts = [f"text number {i}" + " word" * (i % 7) for i in range(300)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(texts) + "\n")
    out = tmp_path / "index"
    code, _, err = run(capsys, "index", "build", path, "--out", out, "--model", tiny_model_dir, "--batch-size", 10,
                       *(["--chunk"] if chunk else []))
    assert code == 0, err
    assert sum(RecordingBar.updates) == 300
    assert len(RecordingBar.updates) >= 30 and max(RecordingBar.updates) <= 10, RecordingBar.updates
    encoder = Encoder(tiny_model_dir, device="cpu")
    hits = Index.open(out).search(encoder.encode(texts[17]), k=1)  # stored vectors are encode()'s
    assert hits[0].text == texts[17] and hits[0].score == pytest.approx(1.0, abs=1e-5)
