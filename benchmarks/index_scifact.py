"""SciFact (5,183 abstracts, 300 test claims): the index against exact search, with the published weights.

1. recall@10 of the HNSW path (candidates re-scored in float32; forced with exact=False) against exact cosine
   top-10, for each stored HNSW dtype (f32, f16, i8, b1), plus build time, size on disk and query time;
2. end to end: `allmpnet search IX --queries claims.jsonl -k 10 --json` (a subprocess: it loads the model and
   embeds the claims itself; default mode, which is exact for indexes of <= 20,000 rows, and --ann) against the
   evaluation's exact search (allmpnet.evaluate.retrieval).

Embeddings come through the evaluation's on-disk cache (allmpnet.evaluate.CachedEncoder, committed every 1,024
texts), so an interrupted run resumes and a run after `allmpnet eval SciFact` at the same precision encodes nothing;
otherwise encoding dominates (~30-50 min on 2 free cores in fp32; bf16 is faster on CPUs with AMX).
    nice -n 10 .venv/bin/python benchmarks/index_scifact.py --precision fp32 | tee benchmarks/results/index_scifact.txt
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from allmpnet import Encoder
from allmpnet.evaluate import CachedEncoder, load_task
from allmpnet.evaluate.data import read_retrieval
from allmpnet.evaluate.retrieval import document_text, exact_top_k, search
from allmpnet.search import Index

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT.parent / "shared" / "data" / "SciFact"
WORK = Path("/tmp/allmpnet-index-scifact")
CLI = [str(Path(sys.executable).with_name("allmpnet"))]
K = 10


def run_cli(*args: str) -> str:
    done = subprocess.run(CLI + list(args), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"allmpnet {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="for the corpus, the claims and the CLI's own query embedding alike")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    data = read_retrieval(load_task(TASK))
    doc_ids, query_ids = list(data.corpus), list(data.queries)
    encoder = CachedEncoder(Encoder("all-mpnet-base-v2", device="cpu", precision=args.precision))
    start = time.perf_counter()
    doc_vectors = encoder.encode([document_text(d) for d in data.corpus.values()], show_progress_bar=True)
    query_vectors = encoder.encode([data.queries[q] for q in query_ids])
    print(f"SciFact: {len(doc_ids)} abstracts, {len(query_ids)} test claims; all-mpnet-base-v2 {args.precision} "
          f"({encoder.hits} cached, {encoder.misses} encoded, {time.perf_counter() - start:.0f} s)")
    vectors_path = WORK / f"corpus-{args.precision}.npy"
    np.save(vectors_path, doc_vectors)
    claims = WORK / "claims.jsonl"
    claims.write_text("".join(json.dumps({"id": q, "text": data.queries[q]}) + "\n" for q in query_ids))

    # exact reference: the evaluation's chunked exact top-k over the same vectors
    start = time.perf_counter()
    _, exact_rows = exact_top_k(query_vectors, [doc_vectors], K)
    exact_seconds = time.perf_counter() - start
    exact_sets = [set(r) for r in exact_rows.tolist()]

    print(f"\n1. HNSW (connectivity 16) + float32 re-scoring vs exact cosine top-{K}, {len(query_ids)} queries")
    print(f"{'dtype':<6} {'recall@10':>9} {'same top-10':>11} {'build s':>8} {'MB on disk':>10} "
          f"{'ms/query':>9} {'exact ms/query':>14}")
    indexes = {}
    for dtype in ("f32", "f16", "i8", "b1"):
        out = WORK / f"ix-{dtype}"
        start = time.perf_counter()
        run_cli("index", "build", str(TASK / "corpus.jsonl"), "--out", str(out), "--overwrite",
                "--text-field", "title,text", "--vectors", str(vectors_path), "--dtype", dtype, "--device", "cpu")
        build_seconds = time.perf_counter() - start
        index = Index.open(out)
        assert index.ids() == doc_ids, "index rows are not the corpus in file order"
        index.search(query_vectors[:5], k=K, exact=False)  # warm-up
        start = time.perf_counter()
        hits = index.search(query_vectors, k=K, exact=False)
        ann_ms = (time.perf_counter() - start) * 1000 / len(query_ids)
        start = time.perf_counter()
        index.search(query_vectors, k=K, exact=True)
        exact_ms = (time.perf_counter() - start) * 1000 / len(query_ids)
        rows = [[h.row for h in q] for q in hits]
        recall = np.mean([len(set(r) & e) / K for r, e in zip(rows, exact_sets)])
        same = sum(r == e for r, e in zip(rows, exact_rows.tolist()))
        print(f"{dtype:<6} {recall:>9.4f} {same:>7}/{len(rows)} {build_seconds:>8.1f} "
              f"{index.info()['bytes'] / 1e6:>10.1f} {ann_ms:>9.3f} {exact_ms:>14.3f}")
        indexes[dtype] = out
    print(f"(evaluation's exact_top_k over all {len(query_ids)} queries at once: "
          f"{exact_seconds * 1000 / len(query_ids):.3f} ms/query)")

    reference = search(encoder, data.corpus, data.queries, top_k=K, skip_same_id=False)
    ref_top = [[d for d, _ in sorted(reference[q].items(), key=lambda hit: -hit[1])] for q in query_ids]
    for mode in ([], ["--ann"]):
        print(f"\n2{'b' if mode else 'a'}. `allmpnet search {indexes['f32'].name} --queries claims.jsonl -k {K} --json "
              f"{' '.join(mode)}` (model loaded and claims embedded by the CLI) vs the evaluation's exact search "
              "(allmpnet.evaluate.retrieval.search)")
        start = time.perf_counter()
        lines = run_cli("search", str(indexes["f32"]), "--queries", str(claims), "-k", str(K), "--json",
                        "--device", "cpu", "--precision", args.precision, *mode).splitlines()
        cli_seconds = time.perf_counter() - start
        cli_top = [[h["id"] for h in json.loads(line)["hits"]] for line in lines]
        same_order = sum(a == b for a, b in zip(cli_top, ref_top))
        same_set = sum(set(a) == set(b) for a, b in zip(cli_top, ref_top))
        print(f"queries answered: {len(cli_top)} in {cli_seconds:.0f} s (includes model load and embedding)")
        print(f"same top-{K} ids, same order: {same_order}/{len(query_ids)}; same set: {same_set}/{len(query_ids)}")
        for q, a, b in zip(query_ids, cli_top, ref_top):
            if a != b:
                print(f"  claim {q}: cli {a} vs exact {b}")


if __name__ == "__main__":
    main()
