"""HEAD wherever GET is, as HTTP requires: the GET route runs and the server sends no body.

FastAPI routes declared with `@app.get` answer HEAD with 405, so monitors and `curl -I` fail.
The request reaches the app as a GET; uvicorn reads the method from its own copy of the
request, still HEAD, and leaves the body out.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)
