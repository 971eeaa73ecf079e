"""The tolerant comparisons of tests/boundaries.py: free exactly within EPS of a boundary, strict elsewhere."""
from __future__ import annotations

import numpy as np
import pytest

from boundaries import EPS, assert_clear_of, assert_top_k, near, near_ties

SCORES = {"a": 0.9, "b": 0.8 + 4e-6, "c": 0.8, "d": 0.7, "e": 0.7 - 3 * EPS, "f": 0.1}


def test_top_k_order_is_free_only_among_near_ties():
    assert assert_top_k(["a", "b", "c", "d"], SCORES) == {"b", "c"}
    assert_top_k(["a", "c", "b", "d"], SCORES)  # b and c are 4e-6 apart: either order
    assert_top_k(["a", "c", "b"], SCORES, k=3)
    for wrong in (["b", "a", "c"],          # a is 0.1 above b
                  ["a", "b", "c", "e"],     # d beats e by 3 EPS: e may not stand in for it
                  ["a", "b", "d"],          # c left out
                  ["a", "b", "b"],          # a key twice
                  ["a", "b"]):              # too short for k=3
        with pytest.raises(AssertionError):
            assert_top_k(wrong, SCORES, k=3 if len(wrong) < 4 else 4)
    with pytest.raises(AssertionError, match="not in the reference"):
        assert_top_k(["a", "z"], SCORES)


def test_top_k_over_arrays_and_the_cap_on_near_ties():
    scores = np.array([0.5, 0.9, 0.5 + 1e-6, 0.5 - 1e-6, 0.2])
    assert assert_top_k([1, 3, 0, 2], scores, max_near_ties=3) == {0, 2, 3}
    with pytest.raises(AssertionError, match="too free"):
        assert_top_k([1, 3, 0, 2], scores)  # three near-tied rows, two allowed by default
    assert near_ties(scores, k=1) == set()  # the tie lies below the top 1 and the first row after it
    assert_top_k([1, 0, 2, 3, 4], scores, k=10, max_near_ties=3)  # k capped at the number of rows


def test_clear_of_a_boundary():
    assert near([0.8 - EPS / 2, 0.8 + 2 * EPS, 0.5], 0.8).tolist() == [True, False, False]
    assert_clear_of([0.5, 0.8 + 2 * EPS, 0.99], 0.8)
    with pytest.raises(AssertionError, match="within"):
        assert_clear_of([[0.5, 0.8 + EPS / 2]], 0.8)
