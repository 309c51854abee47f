"""`clearml-umem front`: one OpenAI-compatible URL in front of many routers, for teams without
clearml-serving. Each request goes where its model already is (fleet/choose.py), its answer is
relayed as it arrives (streams unchanged), and `/v1/models` lists the union of the routers' models.

Routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`, `/fleet/status` (JSON:
every router, its device, models, tiers and load) and `/fleet` (the same as an HTML table).
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from clearml_umem.fleet.choose import TIER_ORDER, models_served, rank
from clearml_umem.fleet.probe import Discover, Fleet
from clearml_umem.fleet.relay import Chooser, NoRouter, RouterGone, error_body, send
from clearml_umem.log_setup import UVICORN_LOGGING
from clearml_umem.router.app import BearerAuth

log = logging.getLogger(__name__)

READY_PREFIX = "umem: front on "
MAX_BODY_BYTES = 8 * 2**20
RELAYED_HEADERS = ("content-type", "x-umem-served-from", "retry-after")


def _error(message: str, status: int, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status)


async def _json_body(request: Request, limit: int) -> dict[str, Any] | JSONResponse:
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            return _error(f"the request body is over {limit} bytes", 413)
    try:
        body = json.loads(raw)
    except ValueError:
        return _error("the request body must be a JSON object", 400)
    if not isinstance(body, dict):
        return _error("the request body must be a JSON object", 400)
    if not isinstance(body.get("model"), str) or not body["model"]:
        return _error("'model' is required: the name of a served model", 400, param="model")
    return body


def create_front(fleet: Fleet, client: httpx.AsyncClient, router_headers: dict[str, str], api_key: str | None = None,
                 chooser: Chooser = rank, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="clearml-umem front", docs_url=None, redoc_url=None, openapi_url=None)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)

    async def relay(request: Request, path: str) -> Response:
        body = await _json_body(request, max_body_bytes)
        if isinstance(body, JSONResponse):
            return body
        model = body["model"]
        try:
            sent = await send(fleet, client, "POST", path, model, body, router_headers, chooser)
        except NoRouter as exc:
            return _error(str(exc), 503, param="model", code="model_not_served")
        except RouterGone as exc:
            return _error(str(exc), 502, code="router_gone")
        headers = {k: v for k, v in sent.response.headers.items() if k.lower() in RELAYED_HEADERS}
        headers["x-umem-router"] = sent.url
        if body.get("stream") and sent.response.status_code == 200:
            return StreamingResponse(_events(sent.chunks(), sent.url), status_code=200, headers=headers)
        try:
            content = await sent.body()
        except RouterGone as exc:
            return _error(str(exc), 502, code="router_gone")
        return Response(content, status_code=sent.response.status_code, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await relay(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await relay(request, "/v1/completions")

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        await fleet.ready()
        views = fleet.views()
        data = []
        for name, urls in models_served(views).items():
            tiers = [v.models[name].tier for v in views if v.url in urls]
            best = min(tiers, key=lambda t: TIER_ORDER.get(t, len(TIER_ORDER)))
            data.append({"id": name, "object": "model", "owned_by": "clearml-umem", "tier": best, "routers": urls})
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name:path}")
    async def retrieve_model(name: str) -> Response:
        listed = {m["id"]: m for m in (await list_models())["data"]}
        if name not in listed:
            return _error(f"model {name!r} is not served by any running router", 404, param="model",
                          code="model_not_found")
        return JSONResponse(listed[name])

    @app.get("/health")
    async def health() -> Response:
        await fleet.ready()
        alive = [v for v in fleet.views() if v.alive]
        status = {"status": "ok" if alive else "no router", "routers": len(fleet.views()), "alive": len(alive),
                  "models": len(models_served(alive))}
        return JSONResponse(status, status_code=200 if alive else 503)

    @app.get("/fleet/status")
    async def fleet_status() -> dict[str, Any]:
        await fleet.ready()
        return fleet.status()

    @app.get("/fleet")
    async def fleet_page() -> HTMLResponse:
        await fleet.ready()
        return HTMLResponse(fleet_html(fleet.status()), headers={"cache-control": "no-store"})

    return app


async def _events(chunks: AsyncIterator[bytes], url: str) -> AsyncIterator[bytes]:
    """The router's event stream as it comes; if the router dies part-way, one last event says so
    in OpenAI's error shape (an OpenAI client raises it) instead of a stream that just stops."""
    try:
        async for chunk in chunks:
            yield chunk
    except RouterGone as exc:
        yield b"data: " + json.dumps(error_body(str(exc), 502, code="router_gone")).encode() + b"\n\n"


def fleet_html(status: dict[str, Any]) -> str:
    rows = []
    for r in status["routers"]:
        models = ", ".join(f"{m['id']} ({m['tier']}{' -> ' + m['moving_to'] if m['moving_to'] else ''}, "
                           f"{m['in_flight']} in flight, {m['waiting']} waiting)" for m in r["models"])
        state = "up" if r["alive"] else f"gone: {r['error'] or '?'}"
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in
                                     (r["url"], r["device"] or "-", state, r["load"], models or "-")) + "</tr>")
    return ("<!doctype html><meta charset=utf-8><title>clearml-umem fleet</title>"
            "<style>body{font-family:sans-serif}td,th{padding:4px 10px;border-bottom:1px solid #ddd}</style>"
            f"<h1>Fleet</h1><p>probed every {status['probe_s']} s</p><table><tr><th>router</th><th>device</th>"
            "<th>state</th><th>load</th><th>models (tier, load)</th></tr>" + "".join(rows) + "</table>")


async def serve_front(discover: Discover, host: str, port: int, probe_s: float, timeout_s: float,
                      api_key: str | None, router_key: str | None,
                      ready: Callable[[str], None] | None = None, chooser: Chooser = rank) -> None:
    """Serve until cancelled or signalled."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    headers = {"Authorization": f"Bearer {router_key}"} if router_key else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)), limits=limits,
                                 trust_env=False) as client:
        fleet = Fleet(discover, client, probe_s=probe_s, probe_timeout_s=min(2.0, probe_s * 2), headers=headers)
        fleet.start()
        app = create_front(fleet, client, headers, api_key=api_key, chooser=chooser)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        bound_host, bound_port = sock.getsockname()[:2]
        server = uvicorn.Server(uvicorn.Config(app, **UVICORN_LOGGING, lifespan="off"))  # type: ignore[arg-type]
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started and not serving.done():
                await asyncio.sleep(0.02)
            if server.started and ready is not None:
                ready(f"http://{bound_host}:{bound_port}")
            await serving
        finally:
            await fleet.close()
            sock.close()
