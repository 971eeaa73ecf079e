"""The HTTP API: OpenAI-compatible embeddings plus similarity, tokenize, search, health and metrics.

`create_app(encoder, config, index)` builds a FastAPI app around one `Encoder`; every route that embeds
goes through the shared `DynamicBatcher`, so concurrent requests share forward passes.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from allmpnet import __version__
from allmpnet.encode import Encoder, Tokenized
from allmpnet.encode.quantize import load_calibration, quantize_embeddings
from allmpnet.encode.tokenizer import check_encodable
from allmpnet.errors import InvalidInput
from allmpnet.serve.batching import BatcherClosed, DynamicBatcher, QueueFull
from allmpnet.serve.config import ServeConfig
from allmpnet.serve.errors import APIError, BodyLimit, ClientGone, error_response, install_error_handlers, log
from allmpnet.serve.limits import InFlightBudget, RequestGuard, client_gone
from allmpnet.serve.metrics import ServerMetrics
from allmpnet.serve.schemas import EmbeddingsRequest, SearchRequest, SimilarityRequest, TokenizeRequest, as_texts
from allmpnet.similarity import cos_sim

if TYPE_CHECKING:
    from allmpnet.search import Index

# above this many characters in one request, tokenize off the event loop so other requests keep flowing
TOKENIZE_INLINE_CHARS = 20_000
# JSON bytes of one value in a response, at most: a float32 as "-0.012345678,", a word piece id and its string
FLOAT_JSON_BYTES, TOKEN_JSON_BYTES = 24, 48


class Service:
    """What the routes share: the encoder, its batcher, limits and metrics."""

    def __init__(self, encoder: Encoder, config: ServeConfig, index: "Index | None"):
        self.encoder = encoder
        self.config = config
        self.index = index
        self.metrics = ServerMetrics()
        self.batcher = DynamicBatcher(encoder, config.max_batch_tokens, config.max_batch_size,
                                      config.max_queue, merge_requests=config.dynamic_batching,
                                      on_batch=self.metrics.record_batch)
        self.metrics.queue.set_function(lambda: self.batcher.queued)
        self.model_names = {config.model_name, encoder.name, Path(config.model_name).name}
        self.calibration = load_calibration(config.calibration) if config.calibration else None
        if self.calibration is not None and self.calibration.shape[1] != encoder.dim:
            raise InvalidInput(f"calibration {config.calibration} is {self.calibration.shape[1]}-d; the model gives "
                               f"{encoder.dim}-d vectors")
        self._index_lock = threading.Lock()
        self.budget = InFlightBudget(config.max_inflight_bytes)
        self.metrics.inflight.set_function(lambda: self.budget.used)

    def answer_bytes(self, scope: dict, body_bytes: int) -> int:
        """The most bytes the answer to a body of this size can take on its route (the admission charge).

        Every text costs at least 3 body bytes ("",), which bounds how many a body can carry.
        """
        texts = min(self.config.max_items, body_bytes // 3 + 1)
        path = scope.get("path", "")
        if path == "/v1/embeddings":
            return texts * self.encoder.dim * FLOAT_JSON_BYTES
        if path == "/similarity":  # a x b scores with a + b texts
            return (texts // 2 + 1) ** 2 * FLOAT_JSON_BYTES
        if path == "/tokenize":
            return texts * self.encoder.max_seq_length * TOKEN_JSON_BYTES
        if path == "/search":  # hits carry stored texts of any size: charged at their real size once built
            return min(texts * 10, self.config.max_search_hits) * 1024
        return 0

    def check_limits(self, texts: list[str], field: str) -> None:
        check_encodable_texts(texts, field)
        if len(texts) > self.config.max_items:
            raise APIError(413, f"{len(texts)} texts in one request; this server takes at most "
                                f"{self.config.max_items}: split the request", "too_many_items", field)
        for i, text in enumerate(texts):
            if len(text) > self.config.max_chars:
                raise APIError(413, f"{field}[{i}] has {len(text)} characters; this server takes at most "
                                    f"{self.config.max_chars} per text", "text_too_long", field)

    async def tokenize(self, texts: list[str], field: str, truncate: bool | None) -> Tokenized:
        self.check_limits(texts, field)
        if sum(map(len, texts)) > TOKENIZE_INLINE_CHARS:
            tokenized = await anyio.to_thread.run_sync(self.encoder.tokenize, texts)
        else:
            tokenized = self.encoder.tokenize(texts)
        if (gone := client_gone()) is not None and gone.is_set():
            raise ClientGone
        refuse = not (self.config.truncate if truncate is None else truncate)
        if refuse and any(tokenized.truncated):
            over = [i for i, t in enumerate(tokenized.truncated) if t]
            raise APIError(413, f"{len(over)} text(s) exceed the model's limit of {self.encoder.max_seq_length} "
                                f"word pieces and truncation is off: {field}{over[:10]}"
                                f"{' …' if len(over) > 10 else ''}", "text_too_long", field)
        return tokenized

    async def embed(self, texts: list[str], field: str, truncate: bool | None) -> tuple[torch.Tensor, Tokenized]:
        """(n, dim) float32 vectors of texts, batched with whatever else is in flight."""
        tokenized = await self.tokenize(texts, field, truncate)
        try:
            future = self.batcher.submit(tokenized.ids)
        except BatcherClosed as e:
            raise APIError(503, str(e), "shutting_down") from None
        except QueueFull as e:
            self.metrics.rejected.inc()
            raise APIError(503, str(e), "queue_full", headers={"Retry-After": str(e.retry_after)}) from None
        try:
            vectors = await answer_unless_client_gone(future)
        except BatcherClosed as e:
            raise APIError(503, str(e), "shutting_down") from None
        self.metrics.texts.inc(len(texts))
        self.metrics.tokens.inc(int(tokenized.lengths.sum()))
        self.metrics.truncated.inc(sum(tokenized.truncated))
        return vectors, tokenized

    def search(self, vectors: np.ndarray, k: int) -> list[list[dict]]:
        """Top-k hits of each (Q, dim) query vector as JSON-ready dicts; runs on a worker thread."""
        with self._index_lock:
            if self.index.is_stale():  # `allmpnet index add` committed a new version while we were serving
                try:
                    self.index = type(self.index).open(self.index.root, encoder=self.encoder)
                except Exception:  # keep answering from the version we have rather than failing every search
                    log.exception("could not open the new version of %s; still serving the previous one",
                                  self.index.root)
            index = self.index
        return [[hit_json(h) for h in row] for row in index.search(vectors, k)]

    def output_values(self, vectors: torch.Tensor, embedding_type: str, encoding_format: str) -> list:
        """Each vector as the response carries it: floats or quantized integers, as JSON numbers or base64 bytes."""
        if embedding_type == "float":
            array = vectors.numpy().astype("<f4", copy=False)
        else:
            try:
                array = quantize_embeddings(vectors.numpy(), embedding_type, self.calibration)
            except ValueError as e:
                raise APIError(422, f"{e} (or start the server with --calibration FILE)", "calibration_required",
                               "embedding_type") from None
        if encoding_format == "base64":
            return [base64.b64encode(row.tobytes()).decode("ascii") for row in array]
        return array.tolist()

    def check_hits(self, queries: int, k: int) -> None:
        if queries * k > self.config.max_search_hits:
            raise APIError(413, f"{queries} queries x k={k} asks for {queries * k} hits; this server gives at most "
                                f"{self.config.max_search_hits} per request: split the queries or lower k",
                           "too_many_hits", "k")

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise APIError(404, f"model {model!r} is not served here; this server serves "
                                f"{self.config.model_name!r}", "model_not_found", "model")


def create_app(encoder: Encoder, config: ServeConfig | None = None, index: "Index | None" = None) -> FastAPI:
    """A FastAPI app serving `encoder`; pass an index (allmpnet.search) to enable POST /search."""
    config = config or ServeConfig()
    service = Service(encoder, config, index)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await asyncio.wrap_future(service.batcher.start(warm_up=config.warm_up).ready)
        yield
        await anyio.to_thread.run_sync(service.batcher.close)

    app = FastAPI(title="allmpnet", version=__version__, lifespan=lifespan,
                  description=f"Sentence embeddings from {config.model_name}")
    app.state.service = service
    install_error_handlers(app)
    # outermost last: metrics see every answer, the guard refuses and admits before the body is read
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(RequestGuard, budget=service.budget, cost=service.answer_bytes,
                       max_body_bytes=config.max_body_bytes, api_key=config.api_key,
                       admission_timeout=config.admission_timeout, body_timeout=config.body_timeout,
                       read_timeout=config.read_timeout, write_timeout=config.write_timeout)
    app.add_middleware(RequestMetrics, metrics=service.metrics)

    async def require_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # RequestGuard refuses a missing key before the body is read; the dependency keeps a route protected even
    # where the app runs without the guard (mounted inside another app)
    guarded = [Depends(require_key)]

    @app.get("/health")
    async def health() -> JSONResponse:
        if not service.batcher.alive:
            return error_response(503, "the embedding worker is not running", "unhealthy")
        return JSONResponse({"status": "ok", "model": config.model_name, "dimensions": encoder.dim,
                             "max_seq_length": encoder.max_seq_length, "queued": service.batcher.queued,
                             "queue_capacity": config.max_queue, "dynamic_batching": config.dynamic_batching,
                             "index": None if service.index is None else len(service.index)})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "allmpnet"}

    @app.get("/v1/models", dependencies=guarded)
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}", dependencies=guarded)
    async def get_model(model_id: str) -> JSONResponse:
        service.check_model(model_id)
        return JSONResponse(model_card())

    @app.post("/v1/embeddings", dependencies=guarded)
    async def embeddings(body: EmbeddingsRequest) -> JSONResponse:
        service.check_model(body.model)
        if body.dimensions is not None and body.dimensions != encoder.dim:
            raise APIError(422, f"dimensions={body.dimensions} is not available: {config.model_name} gives "
                                f"{encoder.dim}-d vectors", "invalid_dimensions", "dimensions")
        texts = as_texts(body.input)
        vectors, tokenized = await service.embed(texts, "input", body.truncate)
        values = service.output_values(vectors, body.embedding_type, body.encoding_format)
        tokens = int(tokenized.lengths.sum())
        return JSONResponse({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(values)],
            "model": config.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "truncated": [i for i, t in enumerate(tokenized.truncated) if t],
            **({"embedding_type": body.embedding_type} if body.embedding_type != "float" else {}),
        })

    @app.post("/similarity", dependencies=guarded)
    async def similarity(body: SimilarityRequest) -> JSONResponse:
        a, b = as_texts(body.a, "a"), as_texts(body.b, "b")
        vectors, tokenized = await service.embed(a + b, "a+b", body.truncate)
        scores = cos_sim(vectors[: len(a)], vectors[len(a):])  # (len(a), len(b))
        return JSONResponse({"scores": scores.tolist(), "model": config.model_name,
                             "truncated": {"a": [i for i, t in enumerate(tokenized.truncated[: len(a)]) if t],
                                           "b": [i for i, t in enumerate(tokenized.truncated[len(a):]) if t]}})

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        texts = as_texts(body.input)
        tokenized = await service.tokenize(texts, "input", body.truncate)
        return JSONResponse({
            "max_seq_length": encoder.max_seq_length,
            "data": [{"index": i, "count": len(ids), "truncated": cut, "ids": ids,
                      "tokens": [encoder.tokenizer.id_to_token(t) for t in ids]}
                     for i, (ids, cut) in enumerate(zip(tokenized.ids, tokenized.truncated))],
        })

    @app.post("/search", dependencies=guarded)
    async def search(body: SearchRequest) -> JSONResponse:
        if service.index is None:
            raise APIError(404, "no index loaded: start the server with --index DIR", "no_index")
        if body.k > config.max_search_k:
            raise APIError(413, f"k={body.k} is above this server's limit of {config.max_search_k}", "k_too_large",
                           "k")
        queries = as_texts(body.query, "query")
        service.check_hits(len(queries), body.k)
        vectors, tokenized = await service.embed(queries, "query", body.truncate)
        hits = await anyio.to_thread.run_sync(service.search, vectors.numpy(), body.k)
        return JSONResponse({"model": config.model_name, "k": body.k,
                             "truncated": [i for i, t in enumerate(tokenized.truncated) if t],
                             "results": [{"query": q, "hits": h} for q, h in zip(queries, hits)]})

    return app


def hit_json(hit) -> dict:
    """A search hit as JSON; a document index's hit is its best chunk: the passage as text, plus its span."""
    record = {"id": hit.id, "score": hit.score, "text": hit.text, "metadata": hit.metadata}
    if hit.span is not None:
        record["span"] = list(hit.span)
    return record
def check_encodable_texts(texts: list[str], field: str) -> None:
    try:
        check_encodable(texts, field)
    except ValueError as e:
        raise APIError(422, str(e), "invalid_text", field) from None


async def answer_unless_client_gone(future: Future) -> torch.Tensor:
    """The batcher's answer; if the client disconnects first, its rows still queued are dropped (ClientGone)."""
    gone = client_gone()
    answer = asyncio.wrap_future(future)
    if gone is None:
        return await answer
    departure = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait({answer, departure}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        future.cancel()
        raise
    finally:
        departure.cancel()
    if answer.done():
        return answer.result()
    future.cancel()  # the batcher forgets rows of a cancelled request that no forward pass has taken yet
    answer.cancel()
    raise ClientGone


class RequestMetrics:
    """Counts requests by route template and status, and times them (pure ASGI: no per-request task overhead)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            # unmatched paths share one label so random URLs cannot grow the metric without bound
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)
