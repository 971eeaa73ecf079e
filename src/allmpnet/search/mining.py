"""Hard-negative mining: for each (anchor, positive) pair, texts from an index that look relevant but are not.

The selection follows sentence-transformers' `mine_hard_negatives` (its "triplet" output), so the same settings
pick the same negatives (tests/test_mining.py runs both on one corpus):

1. Pairs are grouped by anchor: an anchor with several positives is embedded and searched once, and every one of
   its positives is excluded from its candidates.
2. Candidates: the anchor's top `range_max + most positives of any anchor + 1` rows of the index, by cosine (the
   extra row leaves room for the anchor itself, as sentence-transformers does since it excludes the query).
3. Filters, each on every candidate: positives and the anchor's own text out; `absolute_margin` drops a candidate
   scoring above (lowest positive score of the anchor - margin); `relative_margin` drops one above
   (lowest positive score - |lowest positive score| x margin); then `max_score` and `min_score`.
4. The survivors, best first, lose their first `range_min` (candidates too close to be trusted as negatives) and
   are cut at `range_max`; `num_negatives` are taken from the top ("top") or drawn at random ("random").
5. Each (anchor, positive) pair of the anchor gets one triplet per negative found; an anchor with fewer survivors
   than `num_negatives` gets fewer triplets (counted in the report, never padded).

A candidate is a positive (or the anchor itself) when its stored text equals the positive's (the anchor's) text
(for a chunked index: the document's text or the matching passage). Positive scores use the stored vector of a
positive that is a record of the index and embed the others with the index's model, so a positive need not be in
the index.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
from tqdm.auto import tqdm

from allmpnet.errors import InvalidInput

if TYPE_CHECKING:
    from allmpnet.search.index import Index

SEARCH_BATCH = 256  # anchors searched together (bounds the score matrix of an exact search)


@dataclass
class Triplet:
    anchor: str
    positive: str
    negative: str
    positive_score: float
    negative_score: float


@dataclass
class MiningReport:
    pairs: int = 0                 # (anchor, positive) pairs given
    anchors: int = 0               # distinct anchors
    range_max: int = 0             # the candidate window used (given, or derived as sentence-transformers does)
    candidates: int = 0            # candidates looked at, positives included
    skipped: Counter = field(default_factory=Counter)  # filter name -> candidates it removed
    short_anchors: int = 0         # anchors that got fewer than num_negatives negatives
    triplets: int = 0

    def summary(self) -> str:
        lines = [f"{self.pairs} pairs, {self.anchors} distinct anchors; candidates: top {self.range_max} of the "
                 f"index per anchor (plus room for its positives and itself)"]
        for name, count in self.skipped.items():
            lines.append(f"skipped {count} candidate(s) ({count / max(1, self.candidates):.1%}) by {name}")
        if self.short_anchors:
            lines.append(f"{self.short_anchors} anchor(s) got fewer negatives than asked (widen --range-max or "
                         "loosen the margins / --max-score)")
        lines.append(f"{self.triplets} triplet(s)")
        return "\n".join(lines)


@dataclass
class MiningResult:
    triplets: list[Triplet]
    report: MiningReport


def default_range_max(range_min: int, num_negatives: int, max_positives: int, filtered: bool) -> int:
    """sentence-transformers' window when none is given: room for the skipped, the positives and, when filters may
    drop candidates, ten candidates per negative wanted."""
    return range_min + num_negatives * (10 if filtered else 1) + max_positives


def group_pairs(pairs: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """Distinct anchors in first-seen order, and each one's distinct positives in first-seen order."""
    positives: dict[str, list[str]] = {}
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not all(isinstance(t, str) for t in pair):
            raise InvalidInput(f"pairs[{i}] must be (anchor, positive) strings, got {pair!r}")
        anchor, positive = pair
        known = positives.setdefault(anchor, [])
        if positive not in known:
            known.append(positive)
    return list(positives), list(positives.values())


