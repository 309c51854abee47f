"""The OpenAI-compatible HTTP face of the server, plus health, metrics and the admin view.

Handlers parse bodies themselves instead of letting FastAPI do it, so that every failure
(malformed JSON included) answers in OpenAI's error format with the offending field as
`param`. Every handler is `async def`: the runtime and the scheduler behind it are only
ever touched from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import pickle
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from clearml_umem.engines.base import Delta
from clearml_umem.engines.prompt_check import PromptBound
from clearml_umem.errors import ServingError
from clearml_umem.metrics import Metrics
from clearml_umem.model_logs import RouterModelLog, read_log_file
from clearml_umem.move_history import MoveHistory
from clearml_umem.router.access_log import AccessRecord
from clearml_umem.router.answer import ToolCallJoin, chat_logprobs, chat_message, completion_logprobs
from clearml_umem.router.body_handoff import Body, BodyHandoff, HandoffRoutes, body_timed_out, body_timeout, handoff_of
from clearml_umem.router.body_reader import BodyReaders
from clearml_umem.router.browser_guard import DEFAULT_HOSTS, BrowserGuard, HostNames
from clearml_umem.router.disconnect import ClientGone, until_disconnect
from clearml_umem.router.drain import Drain, GraceOver
from clearml_umem.router.errors import (
    CLIENT_CLOSED,
    UNAVAILABLE,
    APIError,
    bad_request,
    install_error_handlers,
    model_not_found,
    unauthorized,
)
from clearml_umem.router.fast_routes import FastRoutes
from clearml_umem.router.generation import (
    Generation,
    ServingRuntime,
    resolve_model,
    with_model_defaults,
)
from clearml_umem.router.head import HeadAsGet
from clearml_umem.router.keys import Keys
from clearml_umem.router.parser_pool import ParserPool
from clearml_umem.router.parser_wire import BodyKind, encode_bounds
from clearml_umem.router.schemas import (
    DEFAULT_MAX_MESSAGES,
    ChatSettings,
    CompletionRequest,
    PreparedBody,
    parse_body,
    parse_json,
    to_generation_request,
    validate_request,
    validate_settings,
)
from clearml_umem.router.sse import DONE, EventStreamResponse, chat_chunk, completion_chunk, event
from clearml_umem.router.status_page import status_page
from clearml_umem.router.triton_http import BODY_PATHS, TritonErrorShape, triton_routes
from clearml_umem.tiers import ALL_TIERS, Tier

OWNER = "clearml-umem"
T = TypeVar("T")


class BearerAuth:
    """Pure ASGI, not BaseHTTPMiddleware: that one buffers streams and hides client disconnects.

    Without an admin key, the API key guards every route (when set). With one, the admin
    routes (`/admin/...`: placing and evicting models) take the admin key only, and every
    other route takes either key; so inference clients cannot evict models.

    The status page's shell (`GET /` and `/ui`) is the one exception: a browser cannot send a
    Bearer header when it opens a URL, so the page is static HTML that carries no data, asks
    for the key and sends it with every request for data (`/admin/status`), which is guarded.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, admin_key: str | None = None) -> None:
        self.app = app
        self.keys = Keys(api_key, admin_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in PUBLIC_PATHS and scope.get("method") in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        if not self.keys.allows(Headers(scope=scope).get("authorization", ""), admin=path.startswith("/admin")):
            await unauthorized().response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


PUBLIC_PATHS = frozenset({"/", "/ui"})
"""The status page's shell: static HTML without data (see BearerAuth)."""

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
"""A request body limit: far above any context window's worth of text (128k tokens is about
0.5 MB), far below what would hold a model for seconds of tokenizing."""


INLINE_PARSE_BYTES = 64 * 2**10
"""Bodies up to this size are parsed on the event loop (well under a millisecond: a worker thread
would cost more than it saves); bigger ones are parsed and validated in a parser process
(`parser_pool.ParserPool`), then unpickled in the parser thread, so that a multi-megabyte body
never holds up other clients' streams."""


class _BigBodies:
    """One thread unpickles the big bodies a parser process prepared, validates what depends on the
    model and converts them, one at a time. Their shape is bounded by then (messages, JSON values),
    so each step is short; each holds the GIL, and with a thread per body several bodies starved the
    event loop (each loop pass waited its turn among five threads); with one, the loop waits at most
    one switch interval (5 ms) or one bounded step for it. Bodies waiting their turn hold only their bytes.

    The cyclic garbage collector is paused during each step: the objects a big body becomes would
    trigger full collections, each holding the GIL for a second in a process that holds a model's
    objects (a body makes no cycles: reference counting frees it)."""

    def __init__(self) -> None:
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="umem-parse")
        return self._executor

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        def without_collections() -> T:
            paused = gc.isenabled()
            gc.disable()
            try:
                return fn(*args)
            finally:
                if paused:
                    gc.enable()

        return await asyncio.get_running_loop().run_in_executor(self._pool(), without_collections)

    async def call(self, inline: bool, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the event loop for a small body, in the parser thread for a big one."""
        return fn(*args) if inline else await self.run(fn, *args)

    def free(self, value: object) -> None:
        """Let the parser thread drop the last reference to a big parsed body (freeing 200,000
        objects takes a quarter second, which the event loop would otherwise spend)."""
        self._pool().submit(lambda held=value: None)


def create_app(runtime: ServingRuntime, metrics: Metrics, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, admin_key: str | None = None,
               model_log: RouterModelLog | None = None, hosts: HostNames = DEFAULT_HOSTS,
               max_messages: int = DEFAULT_MAX_MESSAGES, drain: Drain | None = None, device: str = "",
               access_log: bool = True) -> FastAPI:
    app = FastAPI(title="clearml-unified-memory", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    drain = drain or Drain()
    app.state.drain = drain
    parsers = ParserPool()
    app.state.parsers = parsers
    readers = BodyReaders()
    app.state.body_readers = readers
    serve_options = _ServeOptions(max_body_bytes, max_messages, drain, _BigBodies(), parsers, readers,
                                  lambda outcome: metrics.big_bodies.labels(outcome).inc(), access_log)

    async def completions(request: Request) -> Response:
        return await _serve(runtime, request, chat=False, options=serve_options)

    async def chat_completions(request: Request) -> Response:
        return await _serve(runtime, request, chat=True, options=serve_options)

    # the last added runs first: HEAD becomes GET, then browsers are checked, then keys, then the
    # inference routes are answered
    routes = {"/v1/completions": completions, "/v1/chat/completions": chat_completions}
    assert set(routes) == INFERENCE_PATHS
    app.add_middleware(FastRoutes, routes=routes)
    if api_key or admin_key:
        app.add_middleware(BearerAuth, api_key=api_key, admin_key=admin_key)
    app.add_middleware(BrowserGuard, hosts=hosts, page_paths=PUBLIC_PATHS)
    app.add_middleware(HeadAsGet)
    app.add_middleware(TritonErrorShape)  # outermost of ours: it reshapes every /v2 error, the keys' too
    started = int(time.time())
    moves = MoveHistory(runtime.bus)

    def tiers_now() -> dict[str, str]:
        return {row["name"]: row["tier"] for row in runtime.admin_view()}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": len(runtime.model_names()), "memory": dict(runtime.memory())}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.set_model_tiers(tiers_now())
        return Response(metrics.render(), headers={"content-type": metrics.content_type})

    def model_card(name: str, tier: str | None) -> dict[str, Any]:
        spec = runtime.spec(name)
        return {"id": name, "object": "model", "created": started, "owned_by": OWNER, "tier": tier,
                "max_model_len": spec.context_length, "engine": spec.engine, "size_bytes": spec.size_bytes,
                "aliases": list(spec.aliases)}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        tiers = tiers_now()
        return {"object": "list", "data": [model_card(name, tiers.get(name)) for name in runtime.model_names()]}

    @app.get("/v1/models/{name:path}")
    async def retrieve_model(name: str) -> dict[str, Any]:
        model = resolve_model(runtime, name)
        if model is None:
            raise unknown_model(runtime, name)
        return model_card(model, tiers_now().get(model))

    async def parse_triton_body(request: Request, raw: Body, model: str) -> dict[str, Any]:
        bound = runtime.prompt_bounds().get(model)
        bounds = {model: bound} if bound is not None else {}
        return (await parse_request_body(request, raw, "triton", serve_options, bounds)).data

    async def read_triton_body(request: Request) -> Body:
        return await read_request_body(request, serve_options)

    app.include_router(triton_routes(runtime, read_triton_body, parse_triton_body))

    @app.get("/admin/models")
    async def admin_models() -> dict[str, Any]:
        return {"object": "list", "data": runtime.admin_view(), "memory": dict(runtime.memory()),
                "device": getattr(runtime, "device_kind", None)}

    @app.post("/admin/models/{name:path}/place")
    async def place(name: str, request: Request) -> dict[str, Any]:
        body = parse_json(await read_body(request, max_body_bytes))
        names = ", ".join(t.value for t in ALL_TIERS)
        raw = body.get("tier")
        if raw is None:
            raise bad_request(f"'tier' is required: one of {names}", param="tier")
        try:
            tier = Tier(str(raw).strip().lower())
        except ValueError:
            raise bad_request(f"Invalid value for 'tier': {raw!r}; expected one of {names}", param="tier") from None
        model = resolve_model(runtime, name)
        if model is None:
            raise unknown_model(runtime, name)
        name = model
        await runtime.place(name, tier)  # its errors say what they mean (router/errors.py maps them)
        row = next((r for r in runtime.admin_view() if r["name"] == name), None)
        if row is None:
            raise model_not_found(name)
        return row

    @app.get("/admin/models/{name:path}/logs")
    async def model_logs(name: str, offset: str | None = None) -> dict[str, Any]:
        start = _offset(offset)
        name = resolve_model(runtime, name) or name
        row = next((r for r in runtime.admin_view() if r["name"] == name), None)
        if row is None:
            raise model_not_found(name)
        log_file = (row.get("engine_details") or {}).get("log_file")
        if log_file:
            result = await asyncio.to_thread(read_log_file, Path(log_file), start)
        elif model_log is not None:
            result = model_log.read(name, start)
            result["note"] = (f"the {row['engine']} engine runs inside the router and has no log of its own: "
                              "these are the router's lines about this model")
        else:
            result = {"source": "none", "path": None, "offset": 0, "next_offset": 0, "text": "",
                      "note": f"the {row['engine']} engine has no log of its own and this router keeps none"}
        return {"object": "model.log", "model": name, **result}

    @app.get("/admin/status")
    async def status(after: str | None = None) -> dict[str, Any]:
        """Everything the status page shows, in one poll: models, memory, the last moves, TTFT per tier."""
        return {"object": "status", "models": runtime.admin_view(), "memory": dict(runtime.memory()),
                "device": getattr(runtime, "device_kind", None),
                "moves": moves.since(_offset(after, "after") or 0), "ttft_by_tier": metrics.ttft_by_tier()}

    @app.get("/status")
    async def router_status() -> dict[str, Any]:
        """What a fleet front needs to pick a router for a model: each model's tier and load, this
        router's device. Any key reads it (an inference client's too): it says nothing an admin hides."""
        models = [{"id": row["name"], "tier": row["tier"], "moving_to": row["moving_to"],
                   "in_flight": row["in_flight"], "waiting": row["waiting"]} for row in runtime.admin_view()]
        return {"object": "router.status", "device": device, "started": started, "models": models,
                "memory": dict(runtime.memory())}

    @app.get("/")
    @app.get("/ui")
    async def status_page_route() -> Response:
        return HTMLResponse(status_page(), headers={"cache-control": "no-store"})

    return app


def _offset(raw: str | None, param: str = "offset") -> int | None:
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()):  # "²".isdigit() is True, and int("²") raises
        raise bad_request(f"Invalid value for '{param}': {raw!r}; expected a whole number >= 0", param=param)
    return int(raw)


SERVED_FROM_HEADER = "x-umem-served-from"


def unknown_model(runtime: ServingRuntime, name: str) -> APIError:
    """A 503 with the reason for a catalog model whose engine could not be built (a missing
    dependency, say), so its client learns why; a 404 for a name the catalog does not have."""
    reason = getattr(runtime, "unservable", {}).get(name)
    if reason:
        return APIError(503, f"The model '{name}' is in the catalog but cannot be served: {reason}", UNAVAILABLE,
                        "model", "model_unavailable")
    return model_not_found(name)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to exceed `limit` (by its declared
    length, or while it streams in), so an oversized body is never held in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"The request body is {int(declared)} bytes; this server takes at most {limit}",
                       code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"The request body exceeds {limit} bytes, the most this server takes",
                               code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        cut_after = body_timed_out(request.scope)
        if cut_after is not None:  # answered 408 by the connection: raised for the handler's record
            raise body_timeout(cut_after) from None
        raise
    return b"".join(chunks)


async def read_handed_off(handoff: BodyHandoff, readers: BodyReaders) -> Body:
    """A body the connection left in its socket (`body_handoff.py`), read by the body reader process
    (`body_reader.py`); the connection reads its socket again once it has been."""
    if handoff.complete:
        handoff.release(False)
        return bytes(handoff.head[:handoff.length])
    handoff.taken = True
    try:
        return await readers.read(handoff)
    finally:
        handoff.release(True)


async def read_request_body(request: Request, options: _ServeOptions) -> Body:
    """An inference request's body: a big one as the body reader read it (counted, as each big
    body is, when it never reached a parser process), a small one from the connection. Raises
    ClientGone when the client left while its big body arrived."""
    handoff = handoff_of(request.scope)
    if handoff is None:
        return await read_body(request, options.max_body_bytes)
    try:
        return await read_handed_off(handoff, options.readers)
    except ClientGone:
        options.count_big_body("abandoned")
        raise
    except APIError as error:
        if error.status == 408:
            options.count_big_body("stalled")
        elif error.status >= 500:  # the body reader process failed
            options.count_big_body("failed")
        raise


INFERENCE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


def handoff_routes(max_body_bytes: int, read_timeout_s: float) -> HandoffRoutes:
    """The requests whose big bodies the connection leaves for the body reader (`body_handoff.py`):
    OpenAI's inference routes and Triton's (`triton_http.BODY_PATHS`)."""
    return HandoffRoutes(INFERENCE_PATHS, INLINE_PARSE_BYTES, max_body_bytes, read_timeout_s, BODY_PATHS)


async def parse_request_body(request: Request, raw: Body, kind: BodyKind, options: _ServeOptions,
                             bounds: Mapping[str, PromptBound]) -> PreparedBody:
    """A body as far as it goes without its model: a small one parsed on the event loop (its
    validation comes after the model's defaults); a big one parsed and validated as sent in a parser
    process, its prompt checked there against its model's context (`Runtime.prompt_bounds`), then
    unpickled in the parser thread. Raises the client's 4xx, a 503 when the parser processes are
    busy, or ClientGone when the client left while its body waited."""
    if isinstance(raw, bytes) and len(raw) <= INLINE_PARSE_BYTES:
        return PreparedBody(parse_body(raw, kind == "chat", options.max_messages))
    prepare = functools.partial(options.parsers.prepare, raw, kind, options.max_messages, encode_bounds(bounds))
    outcome = "abandoned"
    try:
        payload = await until_disconnect(request.receive, prepare)
        outcome = "prepared"
    except APIError as error:
        outcome = "refused" if error.status < 500 else "busy" if error.code == "server_busy" else "failed"
        raise
    finally:
        del prepare  # it holds the bytes, which are dropped once prepared
        options.count_big_body(outcome)
    prepared: PreparedBody = await options.big_bodies.run(pickle.loads, payload)
    return prepared


@dataclass(frozen=True)
class _ServeOptions:
    max_body_bytes: int
    max_messages: int
    drain: Drain
    big_bodies: _BigBodies
    parsers: ParserPool
    readers: BodyReaders
    count_big_body: Callable[[str], None]
    """Told each big body's outcome (`Metrics.big_bodies`)."""
    access_log: bool = True


async def _serve(runtime: ServingRuntime, request: Request, chat: bool, options: _ServeOptions) -> Response:
    """Answer one inference request and log its access line (a stream's when it ends)."""
    access = AccessRecord(request.method, request.url.path, enabled=options.access_log)
    try:
        response = await _answer(runtime, request, chat, options, access)
    except (APIError, ServingError) as exc:
        access.done(exc.status, note=exc.code or "")
        raise
    except ClientDisconnect:  # it hung up while its body arrived
        access.done(CLIENT_CLOSED, note="client left")
        raise
    except Exception:
        access.done(500, note="internal error")
        raise
    if response.status_code == CLIENT_CLOSED:
        access.done(CLIENT_CLOSED, note="client left")
    elif not isinstance(response, EventStreamResponse):
        access.done(response.status_code)
    return response


async def _answer(runtime: ServingRuntime, request: Request, chat: bool, options: _ServeOptions,
                  access: AccessRecord) -> Response:
    arrived = time.monotonic()
    try:
        raw = await read_request_body(request, options)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    inline = len(raw) <= INLINE_PARSE_BYTES
    big = options.big_bodies
    try:
        prepared = await parse_request_body(request, raw, "chat" if chat else "completion", options,
                                            runtime.prompt_bounds())
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    del raw
    data = prepared.data
    if isinstance(data.get("model"), str):
        access.model = data["model"]
    model = resolve_model(runtime, data.get("model"))
    if model is not None:
        access.model = model
        data = with_model_defaults({**data, "model": model}, runtime.spec(model))
    body: ChatSettings | CompletionRequest
    try:
        if prepared.messages is not None:
            body = validate_settings(data)  # the conversation was validated in a parser process
        else:
            body = await big.call(inline, validate_request, data, chat)
    except APIError:
        if not inline:
            big.free((data, prepared))
            del data, prepared
        raise
    if not runtime.has_model(body.model):
        name = body.model
        if not inline:
            big.free((data, body, prepared))
            del data, body, prepared
        raise unknown_model(runtime, name)
    spec = runtime.spec(body.model)
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    gen_request = await big.call(inline, to_generation_request, body, spec, prepared.messages)
    gen = Generation(runtime, body.model, gen_request, request_id, arrived, keep_alive=body.keep_alive, small=inline)
    access.generation = gen
    drain = options.drain
    created = int(time.time())
    if body.stream:
        try:
            await until_disconnect(request.receive, gen.open)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        return EventStreamResponse(_stream(gen, body.model, created, chat, body.include_usage, drain, access),
                                   headers=_served_from_header(gen))
    try:
        content = await until_disconnect(request.receive, lambda: _complete(gen, body.model, created, chat, drain))
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(content, headers=_served_from_header(gen))


def _served_from_header(gen: Generation) -> dict[str, str]:
    """Which tier the model was served from (gpu = it was hot): lets a client, or the
    clearml-serving hook, tell a swap-in's latency from a hot one's without reading /metrics."""
    return {SERVED_FROM_HEADER: gen.served_from.value} if gen.served_from is not None else {}


async def _complete(gen: Generation, model: str, created: int, chat: bool, drain: Drain) -> dict[str, Any]:
    await gen.open()
    ok = False
    pieces: list[str] = []
    calls = ToolCallJoin()
    entries: list[dict[str, Any]] | None = [] if gen.request.options.get("logprobs") is not None else None
    try:
        while (delta := await drain.within_grace(gen.next_delta)) is not None:
            gen.first_token()
            pieces.append(delta.text)
            if delta.tool_calls:
                calls.add(delta.tool_calls)
            if delta.logprobs and entries is not None:
                entries.extend(delta.logprobs)
        ok = True
    except GraceOver as exc:
        raise exc.error from None
    finally:
        await gen.close(ok)
    text = "".join(pieces)
    finish = gen.finish_reason or "stop"
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": chat_message(text, calls.calls()),
                                  "logprobs": chat_logprobs(entries), "finish_reason": finish}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None if entries is None else completion_logprobs(entries),
                  "finish_reason": finish}
        kind = "text_completion"
    return {"id": gen.request_id, "object": kind, "created": created, "model": model, "system_fingerprint": None,
            "choices": [choice], "usage": gen.usage()}


