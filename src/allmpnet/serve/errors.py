"""Every failure answers JSON in the OpenAI error shape, so the official clients raise a readable exception.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "input", "code": "too_many_items"}}
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("allmpnet.serve")

ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
               422: "invalid_request_error", 503: "server_overloaded"}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
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
    if error.get("type") == "extra_forbidden":
        return f"{where}: unknown field", str(loc[0]) if loc else None
    if not loc:
        return "the body must be a JSON object of request fields (with Content-Type: application/json)", None
    message = message.removeprefix("Value error, ")
    if not message.startswith(where):  # our own messages already name the item, e.g. "input[3] is null"
        message = f"{where}: {message}"
    return message, str(loc[0])


def install_error_handlers(app: FastAPI) -> None:
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
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "internal_error")


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