def mine_hard_negatives(index: "Index", pairs: Sequence[Sequence[str]], num_negatives: int = 1,
                        range_min: int = 0, range_max: int | None = None, absolute_margin: float | None = None,
                        relative_margin: float | None = None, max_score: float | None = None,
                        min_score: float | None = None, sampling: Literal["top", "random"] = "top",
                        seed: int = 0, exact: bool | None = None, batch_size: int = 32,
                        show_progress_bar: bool | None = None) -> MiningResult:
    """(anchor, positive, negative) triplets with negatives from `index` (see the module docstring for the rules).

    exact as in `Index.search` (None: exact for small indexes). Anchors and positives are embedded with the index's
    model (`index.encoder`).
    """
    if not pairs:
        raise InvalidInput("no pairs to mine negatives for")
    if num_negatives < 1:
        raise InvalidInput(f"num_negatives must be at least 1, got {num_negatives}")
    if range_min < 0:
        raise InvalidInput(f"range_min must be at least 0, got {range_min}")
    if sampling not in ("top", "random"):
        raise InvalidInput(f"sampling must be 'top' or 'random', got {sampling!r}")
    anchors, positives = group_pairs(pairs)
    max_positives = max(map(len, positives))
    filtered = any(v is not None for v in (absolute_margin, relative_margin, max_score))
    if range_max is None:
        range_max = default_range_max(range_min, num_negatives, max_positives, filtered)
    if range_max <= range_min:
        raise InvalidInput(f"range_max ({range_max}) must be above range_min ({range_min})")
    if num_negatives > range_max - range_min:
        raise InvalidInput(f"cannot take {num_negatives} negatives from ranks {range_min}..{range_max}: widen the "
                           "range or ask for fewer")
    report = MiningReport(pairs=len(pairs), anchors=len(anchors), range_max=range_max)
    encoder = index.encoder
    show = len(anchors) > 256 if show_progress_bar is None else show_progress_bar
    anchor_vectors = encoder.encode(anchors, batch_size=batch_size, show_progress_bar=show)
    flat_positives = [p for group in positives for p in group]
    positive_vectors = _positive_vectors(index, flat_positives, batch_size, show)
    positive_scores = np.einsum("ij,ij->i", _unit(np.repeat(anchor_vectors, list(map(len, positives)), axis=0)),
                                _unit(positive_vectors))
    rng = np.random.default_rng(seed)
    triplets: list[Triplet] = []
    n_candidates = range_max + max_positives + 1  # + 1: room for the anchor itself, never its own negative
    first_positive = np.cumsum([0] + [len(p) for p in positives])
    with tqdm(total=len(anchors), desc="mining negatives", unit="anchor", disable=not show) as bar:
        for start in range(0, len(anchors), SEARCH_BATCH):
            stop = min(start + SEARCH_BATCH, len(anchors))
            hits = index.search(anchor_vectors[start:stop], k=min(n_candidates, index.record_count), exact=exact)
            for a, anchor_hits in zip(range(start, stop), hits):
                scores_of_positives = positive_scores[first_positive[a]:first_positive[a + 1]]
                excluded = set(positives[a]) | {anchors[a]}
                negatives = _select(index, anchor_hits, excluded, float(scores_of_positives.min()), report,
                                    range_min, range_max, num_negatives, absolute_margin, relative_margin, max_score,
                                    min_score, sampling, rng)
                if len(negatives) < num_negatives:
                    report.short_anchors += 1
                for positive, positive_score in zip(positives[a], scores_of_positives):
                    triplets.extend(Triplet(anchors[a], positive, text, float(positive_score), score)
                                    for text, score in negatives)
            bar.update(stop - start)
    report.triplets = len(triplets)
    return MiningResult(triplets, report)


def _select(index: "Index", hits, excluded: set[str], lowest_positive: float, report: MiningReport, range_min: int,
            range_max: int, num_negatives: int, absolute_margin: float | None, relative_margin: float | None,
            max_score: float | None, min_score: float | None, sampling: str,
            rng: np.random.Generator) -> list[tuple[str, float]]:
    """One anchor's negatives, best first, from its hits (already best first); `excluded`: its positives and itself."""
    report.candidates += len(hits)
    survivors: list[tuple[str, float]] = []
    for hit in hits:
        text, score = hit.text, hit.score
        if text in excluded or (index.chunking and index.document_text(hit.row) in excluded):
            continue
        reason = None
        if absolute_margin is not None and score + absolute_margin > lowest_positive:
            reason = "absolute_margin"
        elif relative_margin is not None and score > lowest_positive - abs(lowest_positive) * relative_margin:
            reason = "relative_margin"
        elif max_score is not None and score > max_score:
            reason = "max_score"
        elif min_score is not None and score < min_score:
            reason = "min_score"
        if reason is not None:
            report.skipped[reason] += 1
            continue
        survivors.append((text, score))
    window = survivors[range_min:range_max]
    if sampling == "top" or len(window) <= num_negatives:
        return window[:num_negatives]
    chosen = np.sort(rng.choice(len(window), size=num_negatives, replace=False))
    return [window[i] for i in chosen]


def _positive_vectors(index: "Index", positives: list[str], batch_size: int, show: bool) -> np.ndarray:
    """Positives' vectors: the stored ones for positives that are records of a plain index (the same model made
    them, as sentence-transformers scores positives from its corpus embeddings), the rest embedded now."""
    rows = {}
    if not index.chunking:
        wanted = set(positives)
        rows = {line["text"]: row for row, line in enumerate(index.iter_docs()) if line["text"] in wanted}
    vectors = np.empty((len(positives), index.dim), dtype=np.float32)
    missing = [i for i, p in enumerate(positives) if p not in rows]
    found = [i for i, p in enumerate(positives) if p in rows]
    if found:
        vectors[found] = np.asarray(index.vectors[[rows[positives[i]] for i in found]])
    if missing:
        vectors[missing] = index.encoder.encode([positives[i] for i in missing], batch_size=batch_size,
                                                show_progress_bar=show)
    return vectors


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
