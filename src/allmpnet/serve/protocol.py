"""Bounds on request headers, below the ASGI layer: their size, and the time a client may take to send them.

uvicorn's httptools protocol buffers a header of any size and never times out a connection that has not
finished its first request's headers (its keep-alive timer starts only after a response). The subclass here
answers 431 once a request's headers pass `max_header_bytes` and 408 when they are not complete within
`header_timeout` seconds of the connection opening or of the previous response, then closes the connection.

It also drops a connection whose client stops reading: when the socket's send buffer stays full for
`write_timeout` seconds, the connection is reset, which discards what was queued for it in the process and
in the kernel (a plain close keeps both, and the socket, until a client that never reads takes them).
"""
from __future__ import annotations

import asyncio
import json
import socket
import struct

from allmpnet.serve.config import ServeConfig
from allmpnet.serve.errors import log

LINGER = 2.0  # seconds a refused connection is drained before it is closed


def raw_error(status: int, reason: str, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 error response in our JSON shape, for answers written straight to the socket."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class _HeadersTooLarge(Exception):
    """Raised from a parser callback to stop parsing a request that has already been refused."""


def guarded_http_protocol(config: ServeConfig) -> type[asyncio.Protocol] | None:
    """uvicorn's httptools protocol with our header bounds, or None when httptools is not installed."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None
    max_bytes, timeout, write_timeout = config.max_header_bytes, config.header_timeout, config.write_timeout

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_bytes = self._raw_header_bytes = 0
            self._header_timer: asyncio.TimerHandle | None = None
            self._lingering = False
            self._write_stall: asyncio.TimerHandle | None = None
            self._await_headers()

        def _await_headers(self) -> None:
            self._header_bytes = self._raw_header_bytes = 0
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(timeout, self._headers_too_slow)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _refuse(self, answer: bytes) -> None:
            """Answer, then close gently: closing with unread input would reset the connection and lose the answer,
            so what the client still sends is read and dropped for LINGER seconds, or until it closes its side."""
            self._cancel_header_timer()
            if self.transport.is_closing() or self._lingering:
                return
            self._lingering = True
            self.transport.write(answer)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER, self.transport.close)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            self._refuse(raw_error(408, "Request Timeout", f"the request headers did not arrive within {timeout:g}s",
                                   "request_timeout"))

        def data_received(self, data: bytes) -> None:
            if self._lingering:
                return
            # Two counts, as the bytes may arrive: while a header block is incomplete, every byte read (the parser
            # buffers a header until it ends, so no callback sees it); and the parser's callbacks, which see a block
            # that arrives whole in one read, before the request is dispatched
            if self._header_timer is not None:  # still reading headers (the parser clears the timer at their end)
                self._raw_header_bytes += len(data)
            super().data_received(data)
            if self._header_timer is not None and self._raw_header_bytes > max_bytes:
                self._headers_too_large()

        def _headers_too_large(self) -> None:
            self._refuse(raw_error(431, "Request Header Fields Too Large",
                                   f"the request line and headers are larger than this server's limit of "
                                   f"{max_bytes} bytes", "headers_too_large"))

        def _count_header_bytes(self, count: int) -> None:
            self._header_bytes += count
            if self._header_bytes > max_bytes:
                self._headers_too_large()
                raise _HeadersTooLarge  # stops the parser: the request is never dispatched

        def on_url(self, url: bytes) -> None:
            self._count_header_bytes(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_header_bytes(len(name) + len(value) + 4)  # "name: value\r\n"
            super().on_header(name, value)

        def send_400_response(self, msg: str) -> None:
            if self._lingering:  # the parser stopped because we refused the request: that answer is already out
                return
            super().send_400_response(msg)

        def on_headers_complete(self) -> None:
            self._cancel_header_timer()
            self._header_bytes = 0  # a pipelined request's block is counted from its own request line
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            pipelined = bool(self.pipeline)  # its headers are already in: it starts now
            super().on_response_complete()
            if not pipelined and not self.transport.is_closing():
                self._await_headers()  # the next request on this connection gets the same allowance

        def eof_received(self) -> bool | None:
            if self._lingering:  # the client has read our answer and closed its side
                self.transport.close()
            return super().eof_received()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_stall is None:
                self._write_stall = self.loop.call_later(write_timeout, self._reader_gone_quiet)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._write_stall is not None:
                self._write_stall.cancel()
                self._write_stall = None

        def _reader_gone_quiet(self) -> None:
            self._write_stall = None
            log.warning("dropped a connection whose client read nothing of its answer for %ss", write_timeout)
            sock = self.transport.get_extra_info("socket")
            try:  # a reset, not a close: the kernel too drops what it still holds for this client
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except (AttributeError, OSError):
                pass
            self.transport.abort()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            if self._write_stall is not None:
                self._write_stall.cancel()
                self._write_stall = None
            super().connection_lost(exc)

    return GuardedHttpToolsProtocol


def uvicorn_options(config: ServeConfig) -> dict:
    """uvicorn.Config keyword arguments that apply our connection bounds (headers, keep-alive)."""
    protocol = guarded_http_protocol(config)
    options = {"timeout_keep_alive": config.keep_alive_timeout}
    if protocol is not None:
        options["http"] = protocol
    else:  # h11 bounds header size by itself; it has no header deadline (install httptools for one)
        options.update(http="h11", h11_max_incomplete_event_size=config.max_header_bytes)
    return options
