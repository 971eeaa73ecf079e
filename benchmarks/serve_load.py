"""Bounded load test of `allmpnet serve` on loopback: one-request-at-a-time vs dynamic batching, same run.

Starts the server as a child process for each phase, drives it with N concurrent clients (httpx, asyncio)
sending a fixed, seeded mix of request sizes, and prints throughput, p50/p99 latency, error counts and
the server's RSS at start, after warm-up and at the end. Phases:

  one-at-a-time   --no-dynamic-batching: each request gets its own forward pass
  dynamic         the default: concurrent requests share forward passes up to the token budget
  overload        dynamic with a small queue: 503 + Retry-After is expected, clients retry and all succeed

After the load, a sample of responses is checked against Encoder.encode in this process (<= 1e-5).

    nice -n 10 .venv/bin/python benchmarks/serve_load.py                       # tiny random model (default)
    nice -n 10 .venv/bin/python benchmarks/serve_load.py --model all-mpnet-base-v2 --requests 600
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import httpx
import numpy as np

WORDS = ("the a of to and in is it that for on with as was he be at by this had not are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so said "
         "what up its about into than them can only other new some could time these two may then do first any my "
         "now such like our over man me even most made after also did many before must through back years where "
         "much your way well down should because each just those people how too little state good very make world "
         "still own see men work long get here between both life being under never day same another know while "
         "last might us great old year off come since against go came right used take three cat dog plant sun "
         "moon car search query sentence example text hello").split()


@dataclass
class PhaseResult:
    name: str
    server_flags: list[str]
    requests: int = 0
    texts: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # unexpected: status or exception -> count
    queue_full_503: int = 0  # intended overload answers (each retried after Retry-After)
    seconds: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    rss_ready_mb: float = 0.0
    rss_warm_mb: float = 0.0
    rss_end_mb: float = 0.0
    mean_batch_rows: float = 0.0
    server_cpu_ms_per_request: float = 0.0  # robust to other load on the machine, unlike wall-clock figures
    vectors_checked: int = 0
    max_abs_diff: float = 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds if self.seconds else 0.0

    @property
    def rss_growth(self) -> float:
        """Over the measured load: from after the warm-up requests to the end."""
        return self.rss_end_mb / self.rss_warm_mb - 1 if self.rss_warm_mb else 0.0

    @property
    def rss_growth_from_ready(self) -> float:
        return self.rss_end_mb / self.rss_ready_mb - 1 if self.rss_ready_mb else 0.0


def make_requests(n: int, seed: int, max_words: int) -> list[list[str]]:
    """A seeded mix: most requests carry one text, some a handful, a few up to 32; 3..max_words words each."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        roll = rng.random()
        size = 1 if roll < 0.7 else rng.randint(2, 8) if roll < 0.9 else rng.randint(9, 32)
        out.append([" ".join(rng.choices(WORDS, k=rng.randint(3, max_words))) for _ in range(size)])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Server:
    def __init__(self, model: str, flags: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", "import sys; from allmpnet.cli import main; sys.exit(main())", "serve",
               "--model", model, "--device", "cpu", "--port", str(self.port), "--no-access-log",
               "--log-level", "warning", *flags]
        self.process = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not start")

    def mean_batch_rows(self) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                  if line.startswith("allmpnet_batch_rows_sum") or line.startswith("allmpnet_batch_rows_count")}
        return values["allmpnet_batch_rows_sum"] / max(values["allmpnet_batch_rows_count"], 1)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()


