"""Hard-negative mining from an index: the same triplets as sentence-transformers' mine_hard_negatives on one
corpus and model, the filters' rules on hand-made vectors, and the CLI writing triplets the trainer reads."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from allmpnet import Encoder
from allmpnet.cli import main
from allmpnet.search import Index
from allmpnet.search.mining import default_range_max, mine_hard_negatives
from allmpnet.train.data import DatasetSpec, JsonlDataset
from boundaries import EPS, unit64

WORDS = "the cat dog car plant sun moon world text search query sentence example hello test".split()


def corpus_texts(n: int = 60, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = {" ".join(rng.choice(WORDS, size=int(rng.integers(3, 8)))) for _ in range(3 * n)}
    return sorted(texts)[:n]


def pairs_from(corpus: list[str]) -> list[tuple[str, str]]:
    """Anchors are short texts; the first three anchors have two positives each (exercises the grouping); the last
    anchor is itself a corpus text (it must never be its own negative)."""
    anchors = ["the cat and the dog", "sun and moon", "a search query", "hello world example", "the plant car test"]
    pairs = [(a, corpus[3 * i]) for i, a in enumerate(anchors)]
    pairs += [(a, corpus[3 * i + 1]) for i, a in enumerate(anchors[:3])]
    pairs.append((corpus[20], corpus[21]))
    return pairs


def grouped(pairs) -> dict[str, list[str]]:
    """Each anchor's distinct positives, in first-seen order."""
    groups: dict[str, list[str]] = {}
    for anchor, positive in pairs:
        if positive not in groups.setdefault(anchor, []):
            groups[anchor].append(positive)
    return groups


def negatives_by_anchor(triplets, groups: dict[str, list[str]]) -> dict[str, frozenset]:
    """Each anchor's negatives, checking that every positive of the anchor got the same ones, once each."""
    triplets = list(triplets)
    assert len(set(triplets)) == len(triplets), "a triplet repeated"
    found: dict[tuple[str, str], set] = {(a, p): set() for a, ps in groups.items() for p in ps}
    for anchor, positive, negative in triplets:
        assert (anchor, positive) in found, f"triplet of an unknown pair: {(anchor, positive)}"
        found[(anchor, positive)].add(negative)
    result = {}
    for anchor, positives in groups.items():
        sets = {frozenset(found[(anchor, p)]) for p in positives}
        assert len(sets) == 1, f"the positives of {anchor!r} got different negatives: {sets}"
        result[anchor] = sets.pop()
    return result


