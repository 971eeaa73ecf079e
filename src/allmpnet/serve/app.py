"""The HTTP API: OpenAI-compatible embeddings plus similarity, tokenize, search, health and metrics.

`create_app(encoder, config, index)` builds a FastAPI app around one `Encoder`; every route that embeds
goes through the shared `DynamicBatcher`, so concurrent requests share forward passes.
"""
from __future__ import annotations

import asyncio
import base64
import gc
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
from fastapi.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from allmpnet import __version__
from allmpnet.encode import Encoder, Tokenized
from allmpnet.encode.quantize import load_calibration, quantize_embeddings
from allmpnet.encode.tokenizer import check_encodable
from allmpnet.errors import InvalidInput
from allmpnet.serve.batching import BatcherClosed, DynamicBatcher, QueueFull
from allmpnet.serve.config import ServeConfig
from allmpnet.serve.errors import APIError, BodyLimit, ClientGone, error_response, install_error_handlers, log
from allmpnet.serve.limits import (Busy, InFlightBudget, RequestGuard, charge_answer, client_gone,
                                   release_free_memory)
from allmpnet.serve.metrics import ServerMetrics
from allmpnet.serve.responses import JSONResponse
from allmpnet.serve.schemas import (EmbeddingsRequest, SearchRequest, SimilarityRequest, TokenizeRequest, as_texts,
                                    token_id_rows)
from allmpnet.serve.tei import embed_token_ids, register_tei_routes, tei_tokenize
from allmpnet.similarity import cos_sim

if TYPE_CHECKING:
    from allmpnet.search import Index