async def drive(url: str, batches: list[list[str]], concurrency: int, result: PhaseResult,
                keep: dict[int, np.ndarray | None] | None = None) -> list[float]:
    """Send every request once (retrying 503s after Retry-After); returns per-request latencies in seconds.

    aiohttp rather than httpx: on this 2-core machine httpx spent more CPU per request than the server did,
    so the load test would have measured the client.
    """
    latencies: list[float] = []
    next_item = iter(range(len(batches)))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def worker() -> None:
            for i in next_item:
                start = time.perf_counter()
                for _attempt in range(100):
                    try:
                        async with session.post("/v1/embeddings", json={"input": batches[i],
                                                                        "encoding_format": "base64"}) as r:
                            status, retry_after = r.status, r.headers.get("Retry-After")
                            body = await r.json() if status == 200 else None
                    except aiohttp.ClientError as e:
                        result.errors[type(e).__name__] = result.errors.get(type(e).__name__, 0) + 1
                        break
                    if status == 503 and retry_after is not None:
                        result.queue_full_503 += 1
                        await asyncio.sleep(float(retry_after))
                        continue
                    if status != 200:
                        result.errors[str(status)] = result.errors.get(str(status), 0) + 1
                        break
                    if len(body["data"]) != len(batches[i]):
                        result.errors["wrong count"] = result.errors.get("wrong count", 0) + 1
                        break
                    result.ok += 1
                    latencies.append(time.perf_counter() - start)
                    if keep is not None and i in keep:
                        keep[i] = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
                                            for d in body["data"]])
                    break
                else:
                    result.errors["gave up after 100 503s"] = result.errors.get("gave up after 100 503s", 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class Phase:
    """One server and what was measured on it; work is driven in segments so phases can alternate."""

    def __init__(self, name: str, model: str, flags: list[str]):
        self.result = PhaseResult(name=name, server_flags=flags)
        self.server = Server(model, flags)
        self.latencies: list[float] = []
        self.kept: dict[int, np.ndarray] = {}
        self.cpu = 0.0

    def warm_up(self, warmup: list[list[str]], concurrency: int) -> None:
        self.server.wait_ready()
        self.result.rss_ready_mb = rss_mb(self.server.process.pid)
        asyncio.run(drive(self.server.url, warmup, concurrency, PhaseResult(name="warm-up", server_flags=[])))
        self.result.rss_warm_mb = rss_mb(self.server.process.pid)

    def run(self, batches: list[list[str]], offset: int, concurrency: int, check_rows: set[int]) -> None:
        keep = {i - offset: None for i in check_rows if offset <= i < offset + len(batches)}
        cpu_before, start = cpu_seconds(self.server.process.pid), time.perf_counter()
        self.latencies += asyncio.run(drive(self.server.url, batches, concurrency, self.result, keep))
        self.result.seconds += time.perf_counter() - start
        self.cpu += cpu_seconds(self.server.process.pid) - cpu_before
        self.result.requests += len(batches)
        self.result.texts += sum(map(len, batches))
        self.kept.update({i + offset: v for i, v in keep.items() if v is not None})

    def finish(self) -> PhaseResult:
        r = self.result
        try:
            r.rss_end_mb = rss_mb(self.server.process.pid)
            r.mean_batch_rows = self.server.mean_batch_rows()
        finally:
            self.server.stop()
        if self.latencies:
            r.p50_ms = float(np.percentile(self.latencies, 50) * 1000)
            r.p99_ms = float(np.percentile(self.latencies, 99) * 1000)
        r.server_cpu_ms_per_request = self.cpu / max(r.requests, 1) * 1000
        return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny",
                        help="'tiny' (a random model built here), a model directory, or all-mpnet-base-v2")
    parser.add_argument("--requests", type=int, default=3000, help="requests per phase")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-words", type=int, default=40, help="longest text, in words")
    parser.add_argument("--overload-requests", type=int, default=1000)
    parser.add_argument("--overload-queue", type=int, default=48, help="--max-queue for the overload phase")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two compared servers")
    parser.add_argument("--server-flags", nargs=argparse.REMAINDER, default=[],
                        help="passed to every `allmpnet serve` (last on the command line)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from allmpnet import Encoder
    from allmpnet.testing import build_random_model

    workdir = tempfile.TemporaryDirectory()
    model = str(build_random_model(Path(workdir.name) / "tiny")) if args.model == "tiny" else args.model
    batches = make_requests(args.requests, seed=0, max_words=args.max_words)
    warmup = make_requests(max(args.concurrency * 2, 100), seed=1, max_words=args.max_words)
    overload = make_requests(args.overload_requests, seed=2, max_words=args.max_words)
    check_rows = set(random.Random(3).sample(range(len(batches)), min(50, len(batches))))

    print(f"allmpnet serve load test: model={args.model}, {args.concurrency} concurrent clients, "
          f"{args.requests} requests/phase ({sum(map(len, batches))} texts, 1-32 per request, 3-{args.max_words} "
          f"words each); host {platform.node()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start", flush=True)
    compared = [Phase("one-at-a-time", model, ["--no-dynamic-batching", *args.server_flags]),
                 Phase("dynamic", model, list(args.server_flags))]
    for phase in compared:
        phase.warm_up(warmup, args.concurrency)
    # alternate the two servers in segments so drifting load from other processes hits both alike
    segment = -(-len(batches) // args.rounds)
    for start in range(0, len(batches), segment):
        for phase in compared:
            print(f"  {phase.result.name}: requests {start}..{min(start + segment, len(batches)) - 1}", flush=True)
            phase.run(batches[start:start + segment], start, args.concurrency, check_rows)
    results = [phase.finish() for phase in compared]
    print("  overload: small queue, clients retry after Retry-After", flush=True)
    overloaded = Phase("overload", model, ["--max-queue", str(args.overload_queue), "--max-items", "32",
                                           *args.server_flags])
    overloaded.warm_up(warmup, args.concurrency)
    overloaded.run(overload, 0, args.concurrency, set())
    results.append(overloaded.finish())

    encoder = Encoder(model, device="cpu")
    for phase, result in zip(compared, results):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # long texts are truncated on both sides alike
            diffs = [np.abs(v - encoder.encode(batches[i])).max() for i, v in phase.kept.items()]
        result.vectors_checked = sum(len(batches[i]) for i in phase.kept)
        result.max_abs_diff = float(max(diffs)) if diffs else 0.0

    header = (f"{'phase':<14} {'req/s':>7} {'texts/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'rows/pass':>9} "
              f"{'srv CPU ms/req':>14} {'ok':>5} {'503':>5} {'errors':>6} {'RSS ready':>9} {'start':>6} {'end':>6} "
              f"{'growth':>7}")
    print("\n" + header)
    for r in results:
        print(f"{r.name:<14} {r.requests_per_s:7.1f} {r.texts_per_s:8.1f} {r.p50_ms:7.1f} {r.p99_ms:7.1f} "
              f"{r.mean_batch_rows:9.1f} {r.server_cpu_ms_per_request:14.2f} {r.ok:5d} {r.queue_full_503:5d} "
              f"{sum(r.errors.values()):6d} {r.rss_ready_mb:7.0f}MB {r.rss_warm_mb:4.0f}MB {r.rss_end_mb:4.0f}MB "
              f"{r.rss_growth:+7.1%}")
    single, dynamic = results[0], results[1]
    print(f"\ndynamic batching vs one-at-a-time: {dynamic.requests_per_s / single.requests_per_s:.2f}x requests/s, "
          f"{single.server_cpu_ms_per_request / dynamic.server_cpu_ms_per_request:.2f}x less server CPU per request, "
          f"p50 latency {dynamic.p50_ms / single.p50_ms:.2f}x, p99 {dynamic.p99_ms / single.p99_ms:.2f}x")
    for r in results:
        if r.errors:
            print(f"{r.name}: unexpected errors {r.errors}")
        if r.vectors_checked:
            print(f"{r.name}: {r.vectors_checked} returned vectors vs Encoder.encode: max |diff| {r.max_abs_diff:.1e}")
    unexpected = sum(sum(r.errors.values()) for r in results)
    growth = max(r.rss_growth for r in results)
    from_ready = max(r.rss_growth_from_ready for r in results)
    over = results[2]
    print(f"\nunexpected errors: {unexpected}; intended 503s: {over.queue_full_503} (every request then retried to "
          f"success: {over.ok == over.requests}); largest RSS growth over the measured load "
          f"(start = after {len(warmup)} warm-up requests): {growth:+.1%} (from the moment the server was ready, "
          f"before any request: {from_ready:+.1%}); "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        run = {"model": args.model, "concurrency": args.concurrency, "requests_per_phase": args.requests,
               "rounds": args.rounds, "cpus": os.cpu_count(), "server_flags": args.server_flags}
        phases = [asdict(r) | {"requests_per_s": r.requests_per_s, "texts_per_s": r.texts_per_s,
                               "rss_growth": r.rss_growth, "rss_growth_from_ready": r.rss_growth_from_ready}
                  for r in results]
        args.json.write_text(json.dumps({"run": run, "phases": phases}, indent=2) + "\n")


if __name__ == "__main__":
    main()
