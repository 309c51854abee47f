"""The inference routes answered before FastAPI's routing: the router's cost on every first token.

FastAPI's routing layers (its exception middleware and exit stack, matching the path against
every route, solving the endpoint's dependencies, wrapping `send` twice more) cost a tenth of a
millisecond a request, measured (`benchmarks/router_overhead.py`): a fifth of what the router
then added to a small model's first token. The inference handlers take only the request, so
this middleware, innermost of the router's own (keys, browsers and HEAD are checked before it),
calls them itself, and answers their errors with the same mapping FastAPI's handlers use
(`errors.error_response`). Every other route goes on to FastAPI.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from clearml_umem.router.errors import error_response

Handler = Callable[[Request], Awaitable[Response]]


class FastRoutes:
    def __init__(self, app: ASGIApp, routes: Mapping[str, Handler]) -> None:
        self.app = app
        self.routes = dict(routes)
        """POST path -> handler."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            if scope["method"] != "POST":
                raise HTTPException(405, headers={"Allow": "POST"})
            response = await handler(request)
        except Exception as exc:  # noqa: BLE001 - every error is answered, as FastAPI's handlers would
            response = error_response(request, exc)
        await response(scope, receive, send)
