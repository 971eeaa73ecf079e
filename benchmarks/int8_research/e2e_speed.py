"""End-to-end speed of int8 recipes (quality.py's Recipe) against our bf16 and fp32 paths, in one process with
the paths taking turns (this 2-core machine is shared: compare ratios within a round, best round counts).

Workloads as benchmarks/encode_speed.py: STSBenchmark sentences (token-budget batches of 4,096), SciFact abstracts
cut at 256 word pieces, and single queries (p50 over a set of short queries).

    PYTHONPATH=src python benchmarks/int8_research/e2e_speed.py --rounds 3
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL, RESULTS, cpu_model, scifact_passages, sts_sentences  # noqa: E402
from quality import Recipe, build_fast, calibrate, calibration_texts, encode_with, per_proj, uniform  # noqa: E402

from allmpnet import Encoder  # noqa: E402
from allmpnet.encode.fused import inference_network  # noqa: E402

QUERIES = ["How do I bake bread at home?", "symptoms of vitamin d deficiency", "best laptop for programming",
           "what causes inflation", "treatment for migraine headaches", "how to reset a router",
           "cheap flights to lisbon in may", "does coffee dehydrate you", "python list comprehension example",
           "who wrote pride and prejudice"]

RECIPES = {
    "w8a8 all (alpha 0.5)": Recipe("w8a8 all", uniform("a8"), alpha=0.5),
    "w8a8 qkv/o/up + weight-only down": Recipe("w8a8 qkv/o/up + int16 down",
                                               per_proj(qkv="a8", o="a8", up="a8", down="a16"), alpha=0.5),
    "w8a8 qkv/o/up + bf16 down": Recipe("w8a8 qkv/o/up + bf16 down", per_proj(qkv="a8", o="a8", up="a8"),
                                        alpha=0.5),
    "weight-only int8 (int16 act.)": Recipe("weight-only", uniform("a16")),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sentences", type=int, default=1024)
    parser.add_argument("--passages", type=int, default=64)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--out", type=Path, default=RESULTS / "e2e_speed.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sentences = sts_sentences()[:args.sentences]
    passages = scifact_passages(args.passages)
    enc = Encoder(str(MODEL), device="cpu", precision="fp32")
    cal = calibrate(enc, calibration_texts(), histograms=False)
    # every path is a prebuilt inference network run through the same encoder (its batching and pooling)
    paths = {"ours fp32": None, "ours bf16": inference_network(enc.network, torch.bfloat16, torch.device("cpu"))}
    for name in args.recipes.split(","):
        paths[name] = build_fast(enc, RECIPES[name], cal)
    tokens = {"sts": sum(len(enc.tokenize([t]).ids[0]) for t in sentences)}

    def run(path: str, texts: list[str], max_len: int) -> float:
        start = time.perf_counter()
        encode_with(enc, paths[path], texts, max_len)
        return time.perf_counter() - start

    def query_p50(path: str) -> float:
        times = [run(path, [q], 512) for q in QUERIES for _ in range(3)]
        return float(np.median(times))

    best = {p: {"sts": float("inf"), "sci": float("inf"), "query": float("inf")} for p in paths}
    for p in paths:  # warm-up: kernel shapes, caches
        run(p, sentences[:256], 512), run(p, passages[:8], 256), query_p50(p)
    for r in range(args.rounds):
        for p in paths:
            best[p]["sts"] = min(best[p]["sts"], run(p, sentences, 512))
            best[p]["sci"] = min(best[p]["sci"], run(p, passages, 256))
            best[p]["query"] = min(best[p]["query"], query_p50(p))
        print(f"round {r + 1}: " + ", ".join(f"{p} {v['sts']:.2f}/{v['sci']:.2f}/{v['query'] * 1e3:.1f}ms"
                                            for p, v in best.items()), flush=True)
    base = best["ours bf16"]
    lines = [f"\n## {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"{len(sentences)} STS sentences ({tokens['sts']} tokens), {len(passages)} SciFact passages at 256, "
             f"{len(QUERIES)} queries x 3; best of {args.rounds} interleaved rounds\n",
             "| path | sentences/s | vs bf16 | passages/s | vs bf16 | query p50 ms | vs bf16 |",
             "|---|---|---|---|---|---|---|"]
    for p, v in best.items():
        lines.append(f"| {p} | {len(sentences) / v['sts']:.0f} | {base['sts'] / v['sts']:.2f}x | "
                     f"{len(passages) / v['sci']:.1f} | {base['sci'] / v['sci']:.2f}x | {v['query'] * 1e3:.1f} | "
                     f"{base['query'] / v['query']:.2f}x |")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
