"""Joining or starting Ray quietly, and sizing a job's actors to the cluster's cores.

Shared by the bulk job (bulk/job.py) and the Ray Serve replicas (serve/ray_serve.py): both run on the same
cluster, started with `ray start --head` and joined with `--address`, or on a local instance started here.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from allmpnet.errors import InvalidInput

# On big nodes one process with every core scales worse than a few with fewer (short batches split over many
# threads spend their time synchronising), and a straggling actor then holds less of the job; measured here only
# up to 2 cores, so this is a cap rather than a tuned figure. --cpus-per-worker overrides it.
MAX_THREADS_PER_WORKER = 8


@dataclass(frozen=True)
class Layout:
    """How many actors a job runs and what each is given: Ray's CPU reservation is also its torch threads."""
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    threads: int  # torch (and our kernels') threads in each actor
    chosen: str  # how the numbers were found, for the report

    def describe(self) -> str:
        gpus = f", {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        return (f"{self.workers} worker(s) x {self.cpus_per_worker:g} CPU{gpus} ({self.threads} thread(s) each; "
                f"{self.chosen})")


def plan_layout(node_cpus: list[float], node_gpus: list[float], workers: int | None = None,
                cpus_per_worker: float | None = None, gpus_per_worker: float = 0) -> Layout:
    """Workers x CPUs per worker that fill the nodes' cores, unless the caller fixed either.

    Ray gives an actor OMP_NUM_THREADS = its CPU reservation, and the job sets torch's threads to the same
    number, so the reservation is what decides how many cores an actor's forward passes use. Defaults:
    - GPU actors: one per `gpus_per_worker` of the cluster's GPUs, each reserving 1 CPU (the GPU does the work);
    - CPU actors, nothing given: actors of the smallest node's cores, at most MAX_THREADS_PER_WORKER threads
      each, as many as the nodes hold (a 2-core machine: 1 actor x 2 threads; 32 cores: 4 x 8; nodes of 16 and
      4 cores: 5 x 4);
    - workers given: the cores of the cluster shared among them (no more than the largest node holds, since an
      actor lives on one node);
    - cpus_per_worker given: as many actors as the nodes hold.
    """
    cpus = [c for c in node_cpus if c > 0] or [1.0]
    if gpus_per_worker > 0:
        cpu_each = cpus_per_worker or 1.0
        count = workers or max(1, int(sum(math.floor(g / gpus_per_worker + 1e-9) for g in node_gpus)))
        return Layout(count, cpu_each, gpus_per_worker, max(1, int(cpu_each)),
                      "given" if workers else f"one per {gpus_per_worker:g} of the cluster's GPUs")
    if cpus_per_worker is None:
        if workers is None:
            # one size for every actor of the pool: the smallest node's cores, so that every node holds at least
            # one
            cpu_each = float(min(min(cpus), MAX_THREADS_PER_WORKER))
            count = max(1, sum(int(c // cpu_each) for c in cpus))
            chosen = f"the cores of {len(cpus)} node(s), at most {MAX_THREADS_PER_WORKER} threads per worker"
        else:
            cpu_each = float(max(1, min(int(sum(cpus) // workers), int(max(cpus)))))
            count, chosen = workers, "the cluster's cores shared among the workers given"
    else:
        cpu_each = float(cpus_per_worker)
        count = workers or max(1, sum(int(c // cpu_each) for c in cpus))
        chosen = "given" if workers else "as many workers as the nodes hold"
    return Layout(count, cpu_each, 0.0, max(1, int(cpu_each)), chosen)


def cluster_nodes(free: bool = False) -> tuple[list[float], list[float]]:
    """(CPUs, GPUs) of each alive node of the connected Ray cluster; free: those not reserved by others (Serve
    replicas, another job), so that a job sized by default fits beside them. Where nothing is free (a cluster
    that will scale up, or Ray's per-node view is unavailable), the nodes' totals."""
    import ray
    alive = [n for n in ray.nodes() if n.get("Alive")]
    total = ([n["Resources"].get("CPU", 0.0) for n in alive], [n["Resources"].get("GPU", 0.0) for n in alive])
    if not free:
        return total
    try:
        from ray._private.state import available_resources_per_node  # no public per-node view in Ray 2.60
        available = available_resources_per_node()
    except (ImportError, AttributeError, RuntimeError):
        return total
    nodes = [available.get(n["NodeID"], {}) for n in alive]
    cpus = [float(math.floor(r.get("CPU", 0.0) + 1e-9)) for r in nodes]
    if sum(cpus) < 1:
        return total
    return cpus, [r.get("GPU", 0.0) for r in nodes]


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[bool]:
    """Ray for the block: joined when already initialized or address names a cluster ("auto": a local one),
    else started here and stopped after. Yields whether this call started (and so owns) it.

    A successful run prints nothing of Ray's: its start-up chatter (a token-auth notice, the core worker's note
    that fault-tolerant actors keep their arguments in the object store) is kept out of the output. Failures still reach the caller as exceptions with their cause (the bulk job turns
    them into one line), and Ray's own logs stay in its session directory (/tmp/ray/session_latest/logs).
    """
    import ray
    if ray.is_initialized():
        yield False
        return
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        check_reachable(address)
    try:
        with _quiet_core_worker():
            ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    except ConnectionError as e:
        raise InvalidInput(f"cannot reach the Ray cluster at {address!r}: {e}") from None
    try:
        yield True
    finally:
        ray.shutdown()


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A cluster address (host:port or ray://host:port) that nothing answers on is refused now: Ray would retry it
    for minutes, silently while its start-up lines are kept quiet. "auto" and other forms are left to Ray."""
    import socket
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise InvalidInput(f"cannot reach the Ray cluster at {address}: {e.strerror or e}; start it with "
                           "`ray start --head`, or leave the address out to run on a Ray started here") from None


@contextmanager
def _quiet_core_worker() -> Iterator[None]:
    """ray.init with the driver's C++ side quiet.

    The driver's core worker writes to stderr from the level in $RAY_BACKEND_LOG_LEVEL, read once as ray.init
    connects; in a good run its only line is an ERROR-level notice that the bulk job's actors keep their constructor
    arguments in the object store while they may restart (they restart after a lost node, which is what we
    want). Unless the user set the variable it is "fatal", which the core worker announces with one more line as
    it reads it, so stderr (fd 2) is closed to the C++ side while ray.init runs. Python sees everything: a
    failure to start or join is raised, and the job's own errors arrive as exceptions, not as these lines. The
    processes a local instance starts inherit the level (their logs are files in Ray's session directory)."""
    name = "RAY_BACKEND_LOG_LEVEL"
    if name in os.environ:
        yield
        return
    os.environ[name] = "fatal"
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.environ.pop(name, None)