# above this many characters in one request, tokenize off the event loop so other requests keep flowing
TOKENIZE_INLINE_CHARS = 20_000
# JSON bytes of one value in a response, at most: a float32 in its shortest form ("-1.2345678e-05,", see
# serve/responses.py), a word piece id and its string; a search hit's typical size
FLOAT_JSON_BYTES, TOKEN_JSON_BYTES, SEARCH_HIT_BYTES = 16, 48, 1024


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

    async def charge_answer(self, nbytes: int) -> None:
        """Charge the request for its answer once its size is known (serve/limits.py); 503 when no room comes."""
        try:
            await charge_answer(nbytes)
        except Busy as e:
            raise APIError(503, str(e), "server_busy", headers={"Retry-After": "1"}) from None

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
        """Texts as word-piece ids for an answer that lists them: the request is charged for that answer."""
        self.check_limits(texts, field)
        tokenized = await self._tokenize(texts, field, truncate)
        await self.charge_answer(int(tokenized.lengths.sum()) * TOKEN_JSON_BYTES)
        return tokenized

    async def _tokenize(self, texts: list[str], field: str, truncate: bool | None) -> Tokenized:
        """Tokenize texts that passed check_limits."""
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

    async def embed(self, texts: list[str], field: str, truncate: bool | None,
                    normalize: bool | None = None) -> tuple[torch.Tensor, Tokenized]:
        """(n, dim) float32 vectors of texts, batched with whatever else is in flight.

        The request is charged for n vectors as JSON, which bounds every answer built from them (a+b texts give at
        most (a+b)^2/4 similarity scores, fewer numbers than (a+b) x dim)."""
        self.check_limits(texts, field)  # before charging: a refused request costs nothing
        await self.charge_answer(len(texts) * self.encoder.dim * FLOAT_JSON_BYTES)
        tokenized = await self._tokenize(texts, field, truncate)
        return await self.embed_tokenized(tokenized, normalize), tokenized

    async def embed_tokenized(self, tokenized: Tokenized, normalize: bool | None = None) -> torch.Tensor:
        """(n, dim) vectors of already-tokenized texts through the shared batcher; normalize None: as the model
        does (L2 for all-mpnet-base-v2), False: the pooled vectors before it."""
        try:
            future = self.batcher.submit(tokenized.ids, normalize)
        except BatcherClosed as e:
            raise APIError(503, str(e), "shutting_down") from None
        except QueueFull as e:
            self.metrics.rejected.inc()
            raise APIError(503, str(e), "queue_full", headers={"Retry-After": str(e.retry_after)}) from None
        try:
            vectors = await answer_unless_client_gone(future)
        except BatcherClosed as e:
            raise APIError(503, str(e), "shutting_down") from None
        self.metrics.texts.inc(len(tokenized.ids))
        self.metrics.tokens.inc(int(tokenized.lengths.sum()))
        self.metrics.truncated.inc(sum(tokenized.truncated))
        return vectors

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
        """Each vector as the response carries it: floats or quantized integers (numpy rows), or base64 bytes."""
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
        return list(array)  # rows as numpy arrays: the response writes them directly (serve/responses.py)

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
        # What exists now (the model, the framework, the warm-up's allocations) lives as long as the server: moved
        # out of the cyclic collector's reach, it is no longer traversed by every full collection, which under
        # load took about 7% of the server's CPU time (perf, 64 clients x 1 sentence)
        gc.collect()
        gc.freeze()
        release_free_memory()  # the warm-up's freed scratch goes back to the OS: RSS when ready is the working size
        yield
        await anyio.to_thread.run_sync(service.batcher.close)

    app = FastAPI(title="allmpnet", version=__version__, lifespan=lifespan, default_response_class=JSONResponse,
                  description=f"Sentence embeddings from {config.model_name}")
    app.state.service = service
    install_error_handlers(app)
    # outermost last: metrics see every answer, the guard refuses and admits before the body is read
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(RequestGuard, budget=service.budget, max_body_bytes=config.max_body_bytes,
                       api_key=config.api_key,
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
    # where its router is used without the app's middleware. With no key there is nothing to check, and a
    # dependency costs every request FastAPI's dependency resolution
    guarded = [Depends(require_key)] if config.api_key is not None else []

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
        ids = token_id_rows(body.input)  # refused unless --accept-token-ids (serve/tei.py)
        if ids is None:
            vectors, tokenized = await service.embed(as_texts(body.input), "input", body.truncate)
        else:
            vectors, tokenized = await embed_token_ids(service, ids, "input", body.truncate)
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
        return JSONResponse({"scores": scores.numpy(), "model": config.model_name,
                             "truncated": {"a": [i for i, t in enumerate(tokenized.truncated[: len(a)]) if t],
                                           "b": [i for i, t in enumerate(tokenized.truncated[len(a):]) if t]}})

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        if body.inputs is not None:  # TEI's body: {"inputs", "add_special_tokens"}
            return await tei_tokenize(service, body)
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
        # hits carry stored texts of any size: charged here at a typical size, and at their real size once built
        await service.charge_answer(len(queries) * body.k * SEARCH_HIT_BYTES)
        vectors, tokenized = await service.embed(queries, "query", body.truncate)
        hits = await anyio.to_thread.run_sync(service.search, vectors.numpy(), body.k)
        return JSONResponse({"model": config.model_name, "k": body.k,
                             "truncated": [i for i, t in enumerate(tokenized.truncated) if t],
                             "results": [{"query": q, "hits": h} for q, h in zip(queries, hits)]})

    register_tei_routes(app, service, guarded)  # POST /embed and /, GET /info: text-embeddings-inference's API
    return app


def route_label(scope: Scope) -> str:
    """The route template a request is counted under.

    A request refused before routing (503 server_busy, 401, 413 from RequestGuard) has no route in its scope yet:
    its path is matched against the app's routes here. Paths no route matches share one label, so random URLs
    cannot grow the metric without bound."""
    route = scope.get("route")
    if route is None and (app := scope.get("app")) is not None:
        route = next((r for r in app.router.routes if r.matches(scope)[0] == Match.FULL), None)
    return getattr(route, "path", None) or "unmatched"


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
    departed = False

    def on_departure() -> None:
        nonlocal departed
        departed = True
        answer.cancel()

    if gone.is_set():
        on_departure()
    gone.add_callback(on_departure)
    try:
        return await answer
    except asyncio.CancelledError:
        future.cancel()  # the batcher forgets rows of a cancelled request that no forward pass has taken yet
        if departed:
            raise ClientGone from None
        raise
    finally:
        gone.remove_callback(on_departure)


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
            label = route_label(scope)
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)
