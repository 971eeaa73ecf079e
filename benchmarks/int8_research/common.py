"""Shared helpers for the int8 research scripts: timing on a shared 2-core machine, the model's projection
shapes, the evaluation data and the quality measures."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("ALLMPNET_DATA", ROOT.parent / "shared" / "data"))
MODEL = Path(os.environ.get("ALLMPNET_MODEL", Path.home() / ".cache" / "allmpnet" / "all-mpnet-base-v2"))
RESULTS = ROOT / "benchmarks" / "int8_research" / "results"

# (K, N) of the four projections of a layer: q|k|v, attention output, FFN up, FFN down
PROJECTIONS = {"qkv": (768, 2304), "o": (768, 768), "up": (768, 3072), "down": (3072, 768)}
ROWS = [11, 64, 512, 2048, 4096]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def interleaved_best(fns: dict[str, Callable[[], object]], rounds: int = 20, seconds_per_round: float = 0.05,
                     warmup: int = 2) -> dict[str, float]:
    """Seconds per call of each fn: the fastest single call seen. The fns take turns, `rounds` times, each
    timed call by call for about `seconds_per_round`: on this shared 2-core machine other users' work slows calls
    at random, and the fastest calls are the ones that had both cores (compare ratios, not absolute figures)."""
    calls = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(1, min(200, int(seconds_per_round / max(time.perf_counter() - start, 1e-6))))
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(calls[name]):
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def sts_rows() -> tuple[list[str], list[str], np.ndarray]:
    """STSBenchmark test pairs (the file has no quoting: split on tabs)."""
    lines = (DATA / "STSBenchmark" / "sts.tsv").read_text(encoding="utf-8").splitlines()[1:]
    rows = [line.split("\t") for line in lines if line]
    return [r[0] for r in rows], [r[1] for r in rows], np.array([float(r[2]) for r in rows])


def sts_sentences() -> list[str]:
    a, b, _ = sts_rows()
    return a + b


def scifact_passages(n: int | None = None) -> list[str]:
    out = []
    with open(DATA / "SciFact" / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            out.append(f"{doc['title']} {doc['text']}".strip())
            if n is not None and len(out) == n:
                break
    return out


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).mean())


def sts_spearman(vectors: np.ndarray, pairs: int | None = None) -> float:
    """Spearman x 100 of the pairs' cosine against the gold score; vectors are sts_sentences()' order, or of the
    first `pairs` pairs (their first sentences, then their second ones)."""
    from scipy.stats import spearmanr
    _, _, gold = sts_rows()
    n = len(gold) if pairs is None else pairs
    gold = gold[:n]
    a, b = vectors[:n], vectors[n:2 * n]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return 100 * float(spearmanr(cos, gold).statistic)


def reference_vectors(name: str, texts: list[str], max_seq_length: int) -> np.ndarray:
    """fp32 vectors of `texts`, computed once and kept under results/ (never committed: see .gitignore)."""
    cache = RESULTS / "cache" / f"fp32-{name}-{len(texts)}-{max_seq_length}.npy"
    if cache.is_file():
        return np.load(cache)
    from allmpnet import Encoder
    enc = Encoder(str(MODEL), device="cpu", precision="fp32", max_seq_length=max_seq_length)
    vectors = enc.encode(texts, show_progress_bar=False)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return vectors
