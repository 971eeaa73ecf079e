"""What keeps the server's memory and connections bounded whatever its clients do.

`RequestGuard` is the outer layer every HTTP request passes through before the app sees it:

- API key: checked from the headers, so an unauthenticated request is refused before its body is read.
- Admission: a request is charged the bytes it will occupy (its body, as declared, plus the largest response
  its route can give for a body that size) against `InFlightBudget`, and waits until they fit; memory then
  grows with the bytes admitted, not with the number of requests.
- Time: once admitted, the body must arrive within `body_timeout` seconds, with no gap over `read_timeout`.
  Answers go out in 1 MiB pieces, each sent once the client has taken the previous one, so a request holds
  its admission until its answer is nearly all read; a client that takes none of it for `write_timeout`
  seconds is dropped (the protocol aborts the connection, serve/protocol.py; here the request gives up).
- Departure: when a client disconnects, `client_gone()` is set for its request, so work still queued for it
  is dropped (serve/app.py) instead of computed for nobody.

Headers are bounded below the ASGI layer, in the HTTP protocol (serve/protocol.py).
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hmac
import time
from contextvars import ContextVar
from typing import Callable

from fastapi.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from allmpnet.errors import InvalidInput
from allmpnet.serve.errors import error_response

RESPONSE_PIECE = 1 << 20  # bytes per send of a large response: each waits until the client has taken the last
OPEN_PATHS = frozenset({"/health", "/metrics"})  # answered without an API key (probes and scrapers)
TRIM_ABOVE = 8 << 20  # after a request this large ends, hand freed heap pages back to the OS

_client_gone: ContextVar[asyncio.Event | None] = ContextVar("allmpnet_client_gone", default=None)


def client_gone() -> asyncio.Event | None:
    """Set when the client of the request being handled has disconnected (None outside a request)."""
    return _client_gone.get()


class Busy(Exception):
    def __init__(self, waited: float):
        super().__init__(f"the server is busy with other large requests (waited {waited:.0f}s for room); retry")


class _SlowReader(Exception):
    pass


class InFlightBudget:
    """Bytes admitted and not yet answered, at most `capacity`; a request waits until its cost fits.

    A request that fits is admitted at once, even ahead of a larger one that is waiting: small requests are
    never held up behind a giant, and a giant waits only while the bytes in flight leave no room for it. A
    cost above the capacity is charged as the capacity, so one request of any allowed size is always admitted
    on an idle server.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise InvalidInput(f"the in-flight budget must be at least 1 byte, got {capacity}")
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self._waiters: list[asyncio.Future] = []

    def _take(self, cost: int) -> None:
        self.used += cost
        self.peak = max(self.peak, self.used)

    async def acquire(self, cost: int, timeout: float) -> int:
        """Charge cost (capped at the capacity), waiting up to timeout seconds; returns what was charged."""
        cost = min(cost, self.capacity)
        start = time.monotonic()
        while self.used + cost > self.capacity:
            remaining = timeout - (time.monotonic() - start)
            if remaining <= 0:
                raise Busy(time.monotonic() - start)
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except asyncio.TimeoutError:
                pass
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self._take(cost)
        return cost

    def overdraw(self, cost: int) -> None:
        """Charge cost without waiting: for bytes that already exist (a response larger than its estimate)."""
        self._take(cost)

    def release(self, cost: int) -> None:
        self.used -= cost
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:  # each re-checks whether it fits now
            if not waiter.done():
                waiter.set_result(None)


