"""Bounded load test of `allmpnet serve` on loopback: one-request-at-a-time vs dynamic batching, same run.

Starts the server as a child process for each phase, drives it with N concurrent clients (httpx, asyncio)
sending a fixed, seeded mix of request sizes, and prints throughput, p50/p99 latency, error counts and
the server's RSS at start, after warm-up and at the end. Phases:

  one-at-a-time   --no-dynamic-batching: each request gets its own forward pass
  dynamic         the default: concurrent requests share forward passes up to the token budget
  overload        dynamic with a small queue: 503 + Retry-After is expected, clients retry and all succeed
  hostile         normal clients beside hostile ones on one default server (see `hostile_phase`): giant requests
                  at every limit, clients that disconnect before their answer, and slow clients (headers, body,
                  reading); checks the normal clients' errors (0), the peak RSS against the documented bound
                  (RSS when ready + 3 x --max-inflight-bytes) and the RSS after the run (within 10 % of before)

After the load, a sample of responses is checked against Encoder.encode in this process (<= 1e-5).

    nice -n 10 .venv/bin/python benchmarks/serve_load.py                       # tiny random model (default)
    nice -n 10 .venv/bin/python benchmarks/serve_load.py --model all-mpnet-base-v2 --requests 600
    nice -n 10 .venv/bin/python benchmarks/serve_load.py --only-hostile         # just the hostile mix
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


def cpu_model() -> str:
    """The CPU as lscpu names it: model name, family and model number (the name alone can be as vague as "AMD EPYC")."""
    info: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    if "model name" not in info:
        return platform.processor() or "unknown CPU"
    return f"{info['model name']}, family {info.get('cpu family', '?')} model {info.get('model', '?')}"


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
        # a file, not a pipe: nobody reads a pipe during the run, and a server that logs enough would block on it
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(cmd, stderr=self.log, text=True)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited: {self.log.read()}")
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


@dataclass
class HostileResult:
    normal_requests: int = 0
    normal_ok: int = 0
    normal_errors: dict[str, int] = field(default_factory=dict)
    normal_queue_full_503: int = 0
    normal_p50_ms: float = 0.0
    normal_p99_ms: float = 0.0
    giants_sent: dict[str, int] = field(default_factory=dict)  # route -> requests at the limits
    giants_answered: dict[str, int] = field(default_factory=dict)  # status -> count
    giant_body_mb: float = 0.0
    disconnecting_clients: int = 0
    disconnecting_texts: int = 0
    texts_embedded_for_others: int = 0  # normal clients, giants answered on /v1/embeddings, slow readers
    texts_embedded_in_total: int = 0  # by the server's own metrics: the excess was computed for departed clients
    answers_499: int = 0
    slow_clients: dict[str, int] = field(default_factory=dict)  # kind -> connections
    slow_closed_by_server: dict[str, int] = field(default_factory=dict)
    readers_dropped_by_server: int = 0  # by the server's log
    slow_readers_answered: int = 0  # their texts were embedded (the others were refused 503, queue full)
    rss_ready_mb: float = 0.0
    rss_before_mb: float = 0.0  # after warm-up requests, when the hostile mix starts
    rss_peak_mb: float = 0.0
    rss_after_mb: float = 0.0
    bound_mb: float = 0.0
    seconds: float = 0.0

    @property
    def after_vs_before(self) -> float:
        return self.rss_after_mb / self.rss_before_mb - 1 if self.rss_before_mb else 0.0

    @property
    def passed(self) -> bool:
        """Normal clients all served, peak RSS under the bound, and no more than 10 % kept after the run."""
        return (not self.normal_errors and self.normal_ok == self.normal_requests
                and self.rss_peak_mb <= self.bound_mb and self.after_vs_before <= 0.10)


def metric_total(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


async def disconnecting_client(url: str, texts: list[str], leave_after: float) -> None:
    """Send a whole request, then close the connection before the answer (as an impatient client does)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({"input": texts}).encode()
    writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    await asyncio.sleep(leave_after)
    writer.transport.abort()


