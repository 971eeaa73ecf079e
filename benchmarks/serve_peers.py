"""Serving efficiency: `allmpnet serve` beside infinity-emb (torch engine) under the same loads, in one run.

Servers (one at a time, each a child process on loopback, killed at the end with its process group):

  allmpnet auto   `allmpnet serve --model all-mpnet-base-v2 --device cpu --precision auto`, otherwise its defaults
  allmpnet fp32   the same with --precision fp32
  infinity-emb    `infinity_emb v2 --model-id <published weights dir> --engine torch --device cpu --host 127.0.0.1
                  --port N`, otherwise its defaults, from .venv-peers-infinity (`--setup-peers` makes it from
                  benchmarks/peers/infinity.txt); run with DO_NOT_TRACK=1 (its telemetry would call out of this
                  offline machine) and HF_HUB_OFFLINE=1 (no hub here: the model is the local directory)

Loads (the load generator is this process: asyncio + aiohttp, each client sending its next request as soon as the
last is answered, STSBenchmark sentences drawn seeded from a pool of --pool sentences; encoding_format base64 for
every server, as the OpenAI Python client asks by default): (a) 16 clients x 8 sentences a request, (b) 64 clients
x 1. Each runs --warmup seconds unmeasured, then --seconds measured: sentences/s of the requests answered in the
window, p50/p99 latency, errors, and the server's CPU-seconds over the window (utime + stime from /proc/<pid>/stat,
which covers every thread, plus any child processes), giving sentences per server CPU-second.

Offline reference (a child process per precision): `Encoder("all-mpnet-base-v2", precision=P).encode(pool)` on the
same --pool sentences after one warm-up encode, sentences per CPU-second by time.process_time(); one round before the
servers and one after, the best counting. Each allmpnet row prints served per CPU-second / offline per CPU-second
(target: >= 85 % at both loads). infinity's row gets the same from sentence-transformers in its venv (batch 32).

Quality: up to --samples answers per row are checked in this process, after the servers are gone, against
Encoder.encode at the row's precision (max |diff|; infinity against fp32) and against our fp32 (min cosine).

Uneven load (--uneven, one `allmpnet serve --precision auto` with its defaults): (a) 24 concurrent requests of 6
texts x 250 random words: how many get 200 (target: all 24) and how many 503; (b) 16 "giant" clients (in a child
process, so their uploads do not stall this process's event loop) each sending 2,048 texts of 20,000 characters back
to back, beside one client sending one-sentence queries back to back: the query client's p50/p99/max (target p99
< 2 s), the giants' statuses, connection errors and completions. (b) is bounded at --seconds.

    nice -n 10 .venv/bin/python benchmarks/serve_peers.py --setup-peers      # once: .venv-peers-infinity
    nice -n 10 .venv/bin/python benchmarks/serve_peers.py --uneven --out benchmarks/results/serve_peers_<cpu>.txt
    nice -n 10 .venv/bin/python benchmarks/serve_peers.py --seconds 5 --warmup 2 --servers auto infinity
    nice -n 10 .venv/bin/python benchmarks/serve_peers.py --only-uneven --seconds 10
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encode_speed import DATA, cpu_description, sts_pairs  # noqa: E402
from serve_load import WORDS, free_port, rss_mb  # noqa: E402
from speed_paths import ROOT  # noqa: E402

MODEL = "all-mpnet-base-v2"
LOADS = {"a": (16, 8), "b": (64, 1)}  # name -> (clients, sentences a request)
SERVERS = ("auto", "fp32", "infinity")
PEER = "infinity"
TARGET_SHARE = 0.85  # served sentences per CPU-second over offline ones
TARGET_QUERY_P99 = 2.0  # seconds, uneven (b)
# infinity's own settings come from INFINITY_* variables: none may leak in from the caller's environment
INFINITY_ENV = {"DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1"}


# ---------------------------------------------------------------- peer venv


def peers_root() -> Path:
    """The main worktree of this repository: a peer venv is large and the same for every worktree, so it lives once."""
    try:
        common = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--path-format=absolute", "--git-common-dir"],
                                check=False, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        common = ""
    return Path(common).parent if common.endswith(".git") else ROOT


def peer_python(root: Path) -> Path:
    return root / f".venv-peers-{PEER}" / "bin" / "python"


def setup_peer(root: Path) -> None:
    """Create .venv-peers-infinity: the local CPU torch first, then a dry run that must not touch torch, then the pins.

    A bare `torch` requirement resolved with no torch installed takes a CUDA build of several GB; with 2.13.0 in
    place, infinity's `torch>=2.2.1` is already met. The dry run is the proof, before anything is installed.
    """
    venv = root / f".venv-peers-{PEER}"
    python = peer_python(root)
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip"]
    pins = ROOT / "benchmarks" / "peers" / f"{PEER}.txt"
    subprocess.run(pip + ["install", "-q", "torch==2.13.0"], check=True)
    report = subprocess.run(pip + ["install", "-q", "--dry-run", "--report", "-", "-r", str(pins)],
                            capture_output=True, text=True, check=True)
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.stdout).get("install", [])}
    if "torch" in planned:
        raise SystemExit(f"refusing: {pins.name} would replace the CPU torch with torch {planned['torch']}")
    subprocess.run(pip + ["install", "-q", "-r", str(pins)], check=True)
    torch_now = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"],
                               capture_output=True, text=True, check=True).stdout.strip()
    if not torch_now.startswith("2.13.0"):
        raise SystemExit(f"torch in {venv.name} is {torch_now}, not the CPU 2.13.0")
    freeze = subprocess.run(pip + ["freeze"], capture_output=True, text=True, check=True)
    (venv / "versions.txt").write_text(freeze.stdout)
    print(f"{venv}: ready (torch {torch_now}; {peer_versions(root)})")


def peer_versions(root: Path) -> str:
    path = root / f".venv-peers-{PEER}" / "versions.txt"
    if not path.is_file():
        return "not set up"
    pins = dict(line.split("==", 1) for line in path.read_text().splitlines() if "==" in line)
    names = ("infinity_emb", "torch", "sentence-transformers", "transformers", "fastapi", "uvicorn")
    return ", ".join(f"{n} {pins.get(n, pins.get(n.replace('_', '-'), '?'))}" for n in names)


# ---------------------------------------------------------------- servers


def one_line(error: BaseException, limit: int = 400) -> str:
    """An error on one line for the table: its start (what failed) and its end (the log's last words)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else f"{text[:limit // 3]} ... {text[-(limit - limit // 3):]}"


def tree_cpu_seconds(root: int) -> float:
    """utime + stime of `root` and every live descendant (each /proc/<pid>/stat covers all its threads), plus the
    cutime + cstime they hold for children already reaped, so a child that exits mid-window is not lost."""
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stats[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                pass  # exited while we looked
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += sum(int(stats[pid][i]) for i in (11, 12, 13, 14))
        todo += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


class ServerProcess:
    """A server in its own process group, logging to a file (a pipe nobody reads would block a chatty server)."""

    def __init__(self, label: str, cmd: list[str], route: str, env: dict[str, str] | None = None):
        self.label, self.cmd, self.route = label, cmd, route
        self.url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the server)
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 15) -> str:
        """The log's last lines, access-log lines left out (they bury the error)."""
        self.log.seek(0)
        kept = [line for line in self.log.read().splitlines() if line.strip() and ' HTTP/1.1" ' not in line]
        return "\n".join(kept[-lines:])

    def wait_ready(self, timeout: float) -> None:
        """Both servers answer GET /health with 200 once their model is loaded and warmed up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with code {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"no 200 from /health in {timeout:.0f} s: {self.log_tail()}")

    def stop(self) -> None:
        """SIGINT to the group (a clean uvicorn shutdown), SIGKILL after 20 s."""
        if self.process.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGINT)
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # whatever is left in the group, children included
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait(timeout=30)
        self.log.close()


def allmpnet_server(precision: str) -> ServerProcess:
    cmd = [sys.executable, "-m", "allmpnet", "serve", "--model", MODEL, "--device", "cpu", "--precision",
           precision, "--host", "127.0.0.1", "--port", str(free_port())]
    return ServerProcess(f"allmpnet {precision}", cmd, "/v1/embeddings")


def infinity_command(root: Path, model_dir: str, port: int) -> list[str]:
    # --engine torch is infinity's default, said anyway; --device cpu instead of its `auto` (the same here, no CUDA)
    return [str(peer_python(root).parent / "infinity_emb"), "v2", "--model-id", model_dir, "--engine", "torch",
            "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]


def infinity_server(root: Path, model_dir: str) -> ServerProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFINITY_") and k != "PYTHONPATH"}
    return ServerProcess("infinity-emb", infinity_command(root, model_dir, free_port()), "/embeddings",
                         env | INFINITY_ENV)


# ---------------------------------------------------------------- load


@dataclass
class Row:
    server: str
    load: str
    clients: int
    per_request: int
    precision: str  # the Encoder precision its answers are checked against
    why_not: str = ""  # set when the row could not run
    seconds: float = 0.0
    requests: int = 0
    sentences: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    rss_mb: float = 0.0
    load1: float = 0.0  # the machine's 1-minute load average at the window's end: other tenants show here
    kept: list[tuple[list[str], np.ndarray]] = field(default_factory=list)
    max_abs_diff: float = float("nan")
    min_cos_fp32: float = float("nan")
    offline_per_cpu: float = float("nan")

    @property
    def per_second(self) -> float:
        return self.sentences / self.seconds if self.seconds else 0.0

    @property
    def per_cpu(self) -> float:
        return self.sentences / self.server_cpu if self.server_cpu else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else float("nan")


def decode(body: bytes) -> np.ndarray:
    return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in json.loads(body)["data"]])


async def drive(server: ServerProcess, row: Row, pool: list[str], warmup: float, seconds: float, seed: int,
                samples: int, timeout: float) -> None:
    """Closed-loop clients for warmup + seconds; only answers that arrive inside the measured window count, and the
    server's CPU is read at the window's two edges, so both figures cover the same stretch of steady load."""
    start = time.perf_counter()
    window = (start + warmup, start + warmup + seconds)
    connector = aiohttp.TCPConnector(limit=row.clients)
    async with aiohttp.ClientSession(server.url, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def client(i: int) -> None:
            rng = random.Random(seed * 100_003 + i)
            while time.perf_counter() < window[1]:
                texts = rng.sample(pool, row.per_request)
                sent = time.perf_counter()
                retry_after = None
                try:
                    async with session.post(server.route, json={"input": texts, "encoding_format": "base64"}) as r:
                        status, body, retry_after = r.status, await r.read(), r.headers.get("Retry-After")
                except (aiohttp.ClientError, TimeoutError) as e:
                    status, body = type(e).__name__, b""
                done = time.perf_counter()
                if status != 200:
                    if window[0] <= done <= window[1]:
                        row.errors[str(status)] += 1
                    # a well-behaved client waits as told; and a refused connection must not become a tight loop
                    await asyncio.sleep(min(float(retry_after), 1.0) if retry_after else 0.05)
                    continue
                if not window[0] <= done <= window[1]:
                    continue
                n = len(json.loads(body)["data"])
                if n != len(texts):
                    row.errors["wrong count"] += 1
                    continue
                row.requests += 1
                row.sentences += n
                row.latencies.append(done - sent)
                if len(row.kept) < samples and row.requests % 3 == 0:  # spread over the window
                    row.kept.append((texts, decode(body)))

        async def meter() -> None:
            await asyncio.sleep(max(0.0, window[0] - time.perf_counter()))
            cpu0, mine0, t0 = tree_cpu_seconds(server.pid), time.process_time(), time.perf_counter()
            await asyncio.sleep(max(0.0, window[1] - time.perf_counter()))
            row.server_cpu = tree_cpu_seconds(server.pid) - cpu0
            row.client_cpu = time.process_time() - mine0
            row.seconds = time.perf_counter() - t0
            row.load1 = os.getloadavg()[0]

        await asyncio.gather(meter(), *(client(i) for i in range(row.clients)))
    if server.process.poll() is not None:  # its CPU and RSS are gone with it: the row cannot stand
        raise RuntimeError(f"exited during the load with code {server.process.returncode}: {server.log_tail()}")
    row.rss_mb = rss_mb(server.pid)


def run_server(name: str, args: argparse.Namespace, pool: list[str], model_dir: str) -> tuple[list[Row], str]:
    """Both loads on one server; returns the rows and the command line it ran."""
    precision = "fp32" if name == PEER else name
    label = "infinity-emb" if name == PEER else f"allmpnet {name}"
    rows = [Row(label, load, *LOADS[load], precision) for load in args.loads]
    if name == PEER and not peer_python(args.peers_dir).is_file():
        why = f"no {args.peers_dir}/.venv-peers-{PEER} (make it: benchmarks/serve_peers.py --setup-peers)"
        for row in rows:
            row.why_not = why
        return rows, ""
    server = infinity_server(args.peers_dir, model_dir) if name == PEER else allmpnet_server(name)
    try:
        started = time.perf_counter()
        server.wait_ready(args.startup_timeout)
        print(f"  {label}: ready in {time.perf_counter() - started:.0f} s", flush=True)
        for row in rows:
            print(f"  {label}: load ({row.load}) {row.clients} clients x {row.per_request}: {args.warmup:.0f} s "
                  f"warm-up + {args.seconds:.0f} s", flush=True)
            asyncio.run(drive(server, row, pool, args.warmup, args.seconds, args.seed, args.samples,
                              args.request_timeout))
    except (RuntimeError, TimeoutError) as e:
        for row in rows:
            if not row.rss_mb:  # the row it failed in, and those it never reached
                row.why_not = f"server failed: {one_line(e)}"
    finally:
        server.stop()
    return rows, " ".join(server.cmd)


# ---------------------------------------------------------------- offline reference (child process)


def offline_worker(args: argparse.Namespace) -> None:
    import torch

    from allmpnet import Encoder
    warnings.simplefilter("ignore")
    pool = sentence_pool(args.pool, args.seed)
    encoder = Encoder(MODEL, device="cpu", precision=args.offline_worker)
    encoder.encode(pool, batch_size=args.offline_batch_size, show_progress_bar=False)  # warm-up
    cpu0, wall0 = time.process_time(), time.perf_counter()  # process_time: every thread of this process
    encoder.encode(pool, batch_size=args.offline_batch_size, show_progress_bar=False)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(json.dumps({"sentences": len(pool), "cpu": cpu, "wall": wall, "threads": torch.get_num_threads()}))


# infinity's own model path off the server: sentence-transformers in its venv, at infinity's default batch size (32)
PEER_OFFLINE = """import json, sys, time, torch
from sentence_transformers import SentenceTransformer
pool = json.load(sys.stdin)
model = SentenceTransformer(sys.argv[1], device="cpu")
model.encode(pool, batch_size=32, show_progress_bar=False)
cpu0, wall0 = time.process_time(), time.perf_counter()
model.encode(pool, batch_size=32, show_progress_bar=False)
cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
print(json.dumps({"sentences": len(pool), "cpu": cpu, "wall": wall, "threads": torch.get_num_threads()}))
"""


def peer_offline(args: argparse.Namespace, pool: list[str], model_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | INFINITY_ENV
    proc = subprocess.run([str(peer_python(args.peers_dir)), "-c", PEER_OFFLINE, model_dir], input=json.dumps(pool),
                          check=False, capture_output=True, text=True, env=env, timeout=args.startup_timeout + 600)
    if proc.returncode != 0:
        raise RuntimeError(f"offline sentence-transformers in the peer venv failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def offline(precision: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--offline-worker", precision, "--pool", str(args.pool), "--seed",
           str(args.seed)] + (["--offline-batch-size", str(args.offline_batch_size)] if args.offline_batch_size else [])
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.startup_timeout + 600)
    if proc.returncode != 0:
        raise RuntimeError(f"offline {precision} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- uneven load


def random_texts(rng: random.Random, n: int, words: int) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=words)) for _ in range(n)]


async def burst(url: str, args: argparse.Namespace) -> tuple[Counter, float]:
    """(a): every request sent at once; no retries, so a 503 stays a 503."""
    rng = random.Random(args.seed + 1)
    bodies = [random_texts(rng, args.burst_texts, args.burst_words) for _ in range(args.burst_requests)]
    statuses: Counter = Counter()
    slowest = 0.0
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=args.burst_timeout)) as session:
        async def one(texts: list[str]) -> None:
            nonlocal slowest
            start = time.perf_counter()
            try:
                async with session.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"}) as r:
                    await r.read()
                    statuses[str(r.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as e:
                statuses[type(e).__name__] += 1
            slowest = max(slowest, time.perf_counter() - start)
        await asyncio.gather(*(one(texts) for texts in bodies))
    return statuses, slowest


def giants_worker(args: argparse.Namespace) -> None:
    """(b)'s giant clients, in their own process: prints "ready" once the body is built, then a JSON summary."""
    rng = random.Random(args.seed + 2)
    blocks = [" ".join(rng.choices(WORDS, k=args.giant_chars // 3))[:args.giant_chars - 7] for _ in range(32)]
    texts = [f"{blocks[i % 32]} {i:06d}" for i in range(args.giant_texts)]  # unique: no answer can be reused
    body = json.dumps({"input": texts, "encoding_format": "base64"}).encode()
    statuses: Counter = Counter()
    print("ready", flush=True)
    deadline = time.monotonic() + args.seconds

    async def client() -> None:
        async with aiohttp.ClientSession(args.giants_worker) as session:
            while (left := deadline - time.monotonic()) > 0.1:
                retry_after = None
                try:
                    async with asyncio.timeout(left):
                        async with session.post("/v1/embeddings", data=body,
                                                headers={"Content-Type": "application/json"}) as r:
                            await r.read()
                            statuses[str(r.status)] += 1
                            retry_after = r.headers.get("Retry-After")
                except TimeoutError:
                    statuses["unanswered at the phase's end"] += 1
                    return
                except aiohttp.ClientError as e:
                    statuses[f"connection error ({type(e).__name__})"] += 1
                    await asyncio.sleep(0.1)  # a reset must not turn into a tight loop
                if retry_after:
                    await asyncio.sleep(min(float(retry_after), max(0.0, deadline - time.monotonic())))

    async def main() -> None:
        await asyncio.gather(*(client() for _ in range(args.giant_clients)))

    asyncio.run(main())
    print(json.dumps({"statuses": dict(statuses), "body_mb": len(body) / 1e6}))


async def query_client(url: str, pool: list[str], seconds: float, seed: int) -> tuple[list[float], Counter]:
    rng = random.Random(seed + 3)
    latencies: list[float] = []
    statuses: Counter = Counter()
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=max(seconds, 5.0))) as session:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                async with session.post("/v1/embeddings", json={"input": [rng.choice(pool)],
                                                                "encoding_format": "base64"}) as r:
                    await r.read()
                    statuses[str(r.status)] += 1
                    if r.status == 200:
                        latencies.append(time.perf_counter() - start)
            except (aiohttp.ClientError, TimeoutError) as e:
                statuses[type(e).__name__] += 1
                await asyncio.sleep(0.05)
    return latencies, statuses


def uneven(args: argparse.Namespace, pool: list[str], out) -> None:
    server = allmpnet_server("auto")
    giants = None
    try:
        server.wait_ready(args.startup_timeout)
        out(f"uneven load on one server: {' '.join(server.cmd)}")
        statuses, slowest = asyncio.run(burst(server.url, args))
        ok = statuses.get("200", 0)
        out(f"  (a) {args.burst_requests} concurrent requests of {args.burst_texts} texts x {args.burst_words} random "
            f"words: 200 {ok}/{args.burst_requests} ({'met' if ok == args.burst_requests else 'MISSED'}: target all),"
            f" 503 {statuses.get('503', 0)}, all {dict(statuses)}; slowest answer {slowest:.1f} s")
        cmd = [sys.executable, __file__, "--giants-worker", server.url, "--seconds", str(args.seconds),
               "--seed", str(args.seed), "--giant-clients", str(args.giant_clients), "--giant-texts",
               str(args.giant_texts), "--giant-chars", str(args.giant_chars)]
        giants = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
        if not select.select([giants.stdout], [], [], 120)[0] or giants.stdout.readline().strip() != "ready":
            raise RuntimeError("the giant clients did not start")
        time.sleep(1.0)  # the giants' uploads are under way before the first query
        latencies, queries = asyncio.run(query_client(server.url, pool, max(1.0, args.seconds - 1.0), args.seed))
        stdout, stderr = giants.communicate(timeout=args.seconds + 120)
        if giants.returncode != 0:
            raise RuntimeError(f"giant clients failed: {stderr[-1500:]}")
        summary = json.loads(stdout.strip().splitlines()[-1])
        lat = np.array(latencies) if latencies else np.array([float("nan")])
        p99 = float(np.percentile(lat, 99))
        failed = sum(n for s, n in queries.items() if s != "200")
        met = "met" if p99 < TARGET_QUERY_P99 and not failed else "MISSED"
        out(f"  (b) {args.giant_clients} giant clients, each {args.giant_texts} texts of {args.giant_chars:,} "
            f"characters a request ({summary['body_mb']:.0f} MB), back to back for {args.seconds:.0f} s, beside one "
            f"client sending one STSBenchmark sentence a request")
        out(f"      query client: {sum(queries.values())} queries, statuses {dict(queries)}; p50 "
            f"{np.percentile(lat, 50) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {lat.max() * 1000:.0f} ms "
            f"({met}: target p99 < {TARGET_QUERY_P99:.0f} s, no failures)")
        giant = summary["statuses"]
        out(f"      giants: {summary['statuses']}; completed (200): {giant.get('200', 0)}; connection errors: "
            f"{sum(n for s, n in giant.items() if s.startswith('connection error'))}")
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as e:
        out(f"  uneven load failed: {one_line(e, 600)}")
    finally:
        if giants is not None and giants.poll() is None:
            os.killpg(giants.pid, signal.SIGKILL)
            giants.wait(timeout=30)
        server.stop()


# ---------------------------------------------------------------- report


def sentence_pool(n: int, seed: int) -> list[str]:
    """A seeded sample of n distinct STSBenchmark test sentences: the loads draw from it, the offline encode runs it."""
    s1, s2, _ = sts_pairs(DATA)
    unique = sorted(set(s1 + s2))
    return random.Random(seed).sample(unique, min(n, len(unique)))


def git_commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], check=False, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no")  # read-only: says whether the run is of HEAD
    return git("rev-parse", "--short=12", "HEAD") + (" (with uncommitted changes)" if dirty else "")


