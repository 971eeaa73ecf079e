"""Server settings: limits, batching and access, in one small dataclass the CLI fills from its flags."""
from __future__ import annotations

import os
from dataclasses import dataclass

from allmpnet.errors import InvalidInput

API_KEY_ENV = "ALLMPNET_API_KEY"


@dataclass
class ServeConfig:
    model_name: str = "sentence-transformers/all-mpnet-base-v2"  # the id /v1/models lists and responses echo
    api_key: str | None = None  # None: open; otherwise every /v1, /similarity, /tokenize, /search call needs it
    max_items: int = 2048  # texts per request (the OpenAI limit); more answers 413
    max_chars: int = 20_000  # characters per text; the model reads ~384 word pieces, so longer is almost surely a mistake
    max_body_bytes: int = 64 * 1024 * 1024  # request bodies above this answer 413 before they are parsed
    truncate: bool = True  # False: texts over max_seq_length answer 413 instead of being truncated (and reported)
    # padded tokens (rows x longest row) per forward pass; None: the device's default (encode/batching.py)
    max_batch_tokens: int | None = None
    max_batch_size: int = 256  # rows per forward pass
    max_queue: int = 8192  # texts waiting to be embedded; beyond this new requests get 503 + Retry-After
    dynamic_batching: bool = True  # False: one request per forward pass (for comparison)
    max_search_k: int = 1000
    warm_up: bool = True  # one full-budget forward pass at startup: first requests fast, peak memory reached early
    # int8/uint8 output: a .npy of (2, dim) ranges or of embeddings to take them from (encode/quantize.py); None:
    # each request's own vectors give the ranges (so a request needs at least 2 inputs)
    calibration: str | None = None
    # token-id input on /v1/embeddings (lists of ints): ids cannot say which vocabulary they come from, and an
    # OpenAI client's tiktoken ids embedded as ours would be silently wrong vectors, so they are refused unless the
    # operator says clients send this model's own ids (as TEI's clients may)
    accept_token_ids: bool = False
    max_search_hits: int = 50_000  # queries x k per /search request; more answers 413
    # --- what bounds memory and connections whatever the clients do (serve/limits.py, serve/protocol.py)
    # bytes of requests in flight: each is charged its body plus the largest answer its route can give for it,
    # and waits for room; a single request larger than this is charged this, so it runs alone
    max_inflight_bytes: int = 128 * 1024 * 1024
    admission_timeout: float = 30.0  # seconds a request may wait for room before 503 server_busy
    max_header_bytes: int = 32 * 1024  # request line + headers; more answers 431 and closes the connection
    header_timeout: float = 10.0  # seconds from connecting (or the previous answer) to the end of the headers
    body_timeout: float = 60.0  # seconds from admission to the end of the body; 408 after that
    read_timeout: float = 15.0  # longest gap between pieces of a body; 408 after that
    write_timeout: float = 30.0  # longest a client may take to read 1 MiB of its answer; then it is disconnected
    keep_alive_timeout: float = 5.0  # an idle keep-alive connection is closed after this many seconds

    def __post_init__(self) -> None:
        for name in ("max_items", "max_chars", "max_body_bytes", "max_batch_tokens", "max_batch_size", "max_queue",
                     "max_search_k", "max_search_hits", "max_inflight_bytes", "max_header_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InvalidInput(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("admission_timeout", "header_timeout", "body_timeout", "read_timeout", "write_timeout",
                     "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise InvalidInput(f"{name} must be a positive number of seconds, got {getattr(self, name)}")
        if self.max_queue < self.max_items:
            # a request the queue could never hold would get 503 forever instead of a clear 413
            raise InvalidInput(f"max_queue ({self.max_queue}) must be at least max_items ({self.max_items})")
        if self.api_key == "":
            raise InvalidInput("api_key is empty: leave it unset to serve without a key")

    @staticmethod
    def api_key_from_env() -> str | None:
        return os.environ.get(API_KEY_ENV) or None
