"""Similarity helpers on vectors whose scores are known by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from allmpnet import cos_sim, dot_score, pairwise_cos_sim, pairwise_dot_score

A = [[1.0, 0.0], [3.0, 4.0]]
B = [[0.0, 2.0], [1.0, 0.0], [-3.0, -4.0]]


@pytest.mark.parametrize("kind", [np.array, torch.tensor])
def test_matrix_scores(kind):
    a, b = kind(A), kind(B)
    cos = cos_sim(a, b)
    assert type(cos) is type(a)
    # rows of A against rows of B: [1,0]·[0,1]=0, [1,0]·[1,0]=1, [1,0]·[-.6,-.8]=-.6; [.6,.8]·… = .8, .6, -1
    np.testing.assert_allclose(np.asarray(cos), [[0.0, 1.0, -0.6], [0.8, 0.6, -1.0]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(dot_score(a, b)), [[0.0, 1.0, -3.0], [8.0, 3.0, -25.0]], atol=1e-6)


@pytest.mark.parametrize("kind", [np.array, torch.tensor])
def test_pairwise_scores(kind):
    a, b = kind(A), kind(B[:2])
    np.testing.assert_allclose(np.asarray(pairwise_cos_sim(a, b)), [0.0, 0.6], atol=1e-6)
    np.testing.assert_allclose(np.asarray(pairwise_dot_score(a, b)), [0.0, 3.0], atol=1e-6)
    with pytest.raises(ValueError, match="equal shapes"):
        pairwise_cos_sim(kind(A), kind(B))


def test_single_vectors_and_zero_vectors():
    assert cos_sim(np.array([1.0, 1.0]), np.array([2.0, 2.0])).shape == (1, 1)
    assert cos_sim(np.array([1.0, 1.0]), np.array([2.0, 2.0]))[0, 0] == pytest.approx(1.0)
    assert cos_sim(np.zeros(2), np.array([1.0, 0.0]))[0, 0] == 0.0  # no NaN for a zero vector