def cores() -> str:
    info = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], check=False, capture_output=True, text=True)
                .stdout.splitlines() if ":" in line)
    per_socket, sockets = info.get("Core(s) per socket", "?").strip(), info.get("Socket(s)", "?").strip()
    return f"{os.cpu_count()} logical CPUs, {per_socket} cores per socket x {sockets} socket(s)"


def check_quality(rows: list[Row]) -> None:
    """After the servers are gone: each kept answer against Encoder.encode of the same texts in this process."""
    from allmpnet import Encoder
    encoders: dict[str, Encoder] = {}

    def encode(precision: str, texts: list[str]) -> np.ndarray:
        if precision not in encoders:
            encoders[precision] = Encoder(MODEL, device="cpu", precision=precision)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return encoders[precision].encode(texts, show_progress_bar=False)

    for row in rows:
        if not row.kept:
            continue
        diffs, cosines = [], []
        for texts, got in row.kept:
            diffs.append(float(np.abs(got - encode(row.precision, texts)).max()))
            ref = encode("fp32", texts)
            cosines.append(float(((got * ref).sum(1) / (np.linalg.norm(got, axis=1) *
                                                         np.linalg.norm(ref, axis=1))).min()))
        row.max_abs_diff, row.min_cos_fp32 = max(diffs), min(cosines)


