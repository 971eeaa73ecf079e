"""Paraphrase mining: the most similar pairs among a set of embeddings, without an (n x n) score matrix."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from allmpnet.errors import InvalidInput
from allmpnet.search.exact import Array, as_matrix, cosine_scores


class Pair(NamedTuple):
    score: float
    i: int  # i < j, rows of the input
    j: int


def paraphrase_mining(embeddings: Array, top_k: int = 100, max_pairs: int = 500_000,
                      min_score: float | None = None, chunk_size: int = 1000) -> list[Pair]:
    """Pairs (score, i, j) with i < j, highest cosine first.

    Each row is compared with all others in chunks; only its top_k neighbours are candidates, so a pair is found
    when either side ranks the other among its top_k. At most max_pairs pairs are kept (the best ones).
    """
    if top_k < 1 or max_pairs < 1 or chunk_size < 1:
        raise InvalidInput("top_k, max_pairs and chunk_size must be at least 1")
    x = as_matrix(embeddings, "embeddings")
    n = len(x)
    if n < 2:
        return []
    k = min(top_k + 1, n)  # +1: a row is its own best neighbour
    kept_keys = np.empty(0, dtype=np.int64)
    kept_scores = np.empty(0, dtype=np.float32)
    for start in range(0, n, chunk_size):
        scores = cosine_scores(x[start:start + chunk_size], x).float()  # (B, n)
        rows = torch.arange(start, start + len(scores), device=scores.device)
        scores[torch.arange(len(scores)), rows] = -torch.inf  # never pair a row with itself
        top = scores.topk(k, dim=1)
        i = rows[:, None].expand_as(top.indices).reshape(-1).cpu().numpy()
        j = top.indices.reshape(-1).cpu().numpy()
        s = top.values.reshape(-1).cpu().numpy()
        valid = np.isfinite(s) if min_score is None else np.isfinite(s) & (s >= min_score)
        lo, hi = np.minimum(i, j)[valid], np.maximum(i, j)[valid]
        kept_keys = np.concatenate([kept_keys, lo.astype(np.int64) * n + hi])
        kept_scores = np.concatenate([kept_scores, s[valid]])
        kept_keys, kept_scores = _best_unique(kept_keys, kept_scores, max_pairs)
    return [Pair(float(s), int(key // n), int(key % n)) for key, s in zip(kept_keys, kept_scores)]


def _best_unique(keys: np.ndarray, scores: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop repeated pairs (found from both ends), sort by score descending, keep the first `limit`."""
    keys, first = np.unique(keys, return_index=True)
    scores = scores[first]
    order = np.lexsort((keys, -scores))[:limit]  # ties broken by pair order, so results are deterministic
    return keys[order], scores[order]
