"""`embed_corpus`: a whole corpus to Parquet shards of embeddings, on a pool of Ray actors, one model each.

The driver plans shards (plan.py), skips those already finished and verified (shards.py), and hands the rest
to the actors one at a time: each actor loads one Encoder, then reads, checks, embeds and writes the shard it
is given and returns a small report, and the driver hands it the next. Nothing corpus-sized passes through
the driver or the object store, so memory stays flat however large the corpus is.

The pool is plain Ray actors rather than a Ray Data pipeline: the job is a queue of shard names, and Ray
Data's executor, with the three actors of its own it starts per job (stats, autoscaling, actor locations),
cost 2 s of start-up per job (docs/bulk.md, Benchmark).
"""
from __future__ import annotations

import os
import re
import resource
import socket
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from allmpnet.bulk.plan import ShardSpec, auto_shard_rows, find_inputs, plan_shards
from allmpnet.bulk.readers import read_shard
from allmpnet.bulk.shards import JOB, SUMMARY, OutputDir, shard_table
from allmpnet.errors import AllmpnetError, InvalidInput
from allmpnet.settings import default_precision
from allmpnet.weights import DEFAULT_MODEL

ON_BAD = ("fail", "skip")
# a shard's time, and "waiting": the actor's time between ready (or its previous shard) and this shard's start,
# which is the driver's round trip
PHASES = ("waiting", "read", "tokenize", "encode", "write")
SHARD_RETRIES = 3  # runs of a shard after the first whose worker process died (killed, out of memory, node lost)


@dataclass
class BulkConfig:
    model: str = DEFAULT_MODEL
    id_field: str = "id"
    text_field: str = "text"
    keep: tuple[str, ...] = ()  # input columns copied next to each embedding
    # rows per output shard, the unit of work and of resuming; None: about AUTO_SHARDS shards of 1,000 to 10,000
    # rows, fixed by the inputs alone (plan.auto_shard_rows), so that a small corpus still spreads over the workers
    shard_rows: int | None = None
    batch_size: int | None = None  # texts per forward pass; None: the token budget decides, as Encoder.encode does
    on_bad: str = "fail"  # a bad row stops the job ("fail") or is left out and counted ("skip")
    # actors, each holding one model, and the CPUs each reserves (also its torch threads); None: chosen from the
    # cluster's nodes so that every core is used (cluster.plan_layout)
    workers: int | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 0  # > 0 puts each actor's model on a GPU
    # the default is resolved on the driver ($ALLMPNET_PRECISION, else fp32): the workers get the name, and the
    # job's recorded settings say which precision its shards hold
    precision: str = field(default_factory=default_precision)
    max_seq_length: int | None = None

    def check(self) -> None:
        if self.on_bad not in ON_BAD:
            raise InvalidInput(f"on_bad must be one of {ON_BAD}, got {self.on_bad!r}")
        for name in ("shard_rows", "batch_size", "workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InvalidInput(f"{name} must be at least 1, got {getattr(self, name)}")
        if (self.cpus_per_worker is not None and self.cpus_per_worker <= 0) or self.gpus_per_worker < 0:
            raise InvalidInput("cpus_per_worker must be positive and gpus_per_worker not negative")
        from allmpnet.encode.precision import check_precision_name  # torch stays out of the driver's imports
        check_precision_name(self.precision)
        if self.id_field == self.text_field or {"id", "embedding"} & set(self.keep):
            raise InvalidInput("the id and text fields must differ, and kept columns cannot be named id or embedding")


@dataclass
class BulkResult:
    out_dir: str
    shards: int = 0
    skipped: int = 0  # finished by an earlier run and verified
    written: int = 0
    rows: int = 0  # embedded rows in the whole output
    bad_rows: int = 0
    bad_examples: list[tuple[str, str]] = field(default_factory=list)
    truncated: int = 0
    seconds: float = 0.0  # the whole call
    # of which importing and starting (or joining) Ray, and stopping an instance started for the call: Ray's own
    # costs, reported apart from the job's
    ray_start_seconds: float = 0.0
    ray_stop_seconds: float = 0.0
    shard_rows: int = 0  # rows per shard, as given or chosen
    layout: str = ""  # workers x CPUs (threads) per worker, and how they were chosen
    # "host:pid" -> threads, startup_seconds (model load and precision plan), rows, seconds (wall, its shards),
    # cpu_seconds (all its threads), peak_rss_mb, and seconds per phase of its shards (read, tokenize, encode,
    # write)
    workers: dict[str, dict] = field(default_factory=dict)

    @property
    def job_seconds(self) -> float:
        """The job's own time: the call less Ray's start-up and shutdown (actors starting and loading the model
        are the job's)."""
        return self.seconds - self.ray_start_seconds - self.ray_stop_seconds


class BadRowsError(AllmpnetError, ValueError):
    """Bad rows under on_bad="fail"; the message lists their locations."""


class BulkJobError(RuntimeError):
    """A worker could not embed or write a shard (the message names the shard and the cause)."""


def embed_corpus(inputs: str | list[str], out_dir: str, config: BulkConfig | None = None,
                 address: str | None = None, overwrite: bool = False, progress: bool = True) -> BulkResult:
    """Embed every row of the inputs into Parquet shards under out_dir; a re-run finishes what is missing.

    Ray is started locally for the call unless it is already running or address names a cluster to join
    ("auto" finds a local one). Bad rows (no id, no text, not a string, unreadable) stop the job naming their
    location, or with on_bad="skip" are left out and listed in the manifest.
    """
    config = config or BulkConfig()
    config.check()
    started = time.perf_counter()
    files = find_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else [str(i) for i in inputs])
    shards = plan_shards(files, config.shard_rows, config.id_field, config.text_field, tuple(config.keep))
    shard_rows = config.shard_rows or auto_shard_rows(sum(s.rows for s in shards))
    out = OutputDir(str(out_dir))
    job = _job_record(files, shards, config, shard_rows)
    _claim(out, job, overwrite)

    result = BulkResult(out_dir=str(out_dir), shards=len(shards), shard_rows=shard_rows)
    with ThreadPoolExecutor(max_workers=8) as pool:  # hashing releases the GIL
        done = dict(zip([s.name for s in shards], pool.map(out.finished, [s.name for s in shards])))
    pending = [s for s in shards if done[s.name] is None]
    for entry in filter(None, done.values()):
        _absorb(result, entry)
        result.skipped += 1
    if result.bad_rows and config.on_bad == "fail":
        raise _bad_rows_error(result)
    if pending:
        _run_on_ray(pending, out, config, address, progress, result)
    result.seconds = time.perf_counter() - started
    out.write_json(SUMMARY, {k: v for k, v in asdict(result).items() if k != "bad_examples"}
                   | {"bad_examples": result.bad_examples[:100]})
    return result


