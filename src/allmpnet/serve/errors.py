"""Every failure answers JSON in the OpenAI error shape, so the official clients raise a readable exception.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "input", "code": "too_many_items"}}
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from allmpnet.serve.responses import JSONResponse

log = logging.getLogger("allmpnet.serve")

ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
               422: "invalid_request_error", 503: "server_overloaded"}
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before its answer; it is never sent, only counted


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    # a message may quote the request (a field name, a model id) and so hold code points UTF-8 cannot encode
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    param = None if param is None else param.encode("utf-8", "backslashreplace").decode("utf-8")
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "api_error" if status >= 500
                                                                   else "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def describe_validation_error(error: dict) -> tuple[str, str | None]:
    """One pydantic error as 'input[2]: expected a string' plus the top-level field it concerns."""
    loc = [part for part in error.get("loc", ()) if part != "body"]
    where = ""
    for part in loc:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    message = error.get("msg", "invalid value")
    if error.get("type") == "json_invalid":
        return f"the body is not valid JSON ({error.get('ctx', {}).get('error', message)})", None
    if error.get("type") == "missing":
        return f"{where or 'body'}: field required", str(loc[0]) if loc else None
    if error.get("type") == "string_unicode":
        return f"{where or 'a field name'} is not valid Unicode (a lone surrogate, which UTF-8 cannot encode)", (
            str(loc[0]) if loc else None)
    if error.get("type") == "extra_forbidden":
        return f"{where}: unknown field", str(loc[0]) if loc else None
    if not loc:
        return "the body must be a JSON object of request fields (with Content-Type: application/json)", None
    message = message.removeprefix("Value error, ")
    if not message.startswith(where):  # our own messages already name the item, e.g. "input[3] is null"
        message = f"{where}: {message}"
    return message, str(loc[0])


class ClientGone(Exception):
    """The client disconnected before its answer was ready: nothing is left to answer."""


def install_error_handlers(app: FastAPI) -> None:
    from allmpnet.encode import NonFiniteOutputError

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.code, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        message, param = describe_validation_error(errors[0]) if errors else ("invalid request", None)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return error_response(422, message, "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> Response:
        if e.status_code == 400 and e.__cause__ is not None:  # the framework could not read the body
            if isinstance(e.__cause__, ClientDisconnect):
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            return error_response(422, f"the body is not UTF-8 JSON ({describe_unreadable(e.__cause__)})",
                                  "invalid_request")
        code = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
                413: "body_too_large"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), code, headers=getattr(e, "headers", None))

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, e: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(NonFiniteOutputError)
    async def non_finite(_: Request, e: NonFiniteOutputError) -> JSONResponse:
        log.error("%s", e)
        return error_response(500, str(e), "non_finite_output")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "internal_error")


def describe_unreadable(error: BaseException) -> str:
    if isinstance(error, UnicodeDecodeError):
        return f"{error.reason} at byte {error.start}"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return type(error).__name__


class BodyLimit:
    """Refuses request bodies over max_bytes with 413, by Content-Length up front or while streaming in."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"the request body is larger than the server's limit of {self.max_bytes} bytes"
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(413, too_large, "body_too_large")(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # a chunked body with no Content-Length
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited_receive, send)
