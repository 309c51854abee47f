"""Every failure leaves the router as OpenAI's error JSON, so OpenAI clients raise their typed errors.

Shape: {"error": {"message", "type", "param", "code"}}. The official clients pick the
exception class from the HTTP status and show `message`, so the message names the field
or the reason in words a user can act on.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from clearml_umem.errors import ServingError
from clearml_umem.router.disconnect import ClientGone

if TYPE_CHECKING:  # the parser processes import this module: FastAPI itself takes them 0.2 s
    from fastapi import FastAPI

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499
"""What nginx logs for a client that closed the connection before the answer: never sent."""

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"
RATE_LIMITED = "rate_limit_error"


class APIError(Exception):
    """Raised anywhere in a handler; turned into the matching OpenAI-style response."""

    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or default_type(status)
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def default_type(status: int) -> str:
    if status == 401:
        return AUTHENTICATION
    if status == 404:
        return NOT_FOUND
    if status == 429:
        return RATE_LIMITED
    if status == 503:
        return UNAVAILABLE
    if status >= 500:
        return SERVER_ERROR
    return INVALID_REQUEST


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def api_error(exc: ServingError) -> APIError:
    """The one mapping from an error raised anywhere below the router to its response. A server
    failure whose text tells of the server's insides (an engine's exception, a weights path) is
    logged under a reference, and the client gets the reference."""
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after is not None else None
    message = exc.message
    if exc.status >= 500 and exc.internal:
        reference = uuid.uuid4().hex[:12]
        log.warning("engine failure answered as %d (reference %s): %s", exc.status, reference, exc.message)
        message = f"The model's engine failed (reference {reference}); the server log has the details."
    return APIError(exc.status, message, param=exc.param, code=exc.code, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist; GET /v1/models lists the models served here.",
                    INVALID_REQUEST, "model", "model_not_found")


def unauthorized() -> APIError:
    return APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.", INVALID_REQUEST,
                    None, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def error_response(request: Request, exc: Exception) -> Response:
    """The one answer to an exception a route raised, in OpenAI's shape: route-level errors (404
    route, 405 method) and bugs too. Used by FastAPI's handlers (`install_error_handlers`) and by
    the routes answered before FastAPI's routing (`fast_routes.py`)."""
    if isinstance(exc, APIError):
        return exc.response()
    if isinstance(exc, ServingError):
        return api_error(exc).response()
    if isinstance(exc, ClientDisconnect | ClientGone):
        # the client hung up while sending its body, or while it was checked: nobody to answer, and
        # nothing went wrong here
        log.debug("client left during its request body: %s %s", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED)
    if isinstance(exc, StarletteHTTPException):
        message = str(exc.detail) if exc.detail else "error"
        if exc.status_code == 404:
            message = "No such route; this server serves /v1/models, /v1/completions and /v1/chat/completions."
        return APIError(exc.status_code, message, headers=dict(exc.headers or {})).response()
    # internal exception text can hold paths and secrets: it goes to the log, the client gets a reference
    reference = uuid.uuid4().hex[:12]
    log.error("internal error %s on %s %s", reference, request.method, request.url.path,
              exc_info=(type(exc), exc, exc.__traceback__))
    return APIError(500, f"Internal server error (reference {reference}); the server log has the details.",
                    SERVER_ERROR).response()


def install_error_handlers(app: FastAPI) -> None:
    async def on_error(request: Request, exc: Exception) -> Response:
        return error_response(request, exc)

    for kind in (APIError, ServingError, ClientDisconnect, ClientGone, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, on_error)
