"""Index at scale on synthetic 768-d vectors: build time, query time of HNSW + re-scoring against exact search
in the same run (ratio), recall@10, and the memory of exact search staying bounded by its chunk size.

The vectors are clustered (topics + noise, unit length), not real sentence embeddings: the SciFact benchmark
(index_scifact.py) gives the recall on real ones; this one shows how time grows with the corpus.
    nice -n 10 .venv/bin/python benchmarks/index_scale.py --rows 100000 | tee benchmarks/results/index_scale.txt
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from allmpnet.search import AnnConfig, Index, semantic_search


def synthetic(n: int, dim: int, topics: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((topics, dim)).astype(np.float32)
    x = centres[rng.integers(0, topics, n)] + 1.5 * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# run in a fresh interpreter so its peak RSS shows only that search: chunked (ours) or one full score matrix.
# VmHWM, not ru_maxrss: Linux carries the parent's peak into ru_maxrss across fork + exec
SEARCH_CHILD = """
import sys, numpy as np
from allmpnet.search import semantic_search
from allmpnet.similarity import cos_sim
corpus, queries = np.load(sys.argv[1], mmap_mode="r"), np.load(sys.argv[2])
if sys.argv[3] == "chunked":
    semantic_search(queries, corpus, top_k=10, corpus_chunk_size=10_000)
else:
    np.argsort(-cos_sim(queries, np.asarray(corpus)), axis=1)[:, :10]
print(int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024)
"""


def peak_rss_mb(corpus: Path, queries: Path, mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", SEARCH_CHILD, str(corpus), str(queries), mode],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dim", type=int, default=768)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="allmpnet-index-scale-"))
    try:
        corpus = synthetic(args.rows, args.dim, topics=max(10, args.rows // 100), seed=1)
        queries = synthetic(args.queries, args.dim, topics=max(10, args.rows // 100), seed=2)
        np.save(work / "corpus.npy", corpus)
        corpus_mb = corpus.nbytes / 1e6
        del corpus
        np.save(work / "queries.npy", queries)
        mapped = np.load(work / "corpus.npy", mmap_mode="r")
        start = time.perf_counter()
        exact = semantic_search(queries, mapped, top_k=10, corpus_chunk_size=10_000)
        exact_ms = (time.perf_counter() - start) * 1000 / args.queries
        print(f"{args.rows} x {args.dim} unit vectors ({corpus_mb:.0f} MB float32, memory-mapped), "
              f"{args.queries} queries, k=10")
        chunked_mb = peak_rss_mb(work / "corpus.npy", work / "queries.npy", "chunked")
        full_mb = peak_rss_mb(work / "corpus.npy", work / "queries.npy", "full")
        print(f"exact chunked search (10,000 rows per chunk): {exact_ms:.2f} ms/query")
        print(f"peak RSS of a fresh process doing that search (torch loaded, corpus pages mapped): {chunked_mb:.0f} MB "
              f"chunked vs {full_mb:.0f} MB for one full score matrix (cos_sim): {full_mb / chunked_mb:.2f}x")
        exact_sets = [{m.corpus_id for m in q} for q in exact]
        print(f"\n{'dtype':<6} {'build s':>8} {'rows/s':>8} {'MB on disk':>10} {'ms/query':>9} "
              f"{'exact ms/query':>14} {'speed-up':>8} {'recall@10':>9}")
        for dtype in ("f32", "i8", "b1"):
            start = time.perf_counter()
            index = Index.build(work / f"ix-{dtype}", vectors=mapped, ann=AnnConfig(dtype=dtype))
            build = time.perf_counter() - start
            index.search(queries[:5], k=10, exact=False)
            start = time.perf_counter()
            hits = index.search(queries, k=10, exact=False)  # the HNSW path, whatever the size
            ann_ms = (time.perf_counter() - start) * 1000 / args.queries
            start = time.perf_counter()
            index.search(queries, k=10, exact=True)
            index_exact_ms = (time.perf_counter() - start) * 1000 / args.queries
            recall = np.mean([len({h.row for h in q} & e) / 10 for q, e in zip(hits, exact_sets)])
            print(f"{dtype:<6} {build:>8.1f} {args.rows / build:>8.0f} {index.info()['bytes'] / 1e6:>10.1f} "
                  f"{ann_ms:>9.3f} {index_exact_ms:>14.3f} {index_exact_ms / ann_ms:>7.1f}x {recall:>9.4f}")
            index.close()
            shutil.rmtree(work / f"ix-{dtype}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
