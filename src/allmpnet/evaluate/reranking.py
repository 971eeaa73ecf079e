"""Reranking: order each query's candidates by cosine and score how high the positives land.

Protocol of mteb 1.0: per sample, cosine of the query to every candidate (a query given as several texts
scores a candidate by its best cosine to any of them); average precision (scikit-learn, over all
candidates) and reciprocal rank of the first positive within the top 10; samples without positives or
without negatives are skipped. Main score: MAP (mean AP), ×100. Candidates with equal scores keep their
given order (positives first) for MRR, as mteb's sort did in practice; AP treats ties as sklearn does.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import average_precision_score

from allmpnet.errors import InvalidInput
from allmpnet.evaluate.data import RerankingSample, Task, read_reranking


def rank_metrics(scores: np.ndarray, is_relevant: Sequence[bool], mrr_at_k: int = 10) -> tuple[float, float]:
    """(AP, RR@k) of candidates with these scores; is_relevant marks the positives."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    rr = next((1.0 / rank for rank, i in enumerate(order[:mrr_at_k], start=1) if is_relevant[i]), 0.0)
    return float(average_precision_score(np.asarray(is_relevant, dtype=int), scores)), rr


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def evaluate_reranking(encoder, samples: Sequence[RerankingSample], mrr_at_k: int = 10, batch_size: int = 32,
                       show_progress_bar: bool = False) -> dict[str, float]:
    if not samples:
        raise InvalidInput("reranking needs at least one sample")
    queries = [[s.query] if isinstance(s.query, str) else list(s.query) for s in samples]
    query_vecs = np.asarray(encoder.encode([q for qs in queries for q in qs], batch_size=batch_size,
                                           show_progress_bar=show_progress_bar))
    doc_vecs = np.asarray(encoder.encode([d for s in samples for d in s.positive + s.negative],
                                         batch_size=batch_size, show_progress_bar=show_progress_bar))
    aps, rrs = [], []
    qi = di = 0
    for sample, qs in zip(samples, queries):
        n_docs = len(sample.positive) + len(sample.negative)
        q, d = query_vecs[qi:qi + len(qs)], doc_vecs[di:di + n_docs]  # (Qs, D), (n_docs, D)
        qi, di = qi + len(qs), di + n_docs
        if not sample.positive or not sample.negative:
            continue  # AP is 1 or undefined: no ranking to judge
        scores = _cosine(q, d).max(axis=0)  # (n_docs,)
        ap, rr = rank_metrics(scores, [True] * len(sample.positive) + [False] * len(sample.negative), mrr_at_k)
        aps.append(ap)
        rrs.append(rr)
    if not aps:
        raise InvalidInput("no reranking sample has both positive and negative candidates")
    return {"map": 100 * float(np.mean(aps)), "mrr": 100 * float(np.mean(rrs)), "samples_scored": len(aps)}


def run(task: Task, encoder, batch_size: int = 32, show_progress_bar: bool = False) -> dict[str, float]:
    return evaluate_reranking(encoder, read_reranking(task), batch_size=batch_size,
                              show_progress_bar=show_progress_bar)
