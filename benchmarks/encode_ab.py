"""A/B timing of `Encoder.encode` between source trees (or environments), in processes that take turns.

Workloads (`--workload`): one query (the default), or a batch of SciFact passages cut at 256 word pieces, or of
STSBenchmark sentences (both from the data directory encode_speed.py reads, ../shared/data by default).

Each variant is a worker process with its own PYTHONPATH (a checkout's `src`, e.g. from `git worktree add`) and
optional environment variables; every round asks each worker, in alternating order, for a burst of calls, so
the machine's drift (its memory bandwidth swings with other tenants) hits the variants alike. It prints each
variant's p50 and mean of round medians, and in how many rounds each later variant beat the first. Two processes
of the same code differ by 2-4% (each places its memory differently), so compare fresh pairs more than once.

    git worktree add /tmp/before HEAD~1
    PYTHONPATH=src python benchmarks/encode_ab.py auto before=/tmp/before/src after=src
    PYTHONPATH=src python benchmarks/encode_ab.py auto 4k=src huge=src,GLIBC_TUNABLES=glibc.malloc.hugetlb=1
    PYTHONPATH=src python benchmarks/encode_ab.py auto --workload passages --burst 2 --rounds 14 \
        before=/tmp/before/src after=src
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: encode_speed.py beside this file
from encode_speed import DATA, PASSAGE_TOKENS, QUERY, scifact_passages, sts_pairs  # noqa: E402


def workload_texts(workload: str, size: int) -> tuple[list[str], int | None]:
    """The texts one call encodes, and the max_seq_length to encode them at (None: the model's)."""
    if workload == "query":
        return [QUERY], None
    if workload == "passages":
        return scifact_passages(DATA, size), PASSAGE_TOKENS
    return sts_pairs(DATA)[0][:size], None


def worker(precision: str, model: str | None, workload: str, size: int) -> None:
    import torch

    from allmpnet import Encoder
    from allmpnet.weights import published_dir
    torch.set_num_threads(2)
    texts, max_length = workload_texts(workload, size)
    encoder = Encoder(model or str(published_dir()), precision=precision, max_seq_length=max_length)
    for _ in range(30 if workload == "query" else 2):
        encoder.encode(texts)
    print("ready", flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            start = time.perf_counter()
            encoder.encode(texts)
            times.append(1000 * (time.perf_counter() - start))
        print(" ".join(f"{t:.4f}" for t in times), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("precision")
    parser.add_argument("variants", nargs="+", help="NAME=PYTHONPATH[,VAR=VALUE...]")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--burst", type=int, default=15, help="calls per variant and round")
    parser.add_argument("--model", help="model directory (default: the published weights)")
    parser.add_argument("--workload", choices=("query", "passages", "sentences"), default="query")
    parser.add_argument("--size", type=int, default=32, help="texts per call (passages, sentences)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.precision, args.model, args.workload, args.size)
    workers = {}
    for variant in args.variants:
        name, _, rest = variant.partition("=")
        path, *extra = rest.split(",")
        env = dict(os.environ, PYTHONPATH=path, **dict(e.split("=", 1) for e in extra))
        command = [sys.executable, __file__, args.precision, variant, "--worker", "--workload", args.workload,
                   "--size", str(args.size)]
        if args.model:
            command += ["--model", args.model]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   text=True, env=env)
        if process.stdout.readline().strip() != "ready":
            raise SystemExit(f"variant {name} did not start")
        workers[name] = process
    latencies = {name: [] for name in workers}
    medians = {name: [] for name in workers}
    for round_ in range(args.rounds):
        order = list(workers.items())
        for name, process in order if round_ % 2 == 0 else order[::-1]:
            process.stdin.write(f"{args.burst}\n")
            process.stdin.flush()
            times = [float(t) for t in process.stdout.readline().split()]
            latencies[name] += times
            medians[name].append(statistics.median(times))
    for process in workers.values():
        process.stdin.close()
    names = list(workers)
    for name in names:
        print(f"{name}: p50 {statistics.median(latencies[name]):.3f} ms, mean of round medians "
              f"{statistics.mean(medians[name]):.3f} ms")
    for name in names[1:]:
        wins = sum(b < a for a, b in zip(medians[names[0]], medians[name]))
        print(f"{name} faster than {names[0]} in {wins}/{args.rounds} rounds")


if __name__ == "__main__":
    main()
