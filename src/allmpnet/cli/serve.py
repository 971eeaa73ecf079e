"""serve: the HTTP server (OpenAI-compatible embeddings, similarity, tokenize, search, health, metrics)."""
from __future__ import annotations

import argparse
import functools
import ipaddress
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from allmpnet.cli.core import add_model_args
from allmpnet.cli.environment import env_option
from allmpnet.weights import PUBLISHED

if TYPE_CHECKING:
    from allmpnet.serve import ServeConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    from allmpnet.serve.config import ServeConfig
    d = ServeConfig()
    p = subparsers.add_parser("serve", help="HTTP server: OpenAI-compatible /v1/embeddings, /similarity, /search …",
                              description="Every option can also be set from the environment variable its help "
                                          "names (a flag wins over the variable; on/off options take 1/true/yes/on "
                                          "or 0/false/no/off).")
    add_model_args(p, from_environment=True)
    option = functools.partial(env_option, p)
    option("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; default %(default)s)")
    option("--port", type=int, default=8000, help="default %(default)s")
    option("--api-key", default=None,
           help="require 'Authorization: Bearer KEY'; /health and /metrics stay open")
    option("--index", type=Path, default=None, help="an index directory (allmpnet index build) for /search")
    option("--served-model-name", default=None,
           help="model id for /v1/models and responses (default: the hub id of the published model)")
    option("--max-items", type=int, default=d.max_items, help="texts per request (more: 413; default %(default)s)")
    option("--max-chars", type=int, default=d.max_chars, help="characters per text (more: 413; default %(default)s)")
    option("--max-body-bytes", type=int, default=d.max_body_bytes,
           help="request body size (more: 413; default %(default)s)")
    option("--no-truncate", action="store_true",
           help="refuse texts over the model's max_seq_length with 413 instead of truncating them")
    option("--accept-token-ids", action="store_true",
           help="let /v1/embeddings take lists of token ids: only for clients that send this model's own ids "
                "(an OpenAI client's tiktoken ids would give wrong vectors, so they are refused by default)")
    option("--max-batch-tokens", type=int, default=None,
           help="padded tokens (rows x longest row) per forward pass (default 16384 on a GPU, 4096 on CPU)")
    option("--max-batch-size", type=int, default=d.max_batch_size, help="texts per forward pass (default %(default)s)")
    option("--max-queue", type=int, default=d.max_queue,
           help="texts waiting to be embedded; when full, new requests get 503 + Retry-After (default %(default)s)")
    option("--no-dynamic-batching", action="store_true",
           help="one request per forward pass (for comparison; slower under concurrency)")
    option("--no-warm-up", action="store_true",
           help="skip the full-budget forward pass at startup (faster start, slower first requests)")
    option("--max-inflight-bytes", type=int, default=d.max_inflight_bytes,
           help="bytes of requests in flight (bodies plus their largest answers); beyond it requests wait, "
                "so memory follows this, not the number of clients (default %(default)s)")
    option("--max-header-bytes", type=int, default=d.max_header_bytes,
           help="request line and headers; more: 431 (default %(default)s)")
    option("--header-timeout", type=float, default=d.header_timeout,
           help="seconds a client may take to send its headers (default %(default)s)")
    option("--body-timeout", type=float, default=d.body_timeout,
           help="seconds a body may take to arrive once admitted (default %(default)s)")
    option("--read-timeout", type=float, default=d.read_timeout,
           help="longest pause between pieces of a body (default %(default)s)")
    option("--write-timeout", type=float, default=d.write_timeout,
           help="seconds a client may take to read each MiB of its answer before it is disconnected "
                "(default %(default)s)")
    option("--admission-timeout", type=float, default=d.admission_timeout,
           help="seconds a request may wait for room among the bytes in flight before 503 server_busy "
                "(default %(default)s)")
    option("--keep-alive-timeout", type=float, default=d.keep_alive_timeout,
           help="seconds an idle keep-alive connection is kept open (default %(default)s)")
    option("--max-search-k", type=int, default=d.max_search_k, help="largest k of /search (default %(default)s)")
    option("--max-search-hits", type=int, default=d.max_search_hits,
           help="queries x k per /search request (more: 413; default %(default)s)")
    option("--threads", type=int, default=None,
           help="torch CPU threads (default: torch's choice; with --replicas, each replica's CPU reservation)")
    option("--replicas", type=int, default=None,
           help="serve from this many Ray Serve replicas, each with its own model, behind Serve's proxy on "
                "--host:--port (needs allmpnet[ray]; see docs/cluster.md; default: one process, no Ray)")
    option("--address", default=None,
           help="with --replicas: the Ray cluster to run them on (auto, ray://head:10001, host:6379; default "
                "$RAY_ADDRESS, else a Ray instance started here)")
    option("--calibration", default=None,
           help="ranges for embedding_type int8/uint8: a .npy of (2, dim) ranges (`allmpnet encode "
                "--quantize int8` saves one) or of embeddings to take them from (default: each request's "
                "own vectors)")
    option("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    option("--no-access-log", action="store_true", help="do not log one line per request")
    p.set_defaults(func=cmd_serve)


def served_name(model: str) -> str:
    if model in PUBLISHED:
        return PUBLISHED[model].hub_id
    path = Path(model)
    return path.resolve().name if path.exists() else model


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from allmpnet.cli.core import load_encoder
    from allmpnet.serve import create_app
    from allmpnet.serve.protocol import uvicorn_options

    config = serve_config(args)
    if args.replicas is not None:
        return serve_replicas(args, config)
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    check_can_listen(args.host, args.port)  # before the model loads: a taken port is known in a moment
    encoder = load_encoder(args)
    index = load_index(args.index, encoder) if args.index is not None else None
    app = create_app(encoder, config, index)
    if config.api_key is None and not is_loopback(args.host):
        print(f"warning: listening on {args.host} without an API key: anyone who can reach it can use it "
              "(set --api-key or $ALLMPNET_API_KEY)", file=sys.stderr)
    print(f"serving {config.model_name} ({encoder.dim}-d, {encoder.device}) on http://{args.host}:{args.port} "
          f"— {'API key required' if config.api_key else 'no API key'}"
          f"{', index ' + str(args.index) if index is not None else ''}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=not args.no_access_log,
                **uvicorn_options(config))


def serve_replicas(args: argparse.Namespace, config: ServeConfig) -> None:
    """The same app in --replicas Ray Serve replicas (serve/ray_serve.py); serves until Ctrl-C."""
    from allmpnet.errors import InvalidInput
    from allmpnet.settings import precision_or_default
    if args.replicas < 1:
        raise InvalidInput(f"--replicas must be at least 1, got {args.replicas}")
    try:
        from allmpnet.serve import ray_serve
    except ImportError as e:
        raise InvalidInput(f"--replicas needs Ray Serve: pip install 'allmpnet[ray]' ({e})") from None
    check_can_listen(args.host, args.port)
    # the precision is settled here, so that replicas on other machines run the one this command asked for
    settings = ray_serve.ReplicaSettings(model=args.model, device=args.device,
                                         precision=precision_or_default(args.precision),
                                         index=str(args.index) if args.index is not None else None,
                                         threads=args.threads, config=config)
    gpus = 1.0 if (args.device or "").startswith("cuda") else 0.0

    def ready() -> None:
        if config.api_key is None and not is_loopback(args.host):
            print(f"warning: listening on {args.host} without an API key: anyone who can reach it can use it "
                  "(set --api-key or $ALLMPNET_API_KEY)", file=sys.stderr)
        print(f"serving {config.model_name} from {args.replicas} Ray Serve replica(s) on "
              f"http://{args.host}:{args.port} — {'API key required' if config.api_key else 'no API key'}; "
              "Ctrl-C stops them", file=sys.stderr, flush=True)
    ray_serve.run(settings, args.replicas, host=args.host, port=args.port, address=args.address,
                  cpus_per_replica=args.threads, gpus_per_replica=gpus, ready=ready)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of parsed `serve` arguments (flags, else their environment variables, else defaults)."""
    from allmpnet.serve import ServeConfig
    # --api-key's variable is ServeConfig's own API_KEY_ENV; asking the library too keeps the two the same
    return ServeConfig(model_name=args.served_model_name or served_name(args.model),
                       api_key=args.api_key or ServeConfig.api_key_from_env(), max_items=args.max_items,
                       max_chars=args.max_chars, max_body_bytes=args.max_body_bytes, truncate=not args.no_truncate,
                       max_batch_tokens=args.max_batch_tokens, max_batch_size=args.max_batch_size,
                       max_queue=args.max_queue, dynamic_batching=not args.no_dynamic_batching,
                       warm_up=not args.no_warm_up, max_inflight_bytes=args.max_inflight_bytes,
                       max_header_bytes=args.max_header_bytes, header_timeout=args.header_timeout,
                       body_timeout=args.body_timeout, read_timeout=args.read_timeout,
                       write_timeout=args.write_timeout, calibration=args.calibration,
                       accept_token_ids=args.accept_token_ids, admission_timeout=args.admission_timeout,
                       keep_alive_timeout=args.keep_alive_timeout, max_search_k=args.max_search_k,
                       max_search_hits=args.max_search_hits)


def check_can_listen(host: str, port: int) -> None:
    """An OSError saying why host:port cannot be listened on (in use, not an address of this machine, …)."""
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def load_index(path: Path, encoder):
    from allmpnet.search import Index
    return Index.open(path, encoder=encoder)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