def _job_record(files, shards: list[ShardSpec], config: BulkConfig, shard_rows: int) -> dict:
    """What the output depends on; a re-run into the same directory must match it (the shard size as used, so
    that the default and the same size given explicitly are the same job)."""
    from allmpnet.weights import resolve
    model_dir = resolve(config.model)
    weights = model_dir / "model.safetensors"
    return {"inputs": [asdict(f) for f in files],
            "model": {"name": config.model, "directory": str(model_dir),
                      "weights_bytes": weights.stat().st_size if weights.is_file() else None},
            "settings": {k: getattr(config, k) for k in ("id_field", "text_field", "precision", "max_seq_length")}
            | {"shard_rows": shard_rows, "keep": list(config.keep)},
            "shards": [s.name for s in shards]}


def _claim(out: OutputDir, job: dict, overwrite: bool) -> None:
    previous = out.read_json(JOB)
    if previous is not None and previous != job:
        if not overwrite:
            changed = [k for k in ("inputs", "model", "settings", "shards") if previous.get(k) != job.get(k)]
            raise InvalidInput(f"{out.uri} holds a run over different {', '.join(changed)}; resume needs the same "
                               "inputs and settings. Use another output directory, or overwrite=True "
                               "(--overwrite) to replace it")
        out.remove_outputs()
    elif previous is not None and overwrite:
        out.remove_outputs()
    out.makedirs()
    out.write_json(JOB, job)


def _absorb(result: BulkResult, entry: dict) -> None:
    result.rows += entry["rows"]
    result.bad_rows += len(entry["bad"])
    result.bad_examples += [tuple(b) for b in entry["bad"][: max(0, 20 - len(result.bad_examples))]]
    result.truncated += entry["truncated"]
    worker = result.workers.setdefault(entry["worker"], {"rows": 0, "seconds": 0.0, "cpu_seconds": 0.0,
                                                         "peak_rss_mb": 0.0, "phases": dict.fromkeys(PHASES, 0.0)})
    worker["rows"] += entry["rows"]
    worker["seconds"] += entry["seconds"]
    worker["cpu_seconds"] += entry.get("cpu_seconds", 0.0)
    worker["peak_rss_mb"] = max(worker["peak_rss_mb"], entry["peak_rss_mb"])
    for key in ("threads", "startup_seconds"):  # absent from entries written before these were recorded
        if key in entry:
            worker[key] = entry[key]
    for phase, seconds in entry.get("phases", {}).items():
        worker["phases"][phase] = worker["phases"].get(phase, 0.0) + seconds