def allowed_negatives(index: Index, groups: dict[str, list[str]], num_negatives: int, range_min: int = 0,
                      range_max: int | None = None, absolute_margin: float | None = None,
                      relative_margin: float | None = None, max_score: float | None = None,
                      min_score: float | None = None, eps: float = EPS):
    """The rules of sentence-transformers' mine_hard_negatives ("top" sampling, triplets; as in 6.3, where the
    query is never its own negative and has a row of the window kept for it, which earlier releases did not),
    replayed in float64 on the index's vectors: for each anchor, every set of negatives they allow when each
    decision within eps of its boundary may fall either way; and each anchor's count of such decisions.

    The decisions: which rows make the candidate window (its top range_max + max positives + 1 by cosine, the
    extra row leaving room for the anchor itself), each filter's comparison (score + absolute_margin > lowest
    positive score; score > lowest - |lowest| x relative_margin; score > max_score; score < min_score), and the
    rank cuts of the survivors (range_min, then num_negatives). A filter comparison within eps may go either way;
    rows whose cosines are within eps of each other may come in any order (so across any cut)."""
    max_positives = max(map(len, groups.values()))
    if range_max is None:
        filtered = any(v is not None for v in (absolute_margin, relative_margin, max_score))
        range_max = range_min + num_negatives * (10 if filtered else 1) + max_positives
    window = range_max + max_positives + 1
    texts = [line["text"] for line in index.iter_docs()]
    row_of = {t: r for r, t in enumerate(texts)}
    vectors = unit64(np.asarray(index.vectors))
    anchors = list(groups)
    scores = unit64(index.encoder.encode(anchors)) @ vectors.T
    allowed, ambiguous = {}, {}
    for a, anchor in enumerate(anchors):
        s = scores[a]
        lowest = min(s[row_of[p]] for p in groups[anchor])  # the positives are records of this index
        excluded = {row_of[t] for t in groups[anchor] + [anchor] if t in row_of}
        order = [int(r) for r in np.argsort(-s, kind="stable")]
        # runs of rows whose neighbouring cosines are within eps: their order is free
        runs, start = [], 0
        for i in range(1, len(order) + 1):
            if i == len(order) or s[order[i - 1]] - s[order[i]] > eps:
                runs.append(order[start:i])
                start = i
        kept, reach = [], 0  # the runs that reach into the window; rows after them are never candidates
        for run in runs:
            if reach >= window:
                break
            kept.append(run)
            reach += len(run)
        runs = kept
        survives = {}  # row -> (True,) / (False,) / (True, False)
        for r in order[:reach]:
            if r in excluded:
                continue
            tests = []  # (distance past the boundary in the dropping direction)
            if absolute_margin is not None:
                tests.append(s[r] + absolute_margin - lowest)
            if relative_margin is not None:
                tests.append(s[r] - (lowest - abs(lowest) * relative_margin))
            if max_score is not None:
                tests.append(s[r] - max_score)
            if min_score is not None:
                tests.append(min_score - s[r])
            if any(t > eps for t in tests):
                survives[r] = (False,)
            elif any(abs(t) <= eps for t in tests):
                survives[r] = (True, False)
            else:
                survives[r] = (True,)
        free_rows = [r for r, choices in survives.items() if len(choices) == 2]
        tied_runs = [run for run in runs if len(run) > 1]
        ambiguous[anchor] = len(free_rows) + sum(len(run) for run in tied_runs)
        combinations = 2 ** len(free_rows) * math.prod(math.factorial(len(run)) for run in tied_runs)
        assert combinations <= 4096, f"{anchor!r}: {combinations} ways to settle its near-boundary decisions"
        outcomes = set()
        for orders in itertools.product(*[itertools.permutations(run) for run in runs]):
            ranked = [r for run in orders for r in run][:window]
            for flips in itertools.product((True, False), repeat=len(free_rows)):
                alive = {**{r: c[0] for r, c in survives.items()}, **dict(zip(free_rows, flips))}
                survivors = [r for r in ranked if r not in excluded and alive[r]]
                chosen = survivors[range_min:range_max][:num_negatives]
                outcomes.add(frozenset(texts[r] for r in chosen))
        allowed[anchor] = outcomes
    return allowed, ambiguous


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model_dir):
    return Encoder(tiny_model_dir, device="cpu")


