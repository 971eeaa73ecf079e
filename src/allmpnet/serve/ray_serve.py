"""`allmpnet serve --replicas N`: the same FastAPI app and batcher (create_app) in N Ray Serve replicas.

Each replica is a Ray actor that loads its own Encoder (and index), builds the app with create_app and runs its
lifespan (the batcher's start and warm-up) before Serve routes to it; Serve's proxy on each node takes the HTTP
connections and spreads requests over the replicas, preferring the less busy of two. A replica that dies is
replaced by Serve's controller; requests it held fail with a 5xx answer, and since an embedding request changes
nothing, a client retries them (the OpenAI client does so by default on 5xx and connection errors).

Two ways in, one cluster (docs/cluster.md):
- `allmpnet serve --replicas 2 [--address auto]` from the CLI, with every `serve` option;
- `serve run allmpnet.serve.ray_serve:app_builder model=all-mpnet-base-v2 replicas=2 precision=auto`, or a
  Serve config file naming that import path with the same arguments, for clusters managed with Ray's own tools.

What stays with Serve's proxy rather than this app: the HTTP listener's own limits (header size and time,
keep-alive), which `--max-header-bytes`, `--header-timeout` and `--keep-alive-timeout` set only for the
single-process server. Everything the app itself does (limits on bodies, items and bytes in flight, API key,
batching, metrics of its replica) is the same in every replica.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

from allmpnet.errors import InvalidInput
from allmpnet.serve.config import ServeConfig
from allmpnet.weights import DEFAULT_MODEL

APP_NAME = "allmpnet"
# Serve's default of 5 requests at a time per replica would cap the dynamic batcher's batches at 5 requests; the
# app admits or refuses requests itself (bytes in flight, queue length), so Serve only needs to stay out of its way
MAX_ONGOING_REQUESTS = 1024


@dataclass
class ReplicaSettings:
    """What each replica loads: plain values, sent to the replicas as they are."""
    model: str = DEFAULT_MODEL
    device: str | None = None
    precision: str | None = None
    index: str | None = None
    threads: int | None = None  # torch threads in each replica; None: its CPU reservation
    config: ServeConfig = field(default_factory=ServeConfig)


class EmbeddingReplica:
    """One Serve replica: its own Encoder and index, and the app create_app builds on them."""

    def __init__(self, settings: ReplicaSettings, threads: int):
        import torch

        from allmpnet.encode import Encoder
        # Ray gave the actor OMP_NUM_THREADS = its CPU reservation; torch's thread count is also what our kernels
        # run, so it is set to the one number the replica was sized with
        torch.set_num_threads(settings.threads or threads)
        self.settings = settings
        self.encoder = Encoder(settings.model, device=settings.device, precision=settings.precision)
        self.index = None
        if settings.index is not None:
            from allmpnet.search import Index
            self.index = Index.open(settings.index, encoder=self.encoder)

    def __serve_build_asgi_app__(self):
        """Called by Serve after __init__; Serve then runs the app's lifespan (batcher start, warm-up)."""
        from allmpnet.serve import create_app
        # not self.app: Serve's ingress wrapper has a property of that name
        self.embedding_app = create_app(self.encoder, self.settings.config, self.index)
        return self.embedding_app

    def check_health(self) -> None:
        """Serve's periodic check: a replica whose embedding worker stopped (its /health answers 503) is replaced
        rather than left to answer 503 to every request routed to it."""
        app = getattr(self, "embedding_app", None)
        if app is not None and app.state.service.batcher.ready.done() and not app.state.service.batcher.alive:
            raise RuntimeError("the embedding worker is not running")


def deployment(settings: ReplicaSettings, replicas: int, cpus_per_replica: float | None = None,
               gpus_per_replica: float = 0):
    """The bound Serve application: `replicas` copies of EmbeddingReplica, each reserving cpus_per_replica CPUs
    (None: 1) and gpus_per_replica GPUs."""
    from ray import serve
    if replicas < 1:
        raise InvalidInput(f"replicas must be at least 1, got {replicas}")
    cpus = 1.0 if cpus_per_replica is None else float(cpus_per_replica)
    options: dict[str, Any] = {"num_cpus": cpus}
    if gpus_per_replica:
        options["num_gpus"] = gpus_per_replica
    ingress = serve.ingress()(EmbeddingReplica)
    replica = serve.deployment(name="EmbeddingReplica", num_replicas=replicas, ray_actor_options=options,
                               max_ongoing_requests=MAX_ONGOING_REQUESTS,
                               # a replica loads the model and warms up before it is ready: minutes on a busy node
                               health_check_timeout_s=120)(ingress)
    return replica.bind(settings, max(1, int(cpus)))