def server_holds(server_port: int, client_port: int) -> bool:
    """Whether the server's end of a loopback connection is still open (ESTABLISHED or CLOSE_WAIT), by the kernel."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port, remote_port = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
            if local_port == server_port and remote_port == client_port and fields[3] in ("01", "08"):
                return True
    return False


async def slow_client(url: str, kind: str, result: HostileResult, patience: float, reader_texts: int) -> None:
    """A connection that stalls: half its headers, or half its body (a byte a second), or it never reads its answer.

    After `patience` seconds it asks the kernel whether the server still holds its end of the connection.
    """
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    client_port = writer.get_extra_info("sockname")[1]
    if kind == "reader":  # small socket buffers, so the answer cannot hide in the kernel
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    if kind == "reader":  # n x n scores: a ~20 MB answer for n = 1,024, more than the socket buffers hold
        route = b"/similarity"
        body = json.dumps({"a": ["a slow reader"] * reader_texts, "b": ["its text"] * reader_texts}).encode()
    else:
        route, body = b"/v1/embeddings", json.dumps({"input": ["a slow client's text"] * 2048}).encode()
    head = (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (route, len(body)))
    start = time.monotonic()
    try:
        writer.write({"headers": head[:40], "body": head + body[:100], "reader": head + body}[kind])
        await writer.drain()
        if kind == "reader":
            status = await asyncio.wait_for(reader.readexactly(12), patience)  # b"HTTP/1.1 200": it was computed
            result.slow_readers_answered += status.endswith(b"200")
            await asyncio.sleep(max(0.0, patience - (time.monotonic() - start)))  # and reads nothing more
        while time.monotonic() - start < patience:
            writer.write(b"x" if kind == "headers" else b" ")
            await writer.drain()
            try:
                if not await asyncio.wait_for(reader.read(65536), 1.0):
                    break  # the server closed
            except asyncio.TimeoutError:
                pass
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        pass  # the server reset or closed it
    held = server_holds(int(port), client_port)
    result.slow_closed_by_server[kind] = result.slow_closed_by_server.get(kind, 0) + int(not held)
    writer.transport.abort()


async def giant_client(url: str, route: str, body: bytes, count: int, result: HostileResult) -> None:
    """Send `count` requests at every limit, one after another, retrying a 503 after its Retry-After (up to 20 times)."""
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=1200)) as session:
        for _ in range(count):
            result.giants_sent[route] = result.giants_sent.get(route, 0) + 1
            for _attempt in range(20):
                try:
                    async with session.post(route, data=body, headers={"Content-Type": "application/json"}) as r:
                        answer = await r.read()
                        code = json.loads(answer)["error"]["code"] if r.status != 200 else ""
                        retry_after = r.headers.get("Retry-After")
                except aiohttp.ClientError as e:
                    code, retry_after = type(e).__name__, None
                    r = None
                key = f"{route} {r.status if r is not None else 'failed'} {code}".strip()
                result.giants_answered[key] = result.giants_answered.get(key, 0) + 1
                if r is None or r.status != 503 or retry_after is None:
                    break
                await asyncio.sleep(float(retry_after))


async def hostile_mix(url: str, normal: list[list[str]], args: argparse.Namespace, max_items: int, max_chars: int,
                      result: HostileResult) -> None:
    rng = random.Random(4)
    giant = json.dumps({"input": [("the cat sat on a mat " * (max_chars // 20 + 1))[:max_chars - 6] + f"{i:06d}"
                                  for i in range(max_items)]}).encode()
    result.giant_body_mb = len(giant) / 1e6
    routes = args.giant_routes.split(",")
    leavers = [[" ".join(rng.choices(WORDS, k=rng.randint(3, args.max_words))) for _ in range(rng.randint(8, 32))]
               for _ in range(args.disconnecting)]
    result.disconnecting_clients = len(leavers)
    result.disconnecting_texts = sum(map(len, leavers))
    kinds = ["headers", "body", "reader"]
    result.slow_clients = {k: args.slow // len(kinds) for k in kinds}
    normal_result = PhaseResult(name="normal", server_flags=[])
    start = time.perf_counter()

    async def leave_in_waves() -> None:
        for i, texts in enumerate(leavers):
            asyncio.ensure_future(disconnecting_client(url, texts, rng.uniform(0, 0.3)))
            await asyncio.sleep(0.02 if i % 10 else 0.3)

    tasks = [asyncio.ensure_future(drive(url, normal, args.hostile_normal_concurrency, normal_result)),
             asyncio.ensure_future(leave_in_waves())]
    tasks += [asyncio.ensure_future(giant_client(url, route, giant, args.giants, result)) for route in routes
              for _ in range(args.giant_concurrency)]
    tasks += [asyncio.ensure_future(slow_client(url, kind, result, args.slow_patience, args.reader_texts))
              for kind, n in result.slow_clients.items() for _ in range(n)]
    latencies = await tasks[0]
    await asyncio.gather(*tasks[1:])
    await asyncio.sleep(0.5)  # the last disconnecting clients' aborts reach the server
    result.seconds = time.perf_counter() - start
    result.normal_requests, result.normal_ok = len(normal), normal_result.ok
    result.normal_errors, result.normal_queue_full_503 = normal_result.errors, normal_result.queue_full_503
    embedded_giants = result.giants_answered.get("/v1/embeddings 200", 0)
    result.texts_embedded_for_others = (sum(map(len, normal)) + embedded_giants * max_items
                                        + result.slow_readers_answered * 2 * args.reader_texts)
    if latencies:
        result.normal_p50_ms = float(np.percentile(latencies, 50) * 1000)
        result.normal_p99_ms = float(np.percentile(latencies, 99) * 1000)


def hostile_phase(model: str, args: argparse.Namespace, warmup: list[list[str]]) -> HostileResult:
    """Normal clients beside hostile ones, on one server with the default limits; RSS sampled every 20 ms."""
    import threading
    from allmpnet.serve import ServeConfig
    config = ServeConfig()
    server = Server(model, list(args.server_flags))
    result = HostileResult(bound_mb=0.0)
    try:
        server.wait_ready()
        pid = server.process.pid
        result.rss_ready_mb = rss_mb(pid)
        result.bound_mb = result.rss_ready_mb + 3 * config.max_inflight_bytes / 2**20
        asyncio.run(drive(server.url, warmup, args.concurrency, PhaseResult(name="warm-up", server_flags=[])))
        result.rss_before_mb = rss_mb(pid)
        embedded_before = metric_total(httpx.get(f"{server.url}/metrics").text, "allmpnet_texts_embedded_total")
        peak, done = [result.rss_before_mb], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_mb(pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        normal = make_requests(args.hostile_requests, seed=5, max_words=args.max_words)
        asyncio.run(hostile_mix(server.url, normal, args, config.max_items, config.max_chars, result))
        deadline = time.monotonic() + 600
        while metric_total(httpx.get(f"{server.url}/metrics").text, "allmpnet_inflight_bytes") > 0:
            if time.monotonic() > deadline:
                raise TimeoutError("the server never finished its admitted requests")
            time.sleep(0.1)
        time.sleep(1.0)
        done.set()
        sampler.join()
        result.rss_peak_mb, result.rss_after_mb = peak[0], rss_mb(pid)
        metrics = httpx.get(f"{server.url}/metrics").text
        result.texts_embedded_in_total = int(metric_total(metrics, "allmpnet_texts_embedded_total") - embedded_before)
        result.answers_499 = int(metric_total(metrics, 'allmpnet_requests_total{route="/v1/embeddings",status="499"}'))
    finally:
        server.stop()
        server.log.seek(0)
        log = server.log.read()
        result.readers_dropped_by_server = log.count("dropped a connection whose client read nothing")
    return result


def report_hostile(r: HostileResult, args: argparse.Namespace) -> list[str]:
    giants_per_route = {route: n for route, n in r.giants_sent.items()}
    lines = [
        f"hostile mix ({r.seconds:.0f}s, one server, default limits): {r.normal_requests} normal requests from "
        f"{args.hostile_normal_concurrency} clients; giants of {r.giant_body_mb:.0f} MB ({args.giant_concurrency} "
        f"client(s) per route, {giants_per_route}); {r.disconnecting_clients} clients leaving 0-300 ms after "
        f"sending ({r.disconnecting_texts} texts); slow clients {r.slow_clients}",
        f"  normal clients: {r.normal_ok}/{r.normal_requests} ok, errors {sum(r.normal_errors.values())} "
        f"{r.normal_errors or ''}, 503 queue_full retried {r.normal_queue_full_503}, p50 {r.normal_p50_ms:.0f} ms, "
        f"p99 {r.normal_p99_ms:.0f} ms",
        f"  giants answered: {r.giants_answered}",
        f"  departed clients: {r.answers_499} requests dropped (counted as 499, never sent); texts embedded in all "
        f"{r.texts_embedded_in_total}, for the others {r.texts_embedded_for_others}: "
        f"{r.texts_embedded_in_total - r.texts_embedded_for_others} of the departed clients' "
        f"{r.disconnecting_texts} texts were computed (those answered before their client left included)",
        f"  slow clients whose connection the server had closed {args.slow_patience:.0f}s after they began: "
        f"{r.slow_closed_by_server} (readers answered 200 before stalling: {r.slow_readers_answered}; reset by the "
        f"server for not reading: {r.readers_dropped_by_server})",
        f"  server RSS: ready {r.rss_ready_mb:.0f} MB, before {r.rss_before_mb:.0f} MB, peak {r.rss_peak_mb:.0f} MB "
        f"(bound {r.bound_mb:.0f} MB = ready + 3 x max_inflight_bytes: {'within' if r.rss_peak_mb <= r.bound_mb else 'OVER'}),"
        f" after {r.rss_after_mb:.0f} MB ({r.after_vs_before:+.1%} vs before: "
        f"{'at most' if r.after_vs_before <= 0.10 else 'OVER'} +10 %)",
        f"  hostile mix checks (normal errors 0, peak under the bound, after at most +10 %): "
        f"{'passed' if r.passed else 'FAILED'}",
    ]
    return lines


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
    hostile = parser.add_argument_group("hostile mix")
    hostile.add_argument("--only-hostile", action="store_true", help="run the hostile mix alone")
    hostile.add_argument("--skip-hostile", action="store_true")
    hostile.add_argument("--hostile-requests", type=int, default=1500, help="normal requests beside the hostile ones")
    hostile.add_argument("--hostile-normal-concurrency", type=int, default=32)
    hostile.add_argument("--giant-routes", default="/tokenize,/v1/embeddings",
                         help="routes sent giant requests (max_items texts of max_chars characters each)")
    hostile.add_argument("--giants", type=int, default=3, help="giant requests per giant client")
    hostile.add_argument("--giant-concurrency", type=int, default=2, help="giant clients per route")
    hostile.add_argument("--disconnecting", type=int, default=200, help="clients that leave 0-300 ms after sending")
    hostile.add_argument("--slow", type=int, default=30, help="slow connections (headers, body and reading alike)")
    hostile.add_argument("--reader-texts", type=int, default=1024,
                         help="texts on each side of a slow reader's /similarity request (its answer: n x n scores)")
    hostile.add_argument("--slow-patience", type=float, default=90.0,
                         help="seconds a slow client waits for the server to close it")
    args = parser.parse_args()

    from allmpnet import Encoder
    from allmpnet.testing import build_random_model

    workdir = tempfile.TemporaryDirectory()
    model = str(build_random_model(Path(workdir.name) / "tiny")) if args.model == "tiny" else args.model
    batches = make_requests(args.requests, seed=0, max_words=args.max_words)
    warmup = make_requests(max(args.concurrency * 2, 100), seed=1, max_words=args.max_words)
    overload = make_requests(args.overload_requests, seed=2, max_words=args.max_words)
    check_rows = set(random.Random(3).sample(range(len(batches)), min(50, len(batches))))

    host = (f"host {platform.node()}, {os.cpu_count()} CPUs ({cpu_model()}), load average "
            f"{os.getloadavg()[0]:.1f} at start")
    if args.only_hostile:
        print(f"allmpnet serve hostile mix: model={args.model}, {len(warmup)} warm-up requests from {args.concurrency} "
              f"clients, then the mix; {host}", flush=True)
        hostile = hostile_phase(model, args, warmup)
        print("\n" + "\n".join(report_hostile(hostile, args)))
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        if args.json:
            args.json.write_text(json.dumps({"run": {"model": args.model, "cpus": os.cpu_count(), "cpu": cpu_model(),
                                                     "server_flags": args.server_flags},
                                             "hostile": asdict(hostile) | {"after_vs_before": hostile.after_vs_before}},
                                            indent=2) + "\n")
        return
    print(f"allmpnet serve load test: model={args.model}, {args.concurrency} concurrent clients, "
          f"{args.requests} requests/phase ({sum(map(len, batches))} texts, 1-32 per request, 3-{args.max_words} "
          f"words each); {host}", flush=True)
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
    hostile = None
    if not args.skip_hostile:
        print("  hostile mix", flush=True)
        hostile = hostile_phase(model, args, warmup)
        print("\n" + "\n".join(report_hostile(hostile, args)))
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
               "rounds": args.rounds, "cpus": os.cpu_count(), "cpu": cpu_model(), "server_flags": args.server_flags}
        phases = [asdict(r) | {"requests_per_s": r.requests_per_s, "texts_per_s": r.texts_per_s,
                               "rss_growth": r.rss_growth, "rss_growth_from_ready": r.rss_growth_from_ready}
                  for r in results]
        extra = {} if hostile is None else {"hostile": asdict(hostile) | {"after_vs_before": hostile.after_vs_before}}
        args.json.write_text(json.dumps({"run": run, "phases": phases, **extra}, indent=2) + "\n")


if __name__ == "__main__":
    main()
