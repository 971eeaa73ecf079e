"""What keeps the server's memory and connections bounded whatever its clients do.

`RequestGuard` is the outer layer every HTTP request passes through before the app sees it:

- API key: checked from the headers, so an unauthenticated request is refused before its body is read.
- Admission: a request is charged the bytes it will occupy against `InFlightBudget`, and waits until they
  fit: its body (as declared) before the body is read, its answer once the app knows its texts and their
  lengths (`charge_answer`). Memory then grows with the bytes admitted, not with the number of requests, and
  an ordinary request is charged what it really costs rather than the worst its body size allows.
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

_client_gone: ContextVar["Departure | None"] = ContextVar("allmpnet_client_gone", default=None)
_admission: ContextVar["Ticket | None"] = ContextVar("allmpnet_admission", default=None)


class Departure(asyncio.Event):
    """Set when a request's client disconnects; also calls back, so waiting on it alongside an answer costs no task."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []

    def set(self) -> None:
        if not self.is_set():
            super().set()
            for callback in self._callbacks:
                callback()

    def add_callback(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def remove_callback(self, callback: Callable[[], None]) -> None:
        self._callbacks.remove(callback)


def client_gone() -> Departure | None:
    """Set when the client of the request being handled has disconnected (None outside a request)."""
    return _client_gone.get()


async def charge_answer(cost: int) -> None:
    """Charge the request being handled for its answer, now that its size is known; waits for room like
    admission does and raises Busy when none comes in time. Outside RequestGuard (an app mounted without it)
    there is nothing to charge."""
    ticket = _admission.get()
    if ticket is not None:
        await ticket.extend(cost)


class Busy(Exception):
    def __init__(self, waited: float):
        super().__init__(f"the server is busy with other large requests (waited {waited:.0f}s for room); retry")


class _SlowReader(Exception):
    pass


class InFlightBudget:
    """Bytes admitted and not yet answered, at most `capacity`; a request waits until its cost fits.

    A request that fits is admitted at once, even ahead of a larger one that is waiting: small requests are
    never held up behind a giant, and a giant waits only while the bytes in flight leave no room for it.

    A request is charged in two steps (a `Ticket`): its body when it arrives, its answer once the app has read
    the body and knows how many texts it holds. Bodies may hold at most half the capacity between them, and an
    answer is charged at most half: so when every admitted request waits for room for its answer, the bodies
    leave room for any one of them, and requests that each hold a body never wait on one another until they
    time out. A larger body or answer is charged as half the capacity, so a request of any allowed size is
    admitted on an idle server.
    """

    def __init__(self, capacity: int):
        if capacity < 2:
            raise InvalidInput(f"the in-flight budget must be at least 2 bytes, got {capacity}")
        self.capacity = capacity
        self.used = 0
        self.bodies = 0  # of `used`, what admitted tickets were charged for their bodies
        self.peak = 0
        self._waiters: list[asyncio.Future] = []

    def _take(self, cost: int) -> None:
        self.used += cost
        self.peak = max(self.peak, self.used)

    async def _wait_for_room(self, cost: int, timeout: float, body: int = 0) -> None:
        start = time.monotonic()
        while self.used + cost > self.capacity or self.bodies + body > self.capacity // 2:
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

    async def acquire(self, cost: int, timeout: float) -> int:
        """Charge cost (capped at the capacity), waiting up to timeout seconds; returns what was charged."""
        cost = min(cost, self.capacity)
        await self._wait_for_room(cost, timeout)
        self._take(cost)
        return cost

    async def admit(self, body_bytes: int, timeout: float) -> "Ticket":
        """A request's first charge, its body: a ticket it extends by its answer and closes when done."""
        cost = min(body_bytes, self.capacity // 2)
        await self._wait_for_room(cost, timeout, body=cost)
        self._take(cost)
        self.bodies += cost
        return Ticket(self, cost, timeout)

    def overdraw(self, cost: int) -> None:
        """Charge cost without waiting: for bytes that already exist (a response larger than its estimate)."""
        self._take(cost)

    def release(self, cost: int) -> None:
        self.used -= cost
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:  # each re-checks whether it fits now
            if not waiter.done():
                waiter.set_result(None)


class Ticket:
    """What one admitted request holds against the budget; `extend` adds its answer, `close` gives all back."""

    def __init__(self, budget: InFlightBudget, body: int, timeout: float):
        self.budget, self.body, self.timeout = budget, body, timeout
        self.charged = body
        self.closed = False

    async def extend(self, cost: int) -> None:
        """Charge cost more (at most half the capacity), waiting up to the admission timeout (then Busy)."""
        cost = min(cost, self.budget.capacity // 2)
        await self.budget._wait_for_room(cost, self.timeout)
        self.budget._take(cost)
        self.charged += cost

    def overdraw(self, cost: int) -> None:
        """Charge bytes that already exist (a response larger than its charge), without waiting."""
        self.budget.overdraw(cost)
        self.charged += cost

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.budget.bodies -= self.body
            self.budget.release(self.charged)


class RequestGuard:
    """Pure ASGI middleware: key check, admission, body and write deadlines, disconnect notice (module docstring)."""

    def __init__(self, app: ASGIApp, budget: InFlightBudget, max_body_bytes: int, api_key: str | None,
                 admission_timeout: float, body_timeout: float, read_timeout: float, write_timeout: float):
        self.app, self.budget, self.max_body_bytes = app, budget, max_body_bytes
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
            ticket = await self.budget.admit(body_bytes, self.admission_timeout)
        except Busy as e:
            await error_response(503, str(e), "server_busy", headers={"Retry-After": "1", **unread})(
                scope, receive, send)
            return
        token = _admission.set(ticket)
        try:
            await self._serve(scope, receive, send, ticket)
        finally:
            _admission.reset(token)
            ticket.close()
            if ticket.charged >= TRIM_ABOVE:
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

    async def _serve(self, scope: Scope, receive: Receive, send: Send, ticket: "Ticket") -> None:
        """Run the app with deadlines on the body and the response; a response larger than the ticket's charge is
        charged to it as it goes out."""
        gone = Departure()
        token = _client_gone.set(gone)
        watcher: asyncio.Task | None = None
        deadline: float | None = None

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
                async with asyncio.timeout(min(self.read_timeout, max(deadline - now, 0.001))):
                    message = await receive()
            except TimeoutError:
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
            if message["type"] == "http.response.start":
                length = dict(message.get("headers", ())).get(b"content-length", b"0")
                extra = int(length) - ticket.charged if length.isdigit() else 0
                if extra > 0:  # the response came out larger than its charge: it exists, count it
                    ticket.overdraw(extra)
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

    async def _timed_send(self, send: Send, message: Message) -> None:
        try:
            async with asyncio.timeout(self.write_timeout):
                await send(message)
        except TimeoutError:
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
