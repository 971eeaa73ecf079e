"""Hard-negative mining from an index: the same triplets as sentence-transformers' mine_hard_negatives on one
corpus and model, the filters' rules on hand-made vectors, and the CLI writing triplets the trainer reads."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from allmpnet import Encoder
from allmpnet.cli import main
from allmpnet.search import Index
from allmpnet.search.mining import default_range_max, mine_hard_negatives
from allmpnet.train.data import DatasetSpec, JsonlDataset

WORDS = "the cat dog car plant sun moon world text search query sentence example hello test".split()


def corpus_texts(n: int = 60, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = {" ".join(rng.choice(WORDS, size=int(rng.integers(3, 8)))) for _ in range(3 * n)}
    return sorted(texts)[:n]


def pairs_from(corpus: list[str]) -> list[tuple[str, str]]:
    """Anchors are short texts; the first three anchors have two positives each (exercises the grouping)."""
    anchors = ["the cat and the dog", "sun and moon", "a search query", "hello world example", "the plant car test"]
    pairs = [(a, corpus[3 * i]) for i, a in enumerate(anchors)]
    pairs += [(a, corpus[3 * i + 1]) for i, a in enumerate(anchors[:3])]
    return pairs


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model_dir):
    return Encoder(tiny_model_dir, device="cpu")


@pytest.mark.parametrize("settings", [
    dict(num_negatives=3),
    dict(num_negatives=2, range_min=2, range_max=12),
    dict(num_negatives=3, relative_margin=0.05),
    dict(num_negatives=2, absolute_margin=0.02, max_score=0.97, range_max=30),
    dict(num_negatives=4, range_min=1, range_max=25, min_score=0.5),
])
def test_same_triplets_as_sentence_transformers(tmp_path, tiny_model_dir, tiny_encoder, settings):
    datasets = pytest.importorskip("datasets")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives as st_mine

    corpus = corpus_texts()
    pairs = pairs_from(corpus)
    st_model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    dataset = datasets.Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
    theirs = st_mine(dataset, st_model, corpus=corpus, sampling_strategy="top", verbose=False, **settings)
    expected = sorted(zip(theirs["anchor"], theirs["positive"], theirs["negative"]))

    # sentence-transformers searches corpus + positives; the index holds the same texts
    index = Index.build(tmp_path / "ix", texts=list(dict.fromkeys(corpus + [p for _, p in pairs])),
                        encoder=tiny_encoder)
    ours = mine_hard_negatives(index, pairs, exact=True, **settings)
    assert expected, "the settings should leave some negatives"
    assert sorted((t.anchor, t.positive, t.negative) for t in ours.triplets) == expected
    positives = {(a, p) for a, p in pairs}
    assert all((t.anchor, t.negative) not in positives for t in ours.triplets)


def test_filters_and_ranks_on_known_scores(tmp_path):
    """Vectors at chosen cosines to the anchor, so every rule can be checked by hand."""
    cosines = {"pos": 0.80, "n90": 0.90, "n78": 0.78, "n75": 0.75, "n70": 0.70, "n50": 0.50, "n20": 0.20}
    anchor = np.array([1.0, 0.0, 0.0])
    vectors = np.array([[c, np.sqrt(1 - c * c), 0.0] for c in cosines.values()], dtype=np.float32)
    index = Index.build(tmp_path / "ix", texts=list(cosines), vectors=vectors)

    class FixedEncoder:
        """Anchor "a" and the positive at the cosines above (no model needed)."""
        dim, name = 3, "fixed"

        def encode(self, texts, **_):
            return np.stack([anchor if t == "a" else vectors[list(cosines).index(t)] for t in texts])

    index.use_encoder(FixedEncoder())
    negatives = lambda **kw: [t.negative for t in mine_hard_negatives(index, [("a", "pos")], **kw).triplets]  # noqa
    assert negatives(num_negatives=6) == ["n90", "n78", "n75", "n70", "n50", "n20"]  # positive left out
    assert negatives(num_negatives=2, range_min=1, range_max=7) == ["n78", "n75"]
    assert negatives(num_negatives=6, max_score=0.85) == ["n78", "n75", "n70", "n50", "n20"]
    # absolute: dropped when score + margin > 0.80
    assert negatives(num_negatives=6, absolute_margin=0.03) == ["n75", "n70", "n50", "n20"]
    # relative: dropped when score > 0.80 - 0.80 * 0.05 = 0.76
    assert negatives(num_negatives=6, relative_margin=0.05) == ["n75", "n70", "n50", "n20"]
    assert negatives(num_negatives=6, min_score=0.6) == ["n90", "n78", "n75", "n70"]
    result = mine_hard_negatives(index, [("a", "pos")], num_negatives=3, relative_margin=0.2)
    assert [t.negative for t in result.triplets] == ["n50", "n20"]  # only two survive: fewer, never padded
    assert result.report.short_anchors == 1 and result.report.skipped["relative_margin"] == 4
    assert result.triplets[0].positive_score == pytest.approx(0.80, abs=1e-5)
    assert result.triplets[0].negative_score == pytest.approx(0.50, abs=1e-5)
    drawn = [negatives(num_negatives=2, sampling="random", seed=s) for s in range(12)]
    assert all(set(d) <= {"n90", "n78", "n75", "n70", "n50", "n20"} and len(set(d)) == 2 for d in drawn)
    assert len({tuple(d) for d in drawn}) > 1, "random sampling should not always pick the same negatives"
    assert negatives(num_negatives=2, sampling="random", seed=3) == drawn[3]  # seeded


def test_default_range_and_bad_settings(tmp_path, tiny_encoder):
    assert default_range_max(0, 3, 1, filtered=False) == 4
    assert default_range_max(5, 3, 2, filtered=True) == 37
    index = Index.build(tmp_path / "ix", texts=corpus_texts(10), encoder=tiny_encoder)
    for kwargs, message in [(dict(num_negatives=0), "num_negatives"), (dict(range_min=-1), "range_min"),
                            (dict(range_min=5, range_max=5), "range_max"), (dict(sampling="best"), "sampling"),
                            (dict(num_negatives=5, range_min=2, range_max=4), "cannot take 5")]:
        with pytest.raises(ValueError, match=message):
            mine_hard_negatives(index, [("a", "b")], **kwargs)
    with pytest.raises(ValueError, match="no pairs"):
        mine_hard_negatives(index, [])
    with pytest.raises(ValueError, match=r"pairs\[0\]"):
        mine_hard_negatives(index, [("only one",)])


def test_cli_writes_triplets_the_trainer_reads(tmp_path, tiny_model_dir, capsys):
    corpus = corpus_texts(40)
    (tmp_path / "corpus.txt").write_text("\n".join(corpus) + "\n")
    assert main(["index", "build", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "ix"),
                 "--model", str(tiny_model_dir)]) == 0
    pairs = pairs_from(corpus)
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i, (a, p) in enumerate(pairs):  # both layouts of the trainer's format
            f.write(json.dumps([a, p] if i % 2 else {"texts": [a, p]}) + "\n")
    out = tmp_path / "triplets.jsonl"
    assert main(["mine-negatives", str(tmp_path / "pairs.jsonl"), "--index", str(tmp_path / "ix"), "--out", str(out),
                 "--negatives", "2", "--range-min", "1", "--max-score", "0.9999", "--with-scores"]) == 0
    printed = capsys.readouterr().out
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines and f"{len(lines)} triplet(s)" in printed
    assert all(len(line["texts"]) == 3 and len(line["scores"]) == 2 for line in lines)
    assert all(line["scores"][1] <= 0.9999 for line in lines)
    assert {tuple(line["texts"][:2]) for line in lines} == set(pairs)  # every pair got its negatives
    assert len(lines) == 2 * len(pairs)
    examples = list(itertools.islice(JsonlDataset(DatasetSpec(out, 1)), len(lines)))
    assert {len(e) for e in examples} == {3}

    (tmp_path / "triplets_in.jsonl").write_text(json.dumps(["a", "b", "c"]) + "\n")
    assert main(["mine-negatives", str(tmp_path / "triplets_in.jsonl"), "--index", str(tmp_path / "ix"),
                 "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "pairs" in capsys.readouterr().err