def app_builder(args: dict[str, str]):
    """For `serve run allmpnet.serve.ray_serve:app_builder key=value ...` (or a Serve config file): model, device,
    precision, index, replicas (default 1), cpus_per_replica (default 1), threads, api_key (default
    $ALLMPNET_API_KEY), and any ServeConfig field by name (max_items=64 …)."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    cpus = float(args.pop("cpus_per_replica", 1))
    settings = ReplicaSettings(model=args.pop("model", DEFAULT_MODEL), device=args.pop("device", None),
                               precision=args.pop("precision", None), index=args.pop("index", None),
                               threads=int(args["threads"]) if "threads" in args else None)
    args.pop("threads", None)
    fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise InvalidInput(f"unknown argument(s) {unknown}; known: model, device, precision, index, replicas, "
                           f"cpus_per_replica, threads, {', '.join(fields)}")
    values = {name: _parse(fields[name], raw) for name, raw in args.items()}
    values.setdefault("api_key", ServeConfig.api_key_from_env())
    settings.config = ServeConfig(**values)
    return deployment(settings, replicas, cpus)


def _parse(f: dataclasses.Field, raw: str) -> Any:
    """A Serve builder argument as the ServeConfig field's type: text from `serve run key=value`, already typed from
    a config file's YAML."""
    if not isinstance(raw, str):
        return raw
    kind = str(f.type)
    if raw.lower() in ("none", "null") and "None" in kind:
        return None
    if kind.startswith("bool"):
        return raw.lower() in ("1", "true", "yes", "on")
    for name, convert in (("int", int), ("float", float)):
        if kind.startswith(name):
            try:
                return convert(raw)
            except ValueError:
                raise InvalidInput(f"{f.name} must be a number, got {raw!r}") from None
    return raw


def start(settings: ReplicaSettings, replicas: int, host: str = "127.0.0.1", port: int = 8000,
          cpus_per_replica: float | None = None, gpus_per_replica: float = 0) -> None:
    """Deploy (or update) the replicas on the Ray cluster this process is connected to, behind Serve's proxy on
    host:port, and return once every replica is ready (model loaded, app warmed up)."""
    from ray import serve

    from allmpnet.bulk.cluster import cluster_nodes, plan_layout
    if cpus_per_replica is None and not gpus_per_replica:
        # the cluster's cores shared among the replicas, as the bulk job shares them among its actors
        cpus_per_replica = plan_layout(*cluster_nodes(), workers=replicas).cpus_per_worker
    # the driver's Serve logger says INFO lines as it starts and deploys ("Started Serve", "… is ready"); the
    # replicas' own logs stay in Ray's session directory
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    serve.run(deployment(settings, replicas, cpus_per_replica, gpus_per_replica), name=APP_NAME, route_prefix="/",
              blocking=False)


def run(settings: ReplicaSettings, replicas: int, host: str = "127.0.0.1", port: int = 8000,
        address: str | None = None, cpus_per_replica: float | None = None, gpus_per_replica: float = 0,
        ready=None) -> None:
    """start() on the Ray cluster at address ($RAY_ADDRESS, else a local instance started here), then serve until
    interrupted; the replicas are removed then (and a local instance stopped). ready() is called once they serve."""
    import time

    from ray import serve

    from allmpnet.bulk.cluster import ray_session

    def stop(signum, frame):  # a service manager's SIGTERM ends it as Ctrl-C does: replicas removed first
        raise KeyboardInterrupt
    with ray_session(address):
        try:
            start(settings, replicas, host, port, cpus_per_replica, gpus_per_replica)
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs a handler of its own
            if ready is not None:
                ready()
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            # only this application goes: a shared cluster keeps running, and a local instance of our own is
            # stopped whole by ray_session (serve.shutdown's controller teardown would print Ray's complaints)
            serve.delete(APP_NAME)


def replica_pids() -> list[int]:
    """Process ids of this machine's replica actors (their titles start "ray::ServeReplica:allmpnet")."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(f"ray::ServeReplica:{APP_NAME}:".encode()):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids
