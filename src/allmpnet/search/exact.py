"""Exact top-k search over a matrix of embeddings, in chunks so no full (queries x corpus) score matrix is built.

The corpus may be a numpy memmap of millions of rows: only `corpus_chunk_size` rows are turned into a tensor at a
time, and a running top-k per query is merged chunk by chunk.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from allmpnet.errors import InvalidInput

Array = np.ndarray | torch.Tensor
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Match(NamedTuple):
    corpus_id: int  # row of the corpus matrix
    score: float


def cosine_scores(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return F.normalize(q, dim=-1) @ F.normalize(c, dim=-1).T


def dot_scores(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return q @ c.T


SCORE_FUNCTIONS: dict[str, ScoreFn] = {"cos": cosine_scores, "dot": dot_scores}


def as_matrix(x: Array | list, name: str) -> torch.Tensor:
    """A 2-D float tensor view of embeddings (a single vector becomes one row); bad shapes fail with a clear error."""
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x)
        if not x.flags.writeable:  # a read-only memmap chunk: copy it (bounded by the chunk size)
            x = np.array(x)
    t = torch.as_tensor(x)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise InvalidInput(f"{name} must be a vector or a (n, dim) matrix, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    return t


def resolve_score_fn(score_function: str | ScoreFn) -> ScoreFn:
    if callable(score_function):
        return score_function
    if score_function not in SCORE_FUNCTIONS:
        raise InvalidInput(f"score_function must be one of {sorted(SCORE_FUNCTIONS)} or a callable, "
                           f"got {score_function!r}")
    return SCORE_FUNCTIONS[score_function]


def topk_scores(query_embeddings: Array, corpus_embeddings: Array, top_k: int = 10,
                score_function: str | ScoreFn = "cos", query_chunk_size: int = 100,
                corpus_chunk_size: int = 100_000) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, d) x (N, d) -> scores (Q, k) and corpus rows (Q, k), best first, k = min(top_k, N)."""
    if top_k < 1:
        raise InvalidInput(f"top_k must be at least 1, got {top_k}")
    if query_chunk_size < 1 or corpus_chunk_size < 1:
        raise InvalidInput("chunk sizes must be at least 1")
    score_fn = resolve_score_fn(score_function)
    queries = as_matrix(query_embeddings, "query_embeddings")
    n_corpus = len(corpus_embeddings)
    if n_corpus == 0:
        raise InvalidInput("the corpus is empty: nothing to search")
    dim = corpus_embeddings.shape[-1] if len(corpus_embeddings.shape) == 2 else None
    if dim != queries.shape[1]:
        raise InvalidInput(f"query dimension {queries.shape[1]} does not match corpus shape "
                           f"{tuple(corpus_embeddings.shape)}")
    k = min(top_k, n_corpus)
    best_scores = torch.full((len(queries), k), -torch.inf, device=queries.device)
    best_rows = torch.zeros((len(queries), k), dtype=torch.long, device=queries.device)
    for c_start in range(0, n_corpus, corpus_chunk_size):
        chunk = as_matrix(corpus_embeddings[c_start:c_start + corpus_chunk_size], "corpus_embeddings")
        chunk = chunk.to(queries.device, queries.dtype)
        for q_start in range(0, len(queries), query_chunk_size):
            q = slice(q_start, q_start + query_chunk_size)
            scores = score_fn(queries[q], chunk).float()  # (Qc, Cc)
            top = scores.topk(min(k, scores.shape[1]), dim=1)
            # merge this chunk's best with the running best; rows are global corpus positions
            merged_scores = torch.cat([best_scores[q], top.values], dim=1)
            merged_rows = torch.cat([best_rows[q], top.indices + c_start], dim=1)
            keep = merged_scores.topk(k, dim=1)
            best_scores[q] = keep.values
            best_rows[q] = merged_rows.gather(1, keep.indices)
    return best_scores, best_rows


def semantic_search(query_embeddings: Array, corpus_embeddings: Array, top_k: int = 10,
                    score_function: str | ScoreFn = "cos", query_chunk_size: int = 100,
                    corpus_chunk_size: int = 100_000) -> list[list[Match]]:
    """For each query, the top_k corpus rows by score (cosine by default), best first."""
    scores, rows = topk_scores(query_embeddings, corpus_embeddings, top_k, score_function,
                               query_chunk_size, corpus_chunk_size)
    return [[Match(int(r), float(s)) for s, r in zip(srow, rrow)]
            for srow, rrow in zip(scores.cpu().tolist(), rows.cpu().tolist())]
