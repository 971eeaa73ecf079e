"""Bulk embedding on Ray: equality with Encoder.encode at 100k rows, and throughput for 1 and 2 workers.

    nice -n 10 .venv/bin/python benchmarks/bulk_embed.py | tee benchmarks/results/bulk_embed.txt

Part 1 runs the 100k-row equality check on the tiny random model (the real model would need hours on two
CPU cores); part 2 times the published weights on a smaller sample of real sentences, against the in-process
Encoder.encode with the same number of threads as one worker, in the same run. Every figure is printed
with the machine it came from; worker memory is each actor's peak resident set (ru_maxrss). On a shared,
busy machine wall-clock rates fall with the load; sentences per CPU-second (process CPU time of the encoder
or of the actors) show the cost of the Ray path per unit of work independently of that.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from allmpnet import Encoder
from allmpnet.bulk import BulkConfig, embed_corpus, read_embeddings
from allmpnet.encode import EncodePool
from allmpnet.testing import build_random_model
from allmpnet.weights import STAMP, published_dir

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def real_sentences() -> list[str]:
    """Short real texts from the evaluation data (Banking77 and Emotion train splits), in file order."""
    texts = []
    for name in ("Banking77Classification/train.jsonl", "EmotionClassification/train.jsonl"):
        with open(DATA / name) as f:
            texts += [json.loads(line)["text"] for line in f]
    return texts


def write_corpus(path: Path, texts: list[str]) -> None:
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"row-{i}", "text": t}) + "\n")


def reference(model: str, texts: list[str], batch_size: int) -> tuple[np.ndarray, float, float]:
    """Vectors, sentences per second, and sentences per CPU-second of the in-process encoder."""
    torch.set_num_threads(1)  # what one worker gets
    enc = Encoder(model, device="cpu")
    started, cpu_started = time.perf_counter(), time.process_time()
    vectors = enc.encode(texts, batch_size=batch_size, show_progress_bar=False)
    return (vectors, len(texts) / (time.perf_counter() - started),
            len(texts) / (time.process_time() - cpu_started))


def check_equal(label: str, out_dir: Path, texts: list[str], want: np.ndarray) -> None:
    ids, vectors, _ = read_embeddings(str(out_dir))
    index = {i: k for k, i in enumerate(ids)}
    missing = len(texts) - len(set(ids) & {f"row-{i}" for i in range(len(texts))})
    duplicated = len(ids) - len(index)
    joined = vectors[[index[f"row-{i}"] for i in range(len(texts))]]  # joined by id, not by position
    diff = float(np.abs(joined - want).max())
    verdict = "PASS" if diff <= 1e-5 and not missing and not duplicated else "FAIL"
    print(f"{label}: {len(ids)} rows, {missing} ids missing, {duplicated} duplicated, "
          f"max |bulk - Encoder.encode| = {diff:.2e}  [{verdict}: <= 1e-5, none missing or duplicated]")


def run(inputs: Path, out_dir: Path, model: str, workers: int, shard_rows: int, batch_size: int) -> dict:
    config = BulkConfig(model=model, workers=workers, cpus_per_worker=1, shard_rows=shard_rows,
                        batch_size=batch_size)
    started = time.perf_counter()
    result = embed_corpus(str(inputs), str(out_dir), config, overwrite=True, progress=False)
    wall = time.perf_counter() - started
    busy = max(w["seconds"] for w in result.workers.values())
    cpu = sum(w["cpu_seconds"] for w in result.workers.values())
    return {"rows": result.rows, "wall": wall, "per_s_wall": result.rows / wall, "per_s_busy": result.rows / busy,
            "per_cpu_s": result.rows / cpu, "peak_mb": [round(w["peak_rss_mb"]) for w in result.workers.values()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny-rows", type=int, default=100_000)
    parser.add_argument("--real-rows", type=int, default=1_000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    import logging
    import ray
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"ray {ray.__version__}; load average at start {os.getloadavg()[0]:.1f} (shared machine)")
    texts = real_sentences()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1. equality at scale, tiny random model
        tiny = str(build_random_model(tmp / "tiny"))
        corpus = [f"{texts[i % len(texts)]} #{i}" for i in range(args.tiny_rows)]
        write_corpus(tmp / "tiny.jsonl", corpus)
        want, _, _ = reference(tiny, corpus, args.batch_size)
        run(tmp / "tiny.jsonl", tmp / "tiny-out", tiny, workers=2, shard_rows=10_000,
                    batch_size=args.batch_size)
        print(f"\n[1] tiny random model (hidden 32, 2 layers), {args.tiny_rows} sentences, 2 workers, 10 shards")
        check_equal("    equality", tmp / "tiny-out", corpus, want)

        # 2. throughput, published weights
        model = published_dir()
        if not (model / STAMP).is_file():
            print("\n[2] skipped: published weights not downloaded (run `allmpnet download`)")
            return
        sample = texts[: args.real_rows]
        write_corpus(tmp / "real.jsonl", sample)
        want, ref_rate, ref_cpu_rate = reference(str(model), sample, args.batch_size)
        print(f"\n[2] all-mpnet-base-v2, {len(sample)} real sentences (Banking77 train), CPU, 1 core per worker, "
              f"shards of {len(sample) // 8} rows")
        print(f"    reference Encoder.encode, in process, 1 thread: {ref_rate:8.1f} sentences/s, "
              f"{ref_cpu_rate:.1f} per CPU-second")
        for workers in (1, 2):
            s = run(tmp / "real.jsonl", tmp / f"real-{workers}", str(model), workers, len(sample) // 8,
                    args.batch_size)
            print(f"    Ray, {workers} worker(s): {s['per_s_wall']:8.1f} sentences/s end to end "
                  f"({s['wall']:.1f} s, actor start-up included; {s['per_s_wall'] / ref_rate:.2f}x reference), "
                  f"{s['per_s_busy']:8.1f}/s while encoding ({s['per_s_busy'] / ref_rate:.2f}x); "
                  f"{s['per_cpu_s']:.1f} per CPU-second ({s['per_cpu_s'] / ref_cpu_rate:.2f}x); "
                  f"peak memory per worker {s['peak_mb']} MB")
            check_equal(f"    equality, {workers} worker(s)", tmp / f"real-{workers}", sample, want)
        ray.shutdown()
        for processes in (1, 2):
            with EncodePool(str(model), devices=["cpu"] * processes, threads_per_worker=1) as pool:
                started = time.perf_counter()
                got = pool.encode(sample, batch_size=args.batch_size, chunk_size=64, show_progress_bar=False)
                rate = len(sample) / (time.perf_counter() - started)
            print(f"    EncodePool, {processes} CPU process(es), 1 thread each: {rate:8.1f} sentences/s "
                  f"({rate / ref_rate:.2f}x reference), max |pool - Encoder.encode| = "
                  f"{float(np.abs(got - want).max()):.2e}")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
