"""Document indexes: long texts stored as chunks, searched as documents ranked by their best chunk.

A document index has the files of a plain one (index.py) with one row per chunk, a document's chunks in
consecutive rows. Its manifest records {"chunk_tokens", "overlap", "documents"}, so `add` chunks new documents
the same way. Each docs.jsonl line is

    {"id": document id, "text": the chunk's passage, "span": [start, end], "metadata": the document's metadata,
     "document": the whole text}               on a document's first chunk
    {... the same without "document" ..., "first": row of the document's first chunk}   on the others

so a hit needs only its own line, and the whole document is one more read (`Index.document_text`). This module
holds the rules; index.py calls them, and they use only the index's public API (search_rows, doc, len).

Search ranks documents by their best chunk's cosine (max aggregation; benchmarks/results/long_documents/ compares
it with the alternatives). It takes the top rows, keeps the first (best) row of each document, and widens the row
window until it has k documents or has seen every row, so the k documents and their scores are the exact max
over chunks whenever the row search is exact.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from allmpnet.encode.documents import ChunkSettings, DocumentChunks
from allmpnet.errors import InvalidInput, InvalidInputType

FIRST_WINDOW = 4  # rows looked at per wanted document at first; the window grows by this factor while short


def as_settings(chunking, max_seq_length: int) -> ChunkSettings:
    if chunking is True:
        return ChunkSettings.for_model(max_seq_length)
    if isinstance(chunking, ChunkSettings):
        return chunking
    if isinstance(chunking, dict):
        return ChunkSettings(chunking["chunk_tokens"], chunking["overlap"])
    raise InvalidInputType(f"chunking must be True, a ChunkSettings or None, got {type(chunking).__name__}")


def chunk_rows(ids: Sequence[str], texts: Sequence[str], metadata: Sequence[dict], chunks: DocumentChunks,
               first_row: int) -> list[dict]:
    """The docs.jsonl lines of documents' chunks, the first of them landing at row `first_row`."""
    if len(ids) != len(texts) or len(ids) != len(metadata):
        raise InvalidInput(f"ids, texts and metadata differ in length ({len(ids)}, {len(texts)}, {len(metadata)})")
    if len(chunks) and (chunks.documents.min() < 0 or chunks.documents.max() >= len(texts)):
        raise InvalidInput("the chunks do not belong to these documents")
    lines: list[dict] = []
    start_of: dict[int, int] = {}
    for offset, (doc, (start, end)) in enumerate(zip(chunks.documents.tolist(), chunks.spans.tolist())):
        line = {"id": ids[doc], "text": texts[doc][start:end], "span": [start, end], "metadata": metadata[doc]}
        if doc in start_of:
            line["first"] = start_of[doc]
        else:
            start_of[doc] = first_row + offset
            line["document"] = texts[doc]
        lines.append(line)
    missing = [ids[d] for d in range(len(ids)) if d not in start_of]
    if missing:
        raise InvalidInput(f"documents without chunks: {missing[:5]}")
    return lines


def documents_in(texts, ids, metadata, vectors, encoder) -> tuple[list[str], list[str], list[dict]]:
    """(texts, ids, metadata) of documents to index, checked; ids default to "0".."n-1"."""
    if vectors is not None:
        raise InvalidInput("a document index embeds its documents itself (as chunks): give texts, not vectors")
    if texts is None or encoder is None:
        raise InvalidInput("a document index needs texts and an encoder to embed them")
    texts = list(texts)
    if not texts:
        raise InvalidInput("nothing to index: no documents given")
    ids = [str(i) for i in range(len(texts))] if ids is None else [str(i) for i in ids]
    metadata = [{}] * len(texts) if metadata is None else list(metadata)
    if not len(ids) == len(texts) == len(metadata):
        raise InvalidInput(f"ids, texts and metadata differ in length ({len(ids)}, {len(texts)}, {len(metadata)})")
    return texts, ids, metadata


def best_rows_per_document(index, scores: np.ndarray, rows: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(row, score) of the first row of each document among rows (best first), at most k documents."""
    seen: set[str] = set()
    best: list[tuple[int, float]] = []
    for score, row in zip(scores.tolist(), rows.tolist()):
        doc_id = index.doc(row)["id"]
        if doc_id not in seen:
            seen.add(doc_id)
            best.append((row, score))
            if len(best) == k:
                break
    return best


def search_documents(index, q: np.ndarray, k: int, exact: bool) -> list[list[tuple[int, float]]]:
    """Top-k documents of each (Q, dim) query vector of a document index: the (row, score) of each one's best
    chunk."""
    k = min(k, index.record_count)
    results: list[list[tuple[int, float]]] = [[] for _ in range(len(q))]
    window = min(len(index), max(FIRST_WINDOW * k, k + 16))
    pending = list(range(len(q)))
    while pending:
        short = []
        for i, (scores, rows) in zip(pending, index.search_rows(q[pending], window, exact)):
            best = best_rows_per_document(index, scores, rows, k)
            if len(best) < k and window < len(index):
                short.append(i)  # its top rows are chunks of fewer than k documents: look further down
            else:
                results[i] = best
        pending, window = short, min(len(index), window * FIRST_WINDOW)
    return results
