"""Document indexes: long texts stored as chunks, searched as documents ranked by their best chunk.

A document index has the files of a plain one (index.py) with one row per chunk, a document's chunks in
consecutive rows. Its manifest records {"chunk_tokens", "overlap", "documents"}, so `add` chunks new documents
the same way. Each docs.jsonl line is

    {"id": document id, "text": the chunk's passage, "span": [start, end], "metadata": the document's metadata,
     "document": the whole text}               on a document's first chunk
    {... the same without "document" ..., "first": row of the document's first chunk}   on the others

so a hit needs only its own line, and the whole document is one more read (`Index.document_text`).

Search ranks documents by their best chunk's cosine (max aggregation; benchmarks/results/long_documents/ compares
it with the alternatives). It takes the top rows, keeps the first (best) row of each document, and widens the row
window until it has k documents or has seen every row, so the k documents and their scores are the exact max
over chunks whenever the row search is exact.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from allmpnet.encode.documents import ChunkSettings, DocumentChunks

if TYPE_CHECKING:
    from allmpnet.search.index import AnnConfig, Hit, Index

FIRST_WINDOW = 4  # rows looked at per wanted document at first; the window grows by this factor while short


def as_settings(chunking, max_seq_length: int) -> ChunkSettings:
    if chunking is True:
        return ChunkSettings.for_model(max_seq_length)
    if isinstance(chunking, ChunkSettings):
        return chunking
    if isinstance(chunking, dict):
        return ChunkSettings(chunking["chunk_tokens"], chunking["overlap"])
    raise TypeError(f"chunking must be True, a ChunkSettings or None, got {type(chunking).__name__}")


def chunk_rows(ids: Sequence[str], texts: Sequence[str], metadata: Sequence[dict], chunks: DocumentChunks,
               first_row: int) -> list[dict]:
    """The docs.jsonl lines of documents' chunks, the first of them landing at row `first_row`."""
    if len(ids) != len(texts) or len(ids) != len(metadata):
        raise ValueError(f"ids, texts and metadata differ in length ({len(ids)}, {len(texts)}, {len(metadata)})")
    if len(chunks) and (chunks.documents.min() < 0 or chunks.documents.max() >= len(texts)):
        raise ValueError("the chunks do not belong to these documents")
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
        raise ValueError(f"documents without chunks: {missing[:5]}")
    return lines


def _documents_in(texts, ids, metadata, vectors, encoder):
    if vectors is not None:
        raise ValueError("a document index embeds its documents itself (as chunks): give texts, not vectors")
    if texts is None or encoder is None:
        raise ValueError("a document index needs texts and an encoder to embed them")
    texts = list(texts)
    if not texts:
        raise ValueError("nothing to index: no documents given")
    ids = [str(i) for i in range(len(texts))] if ids is None else [str(i) for i in ids]
    metadata = [{}] * len(texts) if metadata is None else list(metadata)
    if not len(ids) == len(texts) == len(metadata):
        raise ValueError(f"ids, texts and metadata differ in length ({len(ids)}, {len(texts)}, {len(metadata)})")
    return texts, ids, metadata


def build_documents(index_cls, root: Path, texts, ids, metadata, vectors, encoder, ann: "AnnConfig",
                    overwrite: bool, batch_size: int | None, chunking) -> "Index":
    from allmpnet.search.index import model_signature, open_writer
    texts, ids, metadata = _documents_in(texts, ids, metadata, vectors, encoder)
    settings = as_settings(chunking, encoder.max_seq_length)
    chunks = encoder.encode_documents(texts, settings.chunk_tokens, settings.overlap, batch_size=batch_size)
    with open_writer(root, dim=encoder.dim, model=model_signature(encoder), ann=ann, overwrite=overwrite,
                     chunking=settings) as writer:
        writer.append_documents(ids, texts, metadata, chunks)
    return index_cls.open(root, encoder=encoder)


def add_documents(index: "Index", texts, ids, metadata, vectors, batch_size: int | None) -> "Index":
    from allmpnet.search.index import open_writer
    texts, ids, metadata = _documents_in(texts, ids, metadata, vectors, index.encoder)
    settings = as_settings(index.chunking, index.encoder.max_seq_length)
    chunks = index.encoder.encode_documents(texts, settings.chunk_tokens, settings.overlap, batch_size=batch_size)
    with open_writer(index.root, extend=True) as writer:
        writer.append_documents(ids, texts, metadata, chunks)
    return type(index).open(index.root, encoder=index._encoder)


def best_rows_per_document(index: "Index", scores: np.ndarray, rows: np.ndarray, k: int) -> list[tuple[int, float]]:
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


def search_documents(index: "Index", q: np.ndarray, k: int, exact: bool) -> list[list["Hit"]]:
    """Top-k documents of each (Q, dim) query vector, each as the hit of its best chunk."""
    k = min(k, index.record_count)
    results: list[list[Hit]] = [[] for _ in range(len(q))]
    window = min(len(index), max(FIRST_WINDOW * k, k + 16))
    pending = list(range(len(q)))
    while pending:
        short = []
        for i, (scores, rows) in zip(pending, index.search_rows(q[pending], window, exact)):
            best = best_rows_per_document(index, scores, rows, k)
            if len(best) < k and window < len(index):
                short.append(i)  # its top rows are chunks of fewer than k documents: look further down
            else:
                results[i] = [index._hit(row, score) for row, score in best]
        pending, window = short, min(len(index), window * FIRST_WINDOW)
    return results
