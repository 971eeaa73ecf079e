"""Long-document retrieval: one vector per document (its first 384 word pieces) against chunked document indexes.

    nice -n 10 python benchmarks/long_documents.py --precision bf16 --settings 128:16,256:32,384:48 \\
        --out benchmarks/results/long_documents/results.json

Documents and queries are in benchmarks/data/long_documents.json: each document bundles the help texts (pydoc,
plain text) of 2-4 standard-library modules of this Python, like the chapters of a manual (1,000-2,000 words);
each query asks about a function or module whose text starts past the document's first 382 word pieces (the
script checks it), so the truncated vector never saw the answer. A query is answered when its document is among
the top k documents (recall@k; one relevant document per query).

For each setting it builds a real index (timed: chunking, embedding and writing), searches it with the index's
own search (exact), and reports recall@1, recall@10, MRR@10, chunks and bytes. For the first chunked setting it
also ranks documents by other aggregations of their chunks' scores (mean, mean of the best two), from the same
vectors.
"""
from __future__ import annotations

import argparse
import json
import platform
import pydoc
import re
import shutil
import sys
import tempfile
import time
import warnings
from importlib import import_module
from pathlib import Path

import numpy as np

from allmpnet import Encoder, TruncationWarning
from allmpnet.encode.documents import ChunkSettings
from allmpnet.search import Index

DATA = Path(__file__).resolve().parent / "data" / "long_documents.json"
# machine-specific sections of pydoc's text (a file path, a versioned URL): left out so the text is the module's
LOCAL_SECTIONS = re.compile(r"^(FILE|MODULE REFERENCE)\n(?:(?: {4}.*)?\n)*", re.M)


def module_help(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules (imp, asynchat, ...) still have their help
        module = import_module(name)
    return LOCAL_SECTIONS.sub("", pydoc.render_doc(module, renderer=pydoc.plaintext)).strip()


def build_documents(spec: dict) -> list[str]:
    return ["\n\n".join(module_help(name) for name in modules) for modules in spec["documents"]]


def check_queries(encoder: Encoder, docs: list[str], queries: list[dict]) -> None:
    """Every query's answer must start past the word pieces the truncated vector reads."""
    pieces = encoder.max_seq_length - 2
    for q, encoding in zip(queries, encoder.tokenizer.tokenize_whole([docs[q["doc"]] for q in queries])):
        cut = encoding.offsets[pieces - 1][1] if len(encoding.offsets) >= pieces else len(docs[q["doc"]])
        where = docs[q["doc"]].find(q["marker"])
        if where < 0:
            raise ValueError(f"{q['marker']!r} is not in document {q['doc']} (another Python version?)")
        if where < cut:
            raise ValueError(f"{q['marker']!r} starts at character {where} of document {q['doc']}, inside its "
                             f"first {pieces} word pieces (which end at character {cut})")


def ranks(hit_ids: list[list[str]], targets: list[str]) -> np.ndarray:
    """1-based rank of each query's document among its hits (0: not in them)."""
    return np.array([ids.index(t) + 1 if t in ids else 0 for ids, t in zip(hit_ids, targets)])


def scores_of(found: np.ndarray) -> dict:
    return {"recall_at_1": round(float(np.mean(found == 1)), 3),
            "recall_at_10": round(float(np.mean((found >= 1) & (found <= 10))), 3),
            "mrr_at_10": round(float(np.mean(np.where((found >= 1) & (found <= 10), 1 / np.maximum(found, 1), 0))),
                               3)}


def aggregations(index: Index, query_vectors: np.ndarray, targets: list[str]) -> dict:
    """Documents ranked by max, mean and mean-of-best-two of their chunks' cosines (same chunk vectors)."""
    doc_of_row = np.array([line["id"] for line in index.iter_docs()])
    doc_ids = list(dict.fromkeys(doc_of_row.tolist()))
    vectors = np.asarray(index.vectors)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = query_vectors / np.linalg.norm(query_vectors, axis=1, keepdims=True)
    cos = q @ unit.T  # (Q, rows)
    rules = {"max": lambda s: s.max(), "mean": lambda s: s.mean(),
             "mean_of_best_2": lambda s: np.sort(s)[-2:].mean()}
    out = {}
    for name, rule in rules.items():
        per_doc = np.stack([[rule(row[doc_of_row == d]) for d in doc_ids] for row in cos])  # (Q, docs)
        order = np.argsort(-per_doc, axis=1)[:, :10]
        out[name] = scores_of(ranks([[doc_ids[i] for i in row] for row in order], targets))
    return out


def run(args: argparse.Namespace) -> dict:
    spec = json.loads(DATA.read_text())
    docs = build_documents(spec)
    queries = spec["queries"]
    encoder = Encoder(args.model, device="cpu", precision=args.precision)
    check_queries(encoder, docs, queries)
    words = [len(d.split()) for d in docs]
    outside = [(i, n) for i, n in enumerate(words) if not 1000 <= n <= 5000]
    if outside:
        raise ValueError(f"documents outside 1,000-5,000 words (index, words): {outside}")
    pieces = [len(e.ids) for e in encoder.tokenizer.tokenize_whole(docs)]
    ids = [f"doc{i:02d}" for i in range(len(docs))]
    targets = [ids[q["doc"]] for q in queries]
    query_vectors = encoder.encode([q["query"] for q in queries])
    result = {"python": platform.python_version(), "model": args.model, "precision": args.precision,
              "documents": len(docs), "queries": len(queries), "words": [min(words), int(np.mean(words)), max(words)],
              "word_pieces": [min(pieces), int(np.mean(pieces)), max(pieces)], "settings": {}}
    print(f"{len(docs)} documents ({min(words)}-{max(words)} words, {min(pieces)}-{max(pieces)} word pieces), "
          f"{len(queries)} queries answered past word piece {encoder.max_seq_length - 2}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="long-docs-"))
    try:
        settings = [None] + [ChunkSettings(*map(int, s.split(":"))) for s in args.settings.split(",")]
        for setting in settings:
            name = "truncated (first 384 tokens)" if setting is None else \
                f"chunked {setting.chunk_tokens}/{setting.overlap}"
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TruncationWarning)  # the point of the truncated baseline
                index = Index.build(work / name.split()[0] / str(len(result["settings"])), texts=docs, ids=ids,
                                    encoder=encoder, chunking=setting)
            took = time.perf_counter() - start
            hits = index.search(query_vectors, k=10, exact=True)
            row = {**scores_of(ranks([[h.id for h in q] for q in hits], targets)), "vectors": len(index),
                   "index_mb": round(index.info()["bytes"] / 1e6, 2), "build_s": round(took, 1)}
            if setting is not None and "aggregations" not in result:
                result["aggregations"] = {"setting": name, **aggregations(index, query_vectors, targets)}
            result["settings"][name] = row
            print(f"{name:<30} {json.dumps(row)}", flush=True)
            index.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "aggregations" in result:
        print("aggregation of chunk scores:", json.dumps(result["aggregations"]))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all-mpnet-base-v2")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--settings", default="128:16,256:32,384:48",
                        help="chunked settings to compare, chunk_tokens:overlap, comma-separated")
    parser.add_argument("--out", type=Path, default=None, help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    result = run(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