def table(rows: list[Row], out) -> None:
    header = (f"{'server':<15}{'load':<9}{'sent/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'errors':>7}{'srv CPU-s':>10}"
              f"{'sent/CPU-s':>11}{'offline':>9}{'served/off':>11}{'clnt CPU-s':>11}{'ldavg':>6}{'RSS MB':>7}"
              f"{'checked':>8}{'max|diff|':>10}{'cos fp32':>9}")
    out(header)
    out("-" * len(header))
    for r in rows:
        load = f"{r.clients}x{r.per_request}"
        if r.why_not:
            out(f"{r.server:<15}{load:<9}unavailable: {r.why_not}")
            continue
        share = (f"{100 * r.per_cpu / r.offline_per_cpu:10.0f}%" if r.offline_per_cpu == r.offline_per_cpu
                 else f"{'-':>11}")
        offline_cell = f"{r.offline_per_cpu:9.1f}" if r.offline_per_cpu == r.offline_per_cpu else f"{'-':>9}"
        errors = sum(r.errors.values())
        out(f"{r.server:<15}{load:<9}{r.per_second:8.1f}{r.pct(50):8.0f}{r.pct(99):8.0f}{errors:7d}"
            f"{r.server_cpu:10.1f}{r.per_cpu:11.1f}{offline_cell}{share}{r.client_cpu:11.1f}{r.load1:6.1f}"
            f"{r.rss_mb:7.0f}"
            f"{sum(len(t) for t, _ in r.kept):8d}{r.max_abs_diff:10.1e}{r.min_cos_fp32:9.5f}")
    for r in rows:
        if r.errors:
            out(f"{r.server} {r.clients}x{r.per_request} errors: {dict(r.errors)}")
        if r.seconds and r.client_cpu > 0.8 * r.seconds:  # one asyncio thread: near one core, it sets the pace
            out(f"{r.server} {r.clients}x{r.per_request}: the load generator used {r.client_cpu:.1f} CPU-s in "
                f"{r.seconds:.1f} s, near one core: sentences/s may be the client's limit, not the server's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="measured seconds per load and server; also the bound of the uneven phase's (b)")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds of the same load, unmeasured, before each measured window")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS),
                        help="which servers: allmpnet --precision auto, --precision fp32, infinity-emb (default all)")
    parser.add_argument("--loads", nargs="+", choices=list(LOADS), default=list(LOADS),
                        help="a: 16 clients x 8 sentences a request; b: 64 clients x 1 (default both)")
    parser.add_argument("--pool", type=int, default=2048,
                        help="distinct STSBenchmark sentences (seeded sample): the loads draw from them, and the "
                             "offline reference encodes exactly them")
    parser.add_argument("--seed", type=int, default=0, help="seeds the pool, each client's draws and the uneven texts")
    parser.add_argument("--samples", type=int, default=32,
                        help="answers per row checked against Encoder.encode in this process")
    parser.add_argument("--offline-batch-size", type=int, default=None,
                        help="texts per batch of the offline encode (default: Encoder's token budget, 4096 tokens on "
                             "CPU, the same as the server's --max-batch-tokens default)")
    parser.add_argument("--offline-rounds", type=int, default=2,
                        help="offline reference runs per server: one before the servers, one after (the best counts); "
                             "0 skips it (no served/offline %%)")
    parser.add_argument("--uneven", action="store_true", help="also run the uneven load phase (see above)")
    parser.add_argument("--only-uneven", action="store_true", help="run the uneven load phase alone")
    parser.add_argument("--burst-requests", type=int, default=24, help="uneven (a): concurrent requests")
    parser.add_argument("--burst-texts", type=int, default=6, help="uneven (a): texts per request")
    parser.add_argument("--burst-words", type=int, default=250, help="uneven (a): random words per text")
    parser.add_argument("--burst-timeout", type=float, default=300.0,
                        help="uneven (a): seconds each request may take (it is not bounded by --seconds)")
    parser.add_argument("--giant-clients", type=int, default=16, help="uneven (b): giant clients")
    parser.add_argument("--giant-texts", type=int, default=2048, help="uneven (b): texts per giant request")
    parser.add_argument("--giant-chars", type=int, default=20000, help="uneven (b): characters per giant text")
    parser.add_argument("--startup-timeout", type=float, default=600.0,
                        help="seconds a server may take to answer /health (infinity warms up for ~30 s on 2 cores)")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds one load request may take")
    parser.add_argument("--peers-dir", type=Path, default=None,
                        help="folder holding .venv-peers-infinity (default: this repository's main worktree, so "
                             "every worktree shares one venv)")
    parser.add_argument("--setup-peers", action="store_true",
                        help="create .venv-peers-infinity from benchmarks/peers/infinity.txt, then exit")
    parser.add_argument("--out", type=Path, help="also write the report here, e.g. "
                                                 "benchmarks/results/serve_peers_<cpu>.txt")
    parser.add_argument("--offline-worker", help=argparse.SUPPRESS)
    parser.add_argument("--giants-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.peers_dir = args.peers_dir or peers_root()
    if args.setup_peers:
        return setup_peer(args.peers_dir)
    if args.offline_worker:
        return offline_worker(args)
    if args.giants_worker:
        return giants_worker(args)
    # SIGTERM (e.g. from `timeout`) must unwind through the finally blocks that stop the servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import torch

    import allmpnet
    from allmpnet.weights import published_dir
    model_dir = str(published_dir())
    lines: list[str] = []

    def out(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    pool = sentence_pool(args.pool, args.seed)
    out(f"serve_peers  {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  commit {git_commit()}")
    out(f"CPU: {cpu_description()}; {cores()}; load average at start "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    out(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    out(f"ours: allmpnet {allmpnet.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"peer venv {args.peers_dir}/.venv-peers-{PEER}: {peer_versions(args.peers_dir)}")
    out(f"model: {MODEL} (the published weights, {model_dir}); texts: {len(pool)} distinct STSBenchmark sentences "
        f"(seed {args.seed}); requests with encoding_format base64")
    if args.only_uneven:
        uneven(args, pool, out)
        return write(args, lines)

    readings: dict[str, list[dict]] = {}

    def offline_round() -> None:
        for name in args.servers:
            if name == PEER and not peer_python(args.peers_dir).is_file():
                continue
            print(f"  offline reference: {name}", flush=True)
            try:
                ref = peer_offline(args, pool, model_dir) if name == PEER else offline(name, args)
                readings.setdefault(name, []).append(ref)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                out(f"offline reference {name} failed: {one_line(e)}")

    if args.offline_rounds:
        offline_round()
    rows: list[Row] = []
    commands: dict[str, str] = {}
    for name in args.servers:
        got, cmd = run_server(name, args, pool, model_dir)
        rows += got
        if cmd:
            commands[got[0].server] = cmd
    # a second round after the servers brackets them in time, and the best reading counts: drifting load from other
    # tenants then makes the served/offline share look worse, never better
    for _ in range(1, args.offline_rounds):
        offline_round()
    offline_refs = {name: max(rs, key=lambda r: r["sentences"] / r["cpu"]) for name, rs in readings.items()}
    for row in rows:
        key = PEER if row.server == "infinity-emb" else row.precision
        if key in offline_refs:
            row.offline_per_cpu = offline_refs[key]["sentences"] / offline_refs[key]["cpu"]
    check_quality(rows)

    out()
    for label, cmd in commands.items():
        out(f"{label}: {cmd}")
    if PEER in args.servers:
        out(f"infinity-emb flags: --model-id (the published weights' local sentence-transformers directory: no hub "
            f"here), --port/--host (a free loopback port), --engine torch (its default, said anyway), --device cpu "
            f"(its default `auto` picks the same here); environment "
            f"{' '.join(f'{k}={v}' for k, v in INFINITY_ENV.items())}"
            f" (telemetry off: it would call out; hub offline); the rest its defaults (batch size 32, dtype auto = "
            f"float32 on CPU, no torch.compile, BetterTransformer skipped as optimum is not installed)")
    for name, ref in offline_refs.items():
        what = (f"SentenceTransformer(<weights dir>).encode({ref['sentences']} sentences, batch_size=32) in the peer "
                f"venv (infinity's model path and default batch size, without its server)" if name == PEER else
                f"Encoder({MODEL!r}, precision={name!r}).encode({ref['sentences']} sentences, "
                f"batch_size={args.offline_batch_size})")
        each = ", ".join(f"{r['sentences'] / r['cpu']:.1f}" for r in readings[name])
        out(f"offline reference {name}: {what}, after one warm-up encode, {ref['threads']} torch threads: "
            f"{ref['sentences'] / ref['cpu']:.1f} sentences per CPU-second ({ref['cpu']:.1f} CPU-s; the best of "
            f"{len(readings[name])} rounds: {each}), {ref['sentences'] / ref['wall']:.1f} sentences/s wall")
    out(f"loads: {args.warmup:.0f} s warm-up, then {args.seconds:.0f} s measured; sent/CPU-s = sentences answered in "
        f"the window / the server's CPU-seconds in it; served/off = that over the offline reference's; clnt CPU-s: "
        f"this load generator's own CPU in the window (it shares the machine); checked: sentences compared with "
        f"Encoder.encode at the row's precision (max|diff|; infinity against fp32) and cos fp32 = min cosine to ours")
    out()
    table(rows, out)
    out()
    for r in rows:
        if r.server.startswith("allmpnet") and r.offline_per_cpu == r.offline_per_cpu and not r.why_not:
            share = r.per_cpu / r.offline_per_cpu
            out(f"target served/offline >= {TARGET_SHARE:.0%}: {r.server} {r.clients}x{r.per_request} "
                f"{share:.0%} {'met' if share >= TARGET_SHARE else 'MISSED'}")
    peer = {r.load: r for r in rows if r.server == "infinity-emb" and not r.why_not}
    for r in rows:
        if r.server.startswith("allmpnet") and r.load in peer and peer[r.load].per_cpu and peer[r.load].per_second:
            p = peer[r.load]
            out(f"{r.server} vs infinity-emb at {r.clients}x{r.per_request}: {r.per_second / p.per_second:.2f}x "
                f"sentences/s, {r.per_cpu / p.per_cpu:.2f}x sentences per server CPU-second")
    if args.uneven:
        out()
        uneven(args, pool, out)
    out(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    write(args, lines)


def write(args: argparse.Namespace, lines: list[str]) -> None:
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
