"""Discrete decisions taken on float scores (a threshold, a margin, a top-k cut, an order), checked with a
tolerance at the boundary, so that tests pass on every CPU and library build, yet fail on a real error.

Two correct implementations (ours and sentence-transformers, numpy and torch, or one library on two CPUs: AMX,
AVX-512 or AVX2 kernels, another BLAS blocking, FMA or not) agree on a cosine to a few float32 ulps, not to the
bit. So an item whose score lies within EPS of a decision boundary may fall either way; everything clear of the
boundary must come out exactly as the reference says. Reference scores are recomputed here in float64 from the
vectors the implementation used.

EPS = 1e-5 for cosine-type scores in [-1, 1]. float32 keeps 24 bits (an ulp is 6e-8 just below 1); a 768-term
float32 dot product summed in another order differs by a few 1e-7, and two fp32 implementations of one model give
embeddings whose cosines differ by ~1e-7 (the tiny test model: 9e-8 at most between ours and sentence-transformers)
to ~1e-6 (real weights). 1e-5 is ten times the largest of these, and a hundred times smaller than what the tests
look for: a margin off by 0.01, another formula, or a candidate window one row short moves decisions by 1e-3 or
more on the test corpora. The helpers also count the items that fell inside the tolerance and fail when there are
more than a few, so a test cannot pass because everything was declared ambiguous.
"""
from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np

EPS = 1e-5


def unit64(x) -> np.ndarray:
    """Rows as float64 unit vectors (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[None] if x.ndim == 1 else x
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-300)


def cosines64(queries, corpus) -> np.ndarray:
    """(Q, N) cosines in float64 (a single query vector gives (1, N))."""
    return unit64(queries) @ unit64(corpus).T


def near(values, boundary: float, eps: float = EPS) -> np.ndarray:
    """Mask of the values within eps of boundary: the decision on them may fall either way."""
    return np.abs(np.asarray(values, dtype=np.float64) - boundary) <= eps


def assert_clear_of(values, boundary: float, eps: float = EPS, what: str = "score") -> None:
    """The data of a test with an exact expectation must keep its decisions clear of the boundary."""
    values = np.asarray(values, dtype=np.float64).ravel()
    close = values[near(values, boundary, eps)]
    assert close.size == 0, (f"{close.size} {what}(s) within {eps:g} of the boundary {boundary}: {close[:5]}; "
                             "the expectation cannot be exact there (choose data clear of it)")


def _as_mapping(scores) -> Mapping[Hashable, float]:
    if isinstance(scores, Mapping):
        return {k: float(v) for k, v in scores.items()}
    return {i: float(v) for i, v in enumerate(np.asarray(scores, dtype=np.float64).ravel())}


def near_ties(scores, k: int, eps: float = EPS) -> set:
    """Keys among the reference top k (and the first one below it) whose score is within eps of a neighbour's: the
    ones a correct top-k may order differently, or swap across the cut."""
    scores = _as_mapping(scores)
    ranked = sorted(scores, key=lambda key: -scores[key])[:k + 1]
    tied = set()
    for a, b in zip(ranked, ranked[1:]):
        if scores[a] - scores[b] <= eps:
            tied |= {a, b}
    return tied


def assert_top_k(got: Sequence[Hashable], scores, k: int | None = None, eps: float = EPS,
                 max_near_ties: int = 2) -> set:
    """`got` (keys, best first) is a top-k of `scores` (key -> reference score, or an array indexed by row), up to
    near-ties: it has min(k, n) distinct keys; the key at each position scores within eps of the reference's score
    at that position (so the order is free only among scores within eps of each other); and no key left out
    scores more than eps above the lowest one kept. k defaults to len(got).

    Fails when more than max_near_ties keys are near-tied at or above the cut (the data would leave too much
    free). Returns the near-tied keys."""
    scores = _as_mapping(scores)
    k = len(got) if k is None else k
    got = list(got)
    assert len(got) == min(k, len(scores)), f"{len(got)} results, expected {min(k, len(scores))}"
    assert len(set(got)) == len(got), f"repeated keys in {got}"
    unknown = [key for key in got if key not in scores]
    assert not unknown, f"keys not in the reference: {unknown[:5]}"
    best = sorted(scores.values(), reverse=True)
    wrong = [(i, key, scores[key], best[i]) for i, key in enumerate(got) if abs(scores[key] - best[i]) > eps]
    assert not wrong, ("out of order beyond the tolerance (position, key, its score, the reference's score there): "
                       f"{wrong[:5]}")
    lowest = min((scores[key] for key in got), default=np.inf)
    chosen = set(got)
    missed = [(key, scores[key]) for key in scores if key not in chosen and scores[key] > lowest + eps]
    assert not missed, f"left out, though above the lowest kept ({lowest:.8f}) by more than {eps:g}: {missed[:5]}"
    tied = near_ties(scores, len(got), eps)
    assert len(tied) <= max_near_ties, (f"{len(tied)} near-tied keys at the top {len(got)}, at most {max_near_ties} "
                                        "expected: the data leaves the ranking too free to test it")
    return tied