async def _stream(gen: Generation, model: str, created: int, chat: bool,
                  include_usage: bool, drain: Drain, access: AccessRecord) -> AsyncGenerator[bytes, None]:
    """OpenAI's chunk sequence: (chat: a role chunk), content or tool-call chunks, a finish chunk,
    (usage), [DONE]."""
    rid = gen.request_id
    offset = 0

    def piece(delta: Delta | None, finish: str | None = None) -> bytes:
        nonlocal offset
        text = delta.text if delta is not None else ""
        entries = delta.logprobs if delta is not None else None
        if chat:
            fields: dict[str, Any] = {"content": text} if text else {}
            if delta is not None and delta.tool_calls:
                fields["tool_calls"] = delta.tool_calls
            return event(chat_chunk(rid, created, model, fields, finish, include_usage=include_usage,
                                    logprobs=chat_logprobs(entries) if entries else None))
        logprobs = completion_logprobs(entries, offset) if entries else None
        offset += len(text)
        return event(completion_chunk(rid, created, model, text, finish, include_usage=include_usage,
                                      logprobs=logprobs))

    ok = False
    note = "client left mid-stream"
    # Events ready together leave in one write: the role chunk with the first piece, the finish
    # chunk with usage and [DONE]. Each write is a send and a wake-up of the client; on a busy
    # machine each costs a hot first token about a millisecond.
    head = event(chat_chunk(rid, created, model, {"role": "assistant", "content": ""},
                            include_usage=include_usage)) if chat else b""
    try:
        while (delta := await drain.within_grace(gen.next_delta)) is not None:
            if delta.text or delta.tool_calls or delta.logprobs:
                gen.first_token()
                yield head + piece(delta)
                head = b""
        gen.first_token()
        tail = [head, piece(None, gen.finish_reason or "stop")]
        if include_usage:
            usage = gen.usage()
            maker = chat_chunk if chat else completion_chunk
            tail.append(event(maker(rid, created, model, None, include_usage=True, usage_value=usage)))
        ok = True
        note = ""
        yield b"".join([*tail, DONE])
    except (APIError, GraceOver) as exc:
        error = exc.error if isinstance(exc, GraceOver) else exc
        note = f"failed mid-stream: {error.message[:200]}"
        yield head + event(error.body()) + DONE
    finally:
        await gen.close(ok)
        access.done(200, note=note)