def _bad_rows_error(result: BulkResult) -> BadRowsError:
    shown = "; ".join(f"{where}: {why}" for where, why in result.bad_examples[:5])
    more = f" (and {result.bad_rows - 5} more)" if result.bad_rows > 5 else ""
    return BadRowsError(f"{result.bad_rows} bad row(s): {shown}{more}; fix them, or pass on_bad='skip' "
                        "(--on-bad skip) to leave them out and count them")


def _run_on_ray(pending: list[ShardSpec], out: OutputDir, config: BulkConfig, address: str | None,
                progress: bool, result: BulkResult) -> None:
    connecting = time.perf_counter()
    try:
        import ray
    except ImportError as e:
        raise ImportError("embed_corpus needs Ray: pip install 'allmpnet[ray]'") from e
    from allmpnet.bulk.cluster import ray_session
    with ray_session(address) as owns_ray:
        result.ray_start_seconds = time.perf_counter() - connecting
        try:
            # a local instance of our own will not grow; a cluster joined by address may scale up to the pool
            local = owns_ray and not (address or os.environ.get("RAY_ADDRESS"))
            _embed_pending(ray, pending, out, config, progress, result, strict=local)
        finally:
            stopping = time.perf_counter()
    result.ray_stop_seconds = time.perf_counter() - stopping


def _embed_pending(ray, pending: list[ShardSpec], out: OutputDir, config: BulkConfig, progress: bool,
                   result: BulkResult, strict: bool) -> None:
    """The actor pool over the pending shards, on the Ray this process is connected to (strict: a local instance
    of our own, which will not grow to hold a pool it cannot hold now)."""
    from allmpnet.bulk.cluster import cluster_nodes, plan_layout
    # sized by the CPUs and GPUs not already reserved (by Serve replicas on the same cluster, say)
    layout = plan_layout(*cluster_nodes(free=True), workers=config.workers, cpus_per_worker=config.cpus_per_worker,
                         gpus_per_worker=config.gpus_per_worker)
    result.layout = layout.describe()
    _check_resources(ray.cluster_resources(), layout, strict=strict)
    free_before = ray.available_resources().get("CPU", 0.0)
    try:
        _run_pool(ray, pending, out, config, progress, result, layout)
    finally:
        _wait_for_release(ray, free_before)