@pytest.mark.parametrize("settings", [
    dict(num_negatives=3),
    dict(num_negatives=2, range_min=2, range_max=12),
    dict(num_negatives=3, relative_margin=0.05),
    dict(num_negatives=2, absolute_margin=0.02, max_score=0.97, range_max=30),
    dict(num_negatives=4, range_min=1, range_max=25, min_score=0.5),
    dict(num_negatives=4, range_min=8, range_max=25, min_score=0.695),  # min_score leaves some anchors short
    dict(num_negatives=3, max_score=0.8),  # max_score drops the best candidates of some anchors
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
    got = sorted((t.anchor, t.positive, t.negative) for t in ours.triplets)
    groups = grouped(pairs)
    mine, theirs_by_anchor = negatives_by_anchor(got, groups), negatives_by_anchor(expected, groups)
    # the two libraries' cosines agree to ~1e-7, not to the bit: a decision within EPS of its boundary may differ
    # between them (or between CPUs); every other one must be the same, and so must its knock-on effects
    allowed, ambiguous = allowed_negatives(index, groups, **settings)
    for anchor in groups:
        note = (f"{anchor!r}: ours {sorted(mine[anchor])}, sentence-transformers {sorted(theirs_by_anchor[anchor])}, "
                f"allowed {[sorted(o) for o in allowed[anchor]]}")
        assert theirs_by_anchor[anchor] in allowed[anchor], "the float64 replay disagrees with theirs: " + note
        assert mine[anchor] in allowed[anchor], note
    assert sum(ambiguous.values()) <= 4, f"too many decisions within {EPS:g} of their boundary: {ambiguous}"
    if not any(ambiguous.values()):
        assert got == expected
    positives = {(a, p) for a, p in pairs}
    assert all((t.anchor, t.negative) not in positives and t.negative != t.anchor for t in ours.triplets)


def index_at_cosines(root, cosines: dict[str, float]) -> Index:
    """An index of texts whose vectors lie at the given cosines to the anchor "a" (no model needed)."""
    anchor = np.array([1.0, 0.0, 0.0])
    vectors = np.array([[c, np.sqrt(1 - c * c), 0.0] for c in cosines.values()], dtype=np.float32)
    index = Index.build(root, texts=list(cosines), vectors=vectors)

    class FixedEncoder:
        dim, name = 3, "fixed"

        def encode(self, texts, **_):
            return np.stack([anchor if t == "a" else vectors[list(cosines).index(t)] for t in texts])

    index.use_encoder(FixedEncoder())
    return index


def test_replay_lets_only_near_boundary_decisions_go_either_way(tmp_path):
    """The tolerance of the comparison above, on a candidate at a margin's boundary and two near-tied ones."""
    index = index_at_cosines(tmp_path / "ix", {"pos": 0.80, "n90": 0.90, "b78": 0.78, "n75": 0.75,
                                               "t70": 0.70, "t70+": 0.70 + 3e-6, "n50": 0.50})
    groups = {"a": ["pos"]}
    # b78 + 0.02 is the positive's 0.80: kept or dropped; t70 and t70+ may come in either order
    allowed, ambiguous = allowed_negatives(index, groups, num_negatives=2, absolute_margin=0.02)
    assert allowed["a"] == {frozenset({"b78", "n75"}), frozenset({"n75", "t70"}), frozenset({"n75", "t70+"})}
    assert ambiguous == {"a": 3}
    mined = mine_hard_negatives(index, [("a", "pos")], num_negatives=2, absolute_margin=0.02)
    assert frozenset(t.negative for t in mined.triplets) in allowed["a"]
    allowed, _ = allowed_negatives(index, groups, num_negatives=1, absolute_margin=0.02)
    assert allowed["a"] == {frozenset({"b78"}), frozenset({"n75"})}
    # no cut between the near-tied pair, every filter clear of its boundary: one outcome only (the pair is
    # counted as ambiguous all the same)
    allowed, ambiguous = allowed_negatives(index, groups, num_negatives=3, absolute_margin=0.03)
    assert allowed["a"] == {frozenset({"n75", "t70", "t70+"})} and ambiguous == {"a": 2}
    allowed, _ = allowed_negatives(index, groups, num_negatives=3, range_min=1, max_score=0.85)
    assert allowed["a"] == {frozenset({"n75", "t70", "t70+"})}
    # unfiltered, the window is the top 1 + 1 + 1 + 1 rows: the near-tied pair is outside it
    allowed, ambiguous = allowed_negatives(index, groups, num_negatives=1, min_score=0.6)
    assert allowed["a"] == {frozenset({"n90"})} and ambiguous == {"a": 0}


def test_filters_and_ranks_on_known_scores(tmp_path):
    """Vectors at chosen cosines to the anchor, so every rule can be checked by hand."""
    cosines = {"pos": 0.80, "n90": 0.90, "n78": 0.78, "n75": 0.75, "n70": 0.70, "n50": 0.50, "n20": 0.20}
    index = index_at_cosines(tmp_path / "ix", cosines)
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