class RequestGuard:
    """Pure ASGI middleware: key check, admission, body and write deadlines, disconnect notice (module docstring).

    cost(scope, body_bytes) gives the bytes a request may occupy beyond its body (its largest response).
    """

    def __init__(self, app: ASGIApp, budget: InFlightBudget, cost: Callable[[Scope, int], int], max_body_bytes: int,
                 api_key: str | None, admission_timeout: float, body_timeout: float, read_timeout: float,
                 write_timeout: float):
        self.app, self.budget, self.cost, self.max_body_bytes = app, budget, cost, max_body_bytes
        self.api_key = api_key
        self.admission_timeout, self.body_timeout = admission_timeout, body_timeout
        self.read_timeout, self.write_timeout = read_timeout, write_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        declared = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        # a body of unknown length (chunked) is charged the most it may be
        body_bytes = int(declared) if declared is not None and declared.isdigit() else (
            self.max_body_bytes if chunked else 0)
        # answered before the body is read: closing tells the client not to send it (and spares reading it)
        unread = {"Connection": "close"} if body_bytes else {}
        refusal = self.refusal(scope["path"], headers, unread)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        try:
            charged = await self.budget.acquire(body_bytes + self.cost(scope, body_bytes), self.admission_timeout)
        except Busy as e:
            await error_response(503, str(e), "server_busy", headers={"Retry-After": "1", **unread})(
                scope, receive, send)
            return
        try:
            charged += await self._serve(scope, receive, send, charged)
        finally:
            self.budget.release(charged)
            if charged >= TRIM_ABOVE:
                release_free_memory()

    def refusal(self, path: str, headers: dict[bytes, bytes], extra_headers: dict[str, str]):
        """The error response for a request refused on its headers alone, or None."""
        if self.api_key is not None and path not in OPEN_PATHS:
            scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1"),
                                                                     self.api_key.encode()):
                return error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                      "invalid_api_key", headers={"WWW-Authenticate": "Bearer", **extra_headers})
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:  # refused before it could wait for room
            return error_response(413, f"the request body is larger than the server's limit of {self.max_body_bytes} "
                                       "bytes", "body_too_large", headers=extra_headers)
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding not in (b"", b"identity"):
            return error_response(415, f"Content-Encoding {encoding.decode('latin-1')!r} is not supported: send the "
                                       "body uncompressed (UTF-8 JSON)", "unsupported_content_encoding",
                                  headers=extra_headers)
        return None

    async def _serve(self, scope: Scope, receive: Receive, send: Send, charged: int) -> int:
        """Run the app with deadlines on the body and the response; returns bytes overdrawn for the response."""
        gone = asyncio.Event()
        token = _client_gone.set(gone)
        watcher: asyncio.Task | None = None
        deadline: float | None = None
        overdrawn = 0

        async def watch_for_departure() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        async def guarded_receive() -> Message:
            nonlocal deadline, watcher
            if watcher is not None:  # the body is in; the watcher already waits on the channel
                await gone.wait()
                return {"type": "http.disconnect"}
            now = time.monotonic()
            deadline = deadline or now + self.body_timeout
            try:
                message = await asyncio.wait_for(receive(), min(self.read_timeout, max(deadline - now, 0.001)))
            except asyncio.TimeoutError:
                # an HTTPException passes through the body reader to the app's JSON error handler
                raise HTTPException(408, f"the request body did not arrive in time (allowed: {self.body_timeout:g}s "
                                         f"in all, {self.read_timeout:g}s between pieces)",
                                    headers={"Connection": "close"}) from None
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                watcher = asyncio.ensure_future(watch_for_departure())
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal overdrawn
            if message["type"] == "http.response.start":
                length = dict(message.get("headers", ())).get(b"content-length", b"0")
                extra = int(length) - charged if length.isdigit() else 0
                if extra > 0:  # the response came out larger than its route's estimate: it exists, count it
                    self.budget.overdraw(extra)
                    overdrawn += extra
            body = message.get("body", b"")
            if message["type"] != "http.response.body" or len(body) <= RESPONSE_PIECE:
                await self._timed_send(send, message)
                return
            view, more = memoryview(body), message.get("more_body", False)
            for start in range(0, len(view), RESPONSE_PIECE):
                piece = bytes(view[start:start + RESPONSE_PIECE])
                last = start + RESPONSE_PIECE >= len(view)
                await self._timed_send(send, {"type": "http.response.body", "body": piece,
                                              "more_body": more or not last})

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except _SlowReader:
            # the protocol aborts the connection (serve/protocol.py); returning unfinished makes the server close
            # it too where that protocol is not in use
            pass
        finally:
            _client_gone.reset(token)
            if watcher is not None:
                watcher.cancel()
        return overdrawn

    async def _timed_send(self, send: Send, message: Message) -> None:
        try:
            await asyncio.wait_for(send(message), self.write_timeout)
        except asyncio.TimeoutError:
            raise _SlowReader from None


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise, so one big request would raise RSS for good)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_malloc_trim = _find_malloc_trim()