def _wait_for_release(ray, cpus: float, timeout: float = 5.0) -> None:
    """Ray releases a killed actor's resources asynchronously: wait (bounded) until the CPUs the pool held are
    free again, so that a job started next on the same cluster is sized by the cores, not by what this one held."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0.0) < cpus and time.monotonic() < deadline:
        time.sleep(0.05)


def _run_pool(ray, pending: list[ShardSpec], out: OutputDir, config: BulkConfig, progress: bool,
              result: BulkResult, layout) -> None:
    """Each actor is handed one shard at a time, the next as soon as it reports the last, so that the final
    shards never queue behind a busy actor while another idles. An actor whose process or node is lost is
    restarted by Ray (it loads the model again) and the shard it held is run again (up to SHARD_RETRIES
    times); shards are written whole or not at all, so a rerun shard replaces nothing."""
    # a shard whose worker dies this many times (one too large for the node's memory, say) fails the job,
    # named, rather than restarting workers forever
    worker = ray.remote(ShardWorker).options(num_cpus=layout.cpus_per_worker,
                                             num_gpus=layout.gpus_per_worker or None,
                                             max_restarts=-1, max_task_retries=SHARD_RETRIES)
    worker_config = asdict(config) | {"workers": layout.workers, "cpus_per_worker": layout.cpus_per_worker}
    actors = [worker.remote(worker_config, out.uri, layout.threads)
              for _ in range(min(layout.workers, len(pending)))]
    queue = deque(pending)
    running = {}  # the shard's result ref -> (the actor embedding it, the shard's name)

    def hand(actor) -> None:
        spec = queue.popleft()
        running[actor.embed_shard.remote(spec.to_dict())] = (actor, spec.name)

    try:
        for actor in actors:
            hand(actor)
        with tqdm(total=sum(s.rows for s in pending), desc="embedding", unit="row", disable=not progress) as bar:
            while running:
                (ref,), _ = ray.wait(list(running), num_returns=1)
                actor, shard = running.pop(ref)
                entry = _shard_report(ray, ref, shard)
                if entry.get("error"):
                    raise BulkJobError(f"worker {entry['worker']} failed on {entry['shard']}: {entry['error']}")
                _absorb(result, entry)
                if entry.get("refused"):  # bad rows under on_bad="fail": nothing was written
                    raise _bad_rows_error(result)
                result.written += 1
                bar.update(entry["rows"] + len(entry["bad"]))
                bar.set_postfix(shards=f"{result.written + result.skipped}/{result.shards}", bad=result.bad_rows)
                if queue:
                    hand(actor)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)


def _shard_report(ray, ref, shard: str) -> dict:
    """A shard's report; Ray's own failures (an actor that could not start, a worker that died on the shard more
    than SHARD_RETRIES times) as one BulkJobError naming the shard and the cause."""
    import ray.exceptions
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:
        causes = [line.strip() for line in str(e).splitlines() if re.match(r"\s*[\w.]+(Error|Exception): ", line)]
        raise BulkJobError(f"the Ray job failed on {shard}: {causes[-1] if causes else str(e).splitlines()[0]}") \
            from e


def _check_resources(available: dict, layout, strict: bool) -> None:
    """A pool the cluster cannot hold would wait forever; say so instead (a cluster may still scale up)."""
    need = {"CPU": layout.workers * layout.cpus_per_worker, "GPU": layout.workers * layout.gpus_per_worker}
    short = [f"{need[k]:g} {k}s (the cluster has {available.get(k, 0):g})" for k in need
             if need[k] > available.get(k, 0)]
    if short:
        message = (f"{layout.workers} workers need {' and '.join(short)}; lower workers or the per-worker "
                   "resources")
        if strict:
            raise InvalidInput(message)
        warnings.warn(message + "; waiting for the cluster to provide them", RuntimeWarning, stacklevel=3)


class ShardWorker:
    """A Ray actor: one Encoder, ready before the first shard, then one shard per call."""

    def __init__(self, config: dict, out_uri: str, threads: int):
        started = time.perf_counter()
        import torch

        from allmpnet.encode import Encoder
        self.config = BulkConfig(**config)
        self.config.keep = tuple(self.config.keep)
        # Ray set OMP_NUM_THREADS to the actor's CPU reservation, and torch took it; our kernels run as many
        # OpenMP threads as torch has, so this is the one number that decides the cores a forward pass uses
        torch.set_num_threads(threads)
        device = "cuda" if self.config.gpus_per_worker > 0 else "cpu"
        self.encoder = Encoder(self.config.model, device=device, precision=self.config.precision,
                               max_seq_length=self.config.max_seq_length)
        # the precision plan (auto's calibration and quality guard, the int8 copy) is built now, once per actor,
        # rather than inside the first shard's time
        self.encoder.encode_ids(self.encoder.tokenize(["ready"]).ids)
        self.out = OutputDir(out_uri)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.threads = torch.get_num_threads()
        self.last_done = time.perf_counter()
        self.startup_seconds = self.last_done - started

    def embed_shard(self, spec: dict) -> dict:
        shard = ShardSpec(**spec)
        try:
            return self.run(shard)
        except Exception as e:  # reported to the driver with its shard, rather than as a Ray traceback
            return {"shard": shard.name, "worker": self.name, "error": f"{type(e).__name__}: {e}"}

    def run(self, spec: ShardSpec) -> dict:
        started, cpu_started = time.perf_counter(), time.process_time()
        waiting, self.last_done = started - self.last_done, started
        cfg = self.config
        rows = read_shard(spec, cfg.id_field, cfg.text_field, cfg.keep)
        phases = {"read": time.perf_counter() - started}
        entry = {"source": spec.uri, "rows": len(rows.ids), "bad": rows.bad, "truncated": 0, "worker": self.name,
                 "threads": self.threads, "startup_seconds": self.startup_seconds}
        if rows.bad and cfg.on_bad == "fail":
            return entry | {"shard": spec.name, "refused": True, "seconds": time.perf_counter() - started,
                            "cpu_seconds": time.process_time() - cpu_started, "peak_rss_mb": peak_rss_mb(),
                            "phases": phases}
        table = None
        if rows.ids:
            mark = time.perf_counter()
            tokenized = self.encoder.tokenize(rows.texts)
            entry["truncated"] = sum(tokenized.truncated)  # summed and reported by the driver
            phases["tokenize"] = time.perf_counter() - mark
            mark = time.perf_counter()
            vectors = self.encoder.encode_ids(tokenized.ids, batch_size=cfg.batch_size).numpy()
            phases["encode"] = time.perf_counter() - mark
            table = shard_table(rows.ids, vectors, rows.meta)
        mark = time.perf_counter()
        entry |= {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
                  "peak_rss_mb": peak_rss_mb(), "phases": dict(phases)}
        entry = self.out.commit_shard(spec.name, table, entry)
        self.last_done = time.perf_counter()
        write = self.last_done - mark  # known only once written: in the report, not in the manifest
        return entry | {"seconds": entry["seconds"] + write, "phases": {"waiting": waiting} | phases | {"write": write}}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
