"""Retrieval (BEIR layout): exact cosine search over a corpus streamed in chunks, scored by pytrec_eval.

Protocol of mteb 1.0 (BEIR's exact dense search): a document is `title + " " + text`, stripped; a
query is its text; each query keeps its top 1000 documents by cosine, never a document whose id equals
the query id; nDCG/MAP/recall/precision at 1, 3, 5, 10, 100, 1000 averaged over the judged queries,
plus MRR@10. All figures ×100, as on the model card.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from allmpnet.errors import InvalidInput
from allmpnet.evaluate.data import RetrievalData, Task, read_retrieval

K_VALUES = (1, 3, 5, 10, 100, 1000)


def document_text(doc: dict[str, str]) -> str:
    return (doc.get("title", "") + " " + doc["text"]).strip()


def exact_top_k(queries: np.ndarray | torch.Tensor, doc_chunks: Iterable[np.ndarray | torch.Tensor],
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best k documents per query by cosine, over documents arriving in chunks.

    queries (Q, D); each chunk (C_i, D), rows in corpus order. Returns scores (Q, k') and corpus indices
    (Q, k'), best first, k' = min(k, corpus size). Only one chunk's (Q, C_i) scores exist at a time.
    """
    q = torch.nn.functional.normalize(torch.as_tensor(queries, dtype=torch.float32), dim=-1)  # (Q, D)
    best_scores = torch.empty((q.shape[0], 0))
    best_ids = torch.empty((q.shape[0], 0), dtype=torch.long)
    offset = 0
    for chunk in doc_chunks:
        d = torch.nn.functional.normalize(torch.as_tensor(chunk, dtype=torch.float32), dim=-1)  # (C, D)
        scores = q @ d.T  # (Q, C)
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, top.values], dim=1)  # (Q, <= 2k)
        merged_ids = torch.cat([best_ids, top.indices + offset], dim=1)
        keep = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1)
        best_scores, best_ids = keep.values, torch.gather(merged_ids, 1, keep.indices)
        offset += d.shape[0]
    return best_scores, best_ids


def search(encoder, corpus: dict[str, dict[str, str]], queries: dict[str, str], top_k: int = 1000,
           batch_size: int = 32, corpus_chunk_size: int = 10_000, skip_same_id: bool = True,
           show_progress_bar: bool = False) -> dict[str, dict[str, float]]:
    """{query id: {doc id: cosine}} with each query's top_k documents (a document with the query's id skipped)."""
    if not corpus:
        raise InvalidInput("retrieval needs a non-empty corpus")
    if not queries:
        raise InvalidInput("retrieval needs at least one query")
    query_ids, doc_ids = list(queries), list(corpus)
    query_vectors = encoder.encode([queries[q] for q in query_ids], batch_size=batch_size,
                                   show_progress_bar=show_progress_bar)

    def chunks() -> Iterable[np.ndarray]:
        bar = tqdm(total=len(doc_ids), desc="corpus", unit="doc", disable=not show_progress_bar)
        for start in range(0, len(doc_ids), corpus_chunk_size):
            texts = [document_text(corpus[d]) for d in doc_ids[start:start + corpus_chunk_size]]
            yield encoder.encode(texts, batch_size=batch_size, show_progress_bar=show_progress_bar)
            bar.update(len(texts))
        bar.close()

    # one extra hit per query so that dropping the query's own id still leaves top_k
    scores, ids = exact_top_k(query_vectors, chunks(), top_k + 1 if skip_same_id else top_k)
    results: dict[str, dict[str, float]] = {}
    for row, qid in enumerate(query_ids):
        hits = [(doc_ids[i], float(s)) for i, s in zip(ids[row].tolist(), scores[row].tolist())]
        if skip_same_id:
            hits = [(d, s) for d, s in hits if d != qid]
        results[qid] = dict(hits[:top_k])
    return results


def score_run(qrels: dict[str, dict[str, int]], results: dict[str, dict[str, float]],
              k_values: Sequence[int] = K_VALUES) -> dict[str, float]:
    """nDCG/MAP/recall/precision@k (pytrec_eval, mean over judged queries) and MRR@10, ×100."""
    import pytrec_eval

    cuts = ",".join(map(str, k_values))
    measures = {f"ndcg_cut.{cuts}", f"map_cut.{cuts}", f"recall.{cuts}", f"P.{cuts}"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(results)
    if not per_query:
        raise InvalidInput("no query has both judgements and results")
    out: dict[str, float] = {}
    for ours, theirs in (("ndcg_at", "ndcg_cut"), ("map_at", "map_cut"), ("recall_at", "recall"),
                         ("precision_at", "P")):
        for k in k_values:
            out[f"{ours}_{k}"] = 100 * float(np.mean([m[f"{theirs}_{k}"] for m in per_query.values()]))
    out["mrr_at_10"] = 100 * mrr_at_k(qrels, results, 10)
    return out


def mrr_at_k(qrels: dict[str, dict[str, int]], results: dict[str, dict[str, float]], k: int = 10) -> float:
    """Mean over judged queries of 1/rank of the first relevant document in the top k (0 if none).

    pytrec_eval's recip_rank has no cutoff, hence this. Ties in score keep the run's order.
    """
    total = 0.0
    for qid, judged in qrels.items():
        relevant = {d for d, rel in judged.items() if rel > 0}
        ranked = sorted(results.get(qid, {}).items(), key=lambda hit: -hit[1])[:k]
        total += next((1.0 / rank for rank, (d, _) in enumerate(ranked, start=1) if d in relevant), 0.0)
    return total / len(qrels)


def evaluate_retrieval(encoder, data: RetrievalData, k_values: Sequence[int] = K_VALUES, batch_size: int = 32,
                       corpus_chunk_size: int = 10_000, show_progress_bar: bool = False) -> dict[str, float]:
    if not data.qrels:
        raise InvalidInput("retrieval needs relevance judgements (qrels)")
    results = search(encoder, data.corpus, data.queries, max(k_values), batch_size, corpus_chunk_size,
                     show_progress_bar=show_progress_bar)
    return score_run(data.qrels, results, k_values)


def run(task: Task, encoder, batch_size: int = 32, show_progress_bar: bool = False,
        **options) -> dict[str, float]:
    return evaluate_retrieval(encoder, read_retrieval(task), batch_size=batch_size,
                              show_progress_bar=show_progress_bar, **options)

