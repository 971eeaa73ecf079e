"""Cosine and dot-product scores between embeddings, for numpy arrays and torch tensors alike.

The matrix forms score every row of `a` against every row of `b` -> (len(a), len(b)); the pairwise forms
score row i of `a` against row i of `b` -> (n,). The result has the type of `a`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from allmpnet.errors import InvalidInput

Array = np.ndarray | torch.Tensor


def _as_2d(x: Array | list) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if isinstance(x, list) else x)
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = t.float()
    return t.unsqueeze(0) if t.dim() == 1 else t


def _like(result: torch.Tensor, template: Array | list) -> Array:
    return result if isinstance(template, torch.Tensor) else result.cpu().numpy()


def cos_sim(a: Array, b: Array) -> Array:
    """(n, d) x (m, d) -> (n, m) cosine similarities."""
    x, y = _as_2d(a), _as_2d(b)
    return _like(F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T, a)


def dot_score(a: Array, b: Array) -> Array:
    """(n, d) x (m, d) -> (n, m) dot products."""
    return _like(_as_2d(a) @ _as_2d(b).T, a)


def pairwise_cos_sim(a: Array, b: Array) -> Array:
    """(n, d), (n, d) -> (n,) cosine of each row pair."""
    x, y = _check_pairs(a, b)
    return _like((F.normalize(x, dim=-1) * F.normalize(y, dim=-1)).sum(dim=-1), a)


def pairwise_dot_score(a: Array, b: Array) -> Array:
    """(n, d), (n, d) -> (n,) dot product of each row pair."""
    x, y = _check_pairs(a, b)
    return _like((x * y).sum(dim=-1), a)


def _check_pairs(a: Array, b: Array) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_2d(a), _as_2d(b)
    if x.shape != y.shape:
        raise InvalidInput(f"pairwise scores need equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    return x, y
