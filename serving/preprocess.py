"""clearml-serving engine hook: an endpoint whose requests the unified-memory routers serve.

clearml-serving uploads this file as an endpoint's code and loads it in its inference
container (engine `custom_async`); each request is forwarded to a router, which keeps many
LLMs on one GPU and swaps them in on demand. With several routers (one per GPU: a fleet), each
request goes to a router where its model already is: hot, else in RAM, else on disk, else the
least loaded; a router that cannot be reached is skipped before anything was sent to it. The
routing is the package's own (`clearml_umem.fleet`, the same code as `clearml-umem front`), so
the inference container installs the package without extras, which brings nothing its image
lacks (`CLEARML_EXTRA_PYTHON_PACKAGES=clearml-unified-memory`). Requests go out on one
asynchronous HTTP client per event loop, with no cap of its own on concurrent generations.

Two ways in, both answered here:
- `POST /serve/<endpoint>` (every clearml-serving release): the body is OpenAI's,
  `{"messages": [...]}` for a chat completion or `{"prompt": ...}` for a completion; one JSON
  answer, no streaming (that route returns one body).
- `/serve/openai/v1/chat/completions`, `/v1/completions`, `/v1/models` (clearml-serving's
  main branch, which calls `v1_chat_completions`... on the endpoint's engine object): OpenAI's
  API as-is, streaming included, so an OpenAI client can use clearml-serving as its base URL.
  clearml-serving finds the endpoint by the body's `model`, so name each endpoint after the
  model it serves. Its `custom_async` engine object does not pass these calls on to endpoint
  code, so loading this file adds the three pass-through methods to it (only where absent).
  main's own `/v1/models` route requires a JSON body naming a model, which an OpenAI client's
  `models.list()` does not send; once this file is loaded in that process, a `GET` of
  `/serve/openai/v1/models` without a body lists every model the routers serve.

The model: on `/serve/<endpoint>` the body's `model`, else the endpoint's `--aux-config
model=...`, else the endpoint's name; on `/serve/openai/...`, where the body's `model` chose
the endpoint, the endpoint's `--aux-config model=...`, else the body's `model`. A model no
running router serves is a 503 naming it, in OpenAI's error shape.

Settings (environment of the inference container):
- `UMEM_ROUTER_URL`: the router's base URL, or several, comma-separated (default http://127.0.0.1:8000).
- `UMEM_FLEET_PROJECT` (and `UMEM_FLEET_TAGS`): instead, the routers of the running serve tasks
  of this ClearML project (tagged so), read through the ClearML SDK.
- `UMEM_FLEET_PROBE_SECONDS`: how often the routers' status is read (default 2).
- `UMEM_API_KEY`: the routers' API key, if they have one.
- `UMEM_ROUTER_TIMEOUT_S`: seconds to wait for an answer (default 600: a cold start of a big
  model takes minutes).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

import httpx

from clearml_umem.fleet.choose import models_served
from clearml_umem.fleet.discovery import ClearMLRouters, StaticRouters
from clearml_umem.fleet.probe import DEFAULT_PROBE_S, Discover, Fleet
from clearml_umem.fleet.relay import NoRouter, RouterGone, Sent, error_body, send

DEFAULT_ROUTER_URL = "http://127.0.0.1:8000"
SERVED_FROM_HEADER = "x-umem-served-from"
StatsFn = Callable[[dict], None] | None

OPENAI_ROUTES = {"v1_chat_completions": "/v1/chat/completions", "v1_completions": "/v1/completions",
                 "v1_models": "/v1/models"}
"""The engine-object methods clearml-serving's `/serve/openai/...` route calls, and the router path of each."""

RESTART_TRIGGERS = ("CUDA out of memory. ", "NVML_SUCCESS == r INTERNAL ASSERT FAILED")
"""Text that makes clearml-serving kill its inference process when an exception carries it:
a router's answer (a model that ran out of device memory, say) must never pass it on."""


def _defused(text: str) -> str:
    for trigger in RESTART_TRIGGERS:
        text = text.replace(trigger, trigger.replace(" ", "\u00a0", 1))
    return text


def _parsed(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _refusal(model: str, status: int, raw: str) -> Exception:
    """The router's refusal as clearml-serving reports it: ValueError (a 422, the request is
    wrong) for a 4xx, RuntimeError for the rest; never with text that restarts the service."""
    answer = _parsed(raw)
    error = answer.get("error") if isinstance(answer, dict) else None
    message = error.get("message") if isinstance(error, dict) else raw[:500]
    text = _defused(f"model {model!r}: the router answered {status}: {message}")
    return (ValueError if 400 <= status < 500 else RuntimeError)(text)


def _not_served(exc: NoRouter) -> Any:
    """A 503 naming the model, in OpenAI's error shape: clearml-serving returns a response object as it is."""
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(_defused(str(exc)), 503, param="model", code="model_not_served"), status_code=503)


class Settings(NamedTuple):
    """The forwarder's settings, read from its environment and checked. A NamedTuple, not a
    dataclass: clearml-serving loads this file without registering it as a module, which
    dataclasses need."""

    discover: Discover
    where: str
    timeout_s: float
    probe_s: float
    key: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    @classmethod
    def from_env(cls, env: Any = None) -> Settings:
        env = os.environ if env is None else env
        project = (env.get("UMEM_FLEET_PROJECT") or "").strip()
        discover: Discover
        if project:
            tags = tuple(t.strip() for t in (env.get("UMEM_FLEET_TAGS") or "").split(",") if t.strip())
            discover = ClearMLRouters(project, tags)
            where = discover.describe()
        else:
            raw = env.get("UMEM_ROUTER_URL", DEFAULT_ROUTER_URL)
            try:
                discover = StaticRouters.parse(raw)
            except ValueError as exc:
                raise ValueError(f"UMEM_ROUTER_URL must be an http(s) URL or a comma-separated list of them, "
                                 f"got {raw!r}: {exc}") from None
            where = ", ".join(discover.urls)
        return cls(discover, where, _seconds(env, "UMEM_ROUTER_TIMEOUT_S", 600.0),
                   _seconds(env, "UMEM_FLEET_PROBE_SECONDS", DEFAULT_PROBE_S),
                   env.get("UMEM_API_KEY") or None)


def _seconds(env: Any, name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


_fleets: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Settings, tuple[httpx.AsyncClient, Fleet]]] = (
    weakref.WeakKeyDictionary())


def _fleet(settings: Settings) -> tuple[httpx.AsyncClient, Fleet]:
    """One client and one fleet view per event loop and settings: every endpoint of the process shares them.

    No pool cap: the router bounds its own queues (a 429 past them); a cap here would hold requests
    the router could take."""
    per_loop = _fleets.setdefault(asyncio.get_running_loop(), {})
    if settings not in per_loop:
        client = httpx.AsyncClient(timeout=httpx.Timeout(settings.timeout_s, connect=min(5.0, settings.timeout_s)),
                                   limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
                                   trust_env=False)
        fleet = Fleet(settings.discover, client, probe_s=settings.probe_s,
                      probe_timeout_s=min(2.0, settings.timeout_s), headers=settings.headers)
        fleet.start()
        per_loop[settings] = (client, fleet)
    return per_loop[settings]


class Preprocess:
    """Instantiated once per endpoint by clearml-serving, which then sets `model_endpoint`."""

    model_endpoint: Any = None

    def __init__(self) -> None:
        self.settings = Settings.from_env()
        self.timeout_s = self.settings.timeout_s
        self.router_url = self.settings.where

    def _configured_model(self) -> str | None:
        """The endpoint's `--aux-config model=...`, if it names one."""
        aux = getattr(self.model_endpoint, "auxiliary_cfg", None)
        return str(aux["model"]) if isinstance(aux, dict) and aux.get("model") else None

    def model_for(self, data: dict[str, Any]) -> str:
        if data.get("model"):
            return str(data["model"])
        if configured := self._configured_model():
            return configured
        serving_url = str(getattr(self.model_endpoint, "serving_url", "") or "")
        name = serving_url.strip("/").split("/")[-1]
        if not name:
            raise ValueError("the request names no model, and the endpoint gives none")
        return name

    def request_for(self, data: Any) -> tuple[str, dict[str, Any]]:
        """The router path and body for one `/serve/<endpoint>` request; ValueError (a 422) when unusable."""
        if not isinstance(data, dict):
            raise ValueError("the request body must be a JSON object (OpenAI chat or completion fields)")
        if data.get("stream"):
            raise ValueError("streaming is not available through /serve/<endpoint>, which returns one JSON body; "
                             "use /serve/openai/v1/... (clearml-serving main) or the router itself")
        body = {**data, "model": self.model_for(data), "stream": False}
        if "messages" in data:
            return "/v1/chat/completions", body
        if "prompt" in data:
            return "/v1/completions", body
        raise ValueError("the request needs 'messages' (a chat completion) or 'prompt' (a completion)")

    async def _send(self, path: str, model: str, body: dict[str, Any]) -> Sent:
        client, fleet = _fleet(self.settings)
        try:
            return await send(fleet, client, "POST", path, model, body, self.settings.headers)
        except RouterGone as exc:
            raise RuntimeError(_defused(str(exc))) from exc
        except NoRouter as exc:
            if exc.none_up:
                gone = "; ".join(f"{url} did not answer ({why})" for url, why in exc.down.items())
                raise RuntimeError(_defused(f"no unified-memory router is up for model {model!r}: "
                                            f"{gone or 'none found at ' + self.router_url}")) from exc
            raise

    async def _answer(self, path: str, body: dict[str, Any], state: dict, stats: StatsFn) -> Any:
        try:
            sent = await self._send(path, body["model"], body)
        except NoRouter as exc:
            return _not_served(exc)
        try:
            raw = (await sent.body()).decode("utf-8", "replace")
        except RouterGone as exc:
            raise RuntimeError(_defused(str(exc))) from exc
        if sent.response.status_code != 200:
            raise _refusal(body["model"], sent.response.status_code, raw)
        answer = _parsed(raw)
        served_from = sent.response.headers.get(SERVED_FROM_HEADER)
        state["umem_served_from"] = served_from
        usage = (answer.get("usage") if isinstance(answer, dict) else None) or {}
        self._report(stats, {"umem_served_from": served_from,
                             "umem_prompt_tokens": usage.get("prompt_tokens"),
                             "umem_completion_tokens": usage.get("completion_tokens")})
        return answer

    @staticmethod
    def _report(stats: StatsFn, values: dict[str, Any]) -> None:
        """Only known values: clearml-serving's statistics service fails on a None for a number."""
        if stats is not None:
            stats({key: value for key, value in values.items() if value is not None})

    async def process(self, data: Any, state: dict, collect_custom_statistics_fn: StatsFn = None) -> Any:
        """`POST /serve/<endpoint>`: one JSON answer."""
        path, body = self.request_for(data)
        return await self._answer(path, body, state, collect_custom_statistics_fn)

    async def _openai_body(self, data: Any) -> dict[str, Any]:
        """The client's JSON body. clearml-serving main hands over `{"request": <its parsed vLLM
        request>, "raw_request": <the FastAPI request>}`; the raw body is what the client sent,
        without the fields vLLM's parser adds, so it is what the router gets."""
        if isinstance(data, dict) and "raw_request" in data:
            try:
                body = await data["raw_request"].json()
            except ValueError:
                raise ValueError("the request body must be a JSON object") from None
        elif isinstance(data, dict) and hasattr(data.get("request"), "model_dump"):
            body = data["request"].model_dump(exclude_unset=True)
        else:
            body = data
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        # on this route the body's model named the endpoint: the endpoint's own setting wins
        return {**body, "model": self._configured_model() or self.model_for(body)}

    async def _openai(self, route: str, data: Any, state: dict, stats: StatsFn) -> Any:
        body = await self._openai_body(data)
        if body.get("stream"):
            return await self._stream(OPENAI_ROUTES[route], body, state, stats)
        return await self._answer(OPENAI_ROUTES[route], body, state, stats)

    async def v1_chat_completions(self, data: Any, state: dict, collect_custom_statistics_fn: StatsFn = None) -> Any:
        return await self._openai("v1_chat_completions", data, state, collect_custom_statistics_fn)

    async def v1_completions(self, data: Any, state: dict, collect_custom_statistics_fn: StatsFn = None) -> Any:
        return await self._openai("v1_completions", data, state, collect_custom_statistics_fn)

    async def v1_models(self, data: Any, state: dict, collect_custom_statistics_fn: StatsFn = None) -> Any:
        """The model this endpoint serves, as the routers list it: clearml-serving reaches one
        endpoint per request, so it lists that endpoint's model, not every router's catalog."""
        model = (await self._openai_body(data))["model"]
        listed = [entry for entry in (await models_list(self.settings))["data"] if entry["id"] == model]
        if not listed:
            raise ValueError(f"model {model!r} is not served by any running router ({self.router_url})")
        return {"object": "list", "data": listed}

    async def _stream(self, path: str, body: dict[str, Any], state: dict, stats: StatsFn) -> Any:
        """The router's event stream, passed through as it arrives. A refusal comes before the
        first byte, so it is still an error status; a client that leaves closes the router
        connection, which cancels the generation there; a router that dies part-way ends the
        stream with an error event in OpenAI's shape."""
        from fastapi.responses import StreamingResponse

        class EventStream(StreamingResponse):
            """clearml-serving main reads `keys()` of an answer to collect the endpoint's
            configured metrics: an event stream has none."""

            def keys(self) -> tuple[str, ...]:
                return ()

        try:
            sent = await self._send(path, body["model"], body)
        except NoRouter as exc:
            return _not_served(exc)
        if sent.response.status_code != 200:
            try:
                raw = (await sent.body()).decode("utf-8", "replace")
            except RouterGone as exc:
                raise RuntimeError(_defused(str(exc))) from exc
            raise _refusal(body["model"], sent.response.status_code, raw)
        served_from = sent.response.headers.get(SERVED_FROM_HEADER)
        state["umem_served_from"] = served_from
        self._report(stats, {"umem_served_from": served_from})

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in sent.chunks():
                    yield chunk
            except RouterGone as exc:
                yield b"data: " + json.dumps(error_body(_defused(str(exc)), 502, code="router_gone")).encode() + b"\n\n"

        headers = {SERVED_FROM_HEADER: served_from} if served_from else None
        return EventStream(relay(), media_type="text/event-stream", headers=headers)


async def models_list(settings: Settings) -> dict[str, Any]:
    """Every model a running router serves, as OpenAI lists models (with its best tier and routers)."""
    _, fleet = _fleet(settings)
    await fleet.ready()
    views = fleet.views()
    data = [{"id": name, "object": "model", "owned_by": "clearml-umem", "routers": urls}
            for name, urls in models_served(views).items()]
    return {"object": "list", "data": data}


def _list_models_without_a_body() -> None:
    """Answer `GET /serve/openai/v1/models` with no body, as an OpenAI client's `models.list()` sends it.

    clearml-serving main declares that route with a required JSON body naming a model (its
    request model), so the client's request fails validation before any endpoint code runs. When
    this file is loaded inside that service (its `clearml_serving.serving.main` module holds the
    FastAPI `app`), a body-less GET route for the list is put ahead of main's. Elsewhere, nothing."""
    main = sys.modules.get("clearml_serving.serving.main")
    app = getattr(main, "app", None)
    if app is None or getattr(app.state, "umem_models_route", False):
        return
    from fastapi.routing import APIRoute

    prefix = "/" + os.environ.get("CLEARML_DEFAULT_SERVE_SUFFIX", "serve").strip("/")
    settings = Settings.from_env()

    async def list_models() -> Any:
        return await models_list(settings)

    route = APIRoute(prefix + "/openai/v1/models", list_models, methods=["GET"])
    app.router.routes.insert(0, route)
    app.state.umem_models_route = True


def _pass_openai_routes_through() -> None:
    """Give clearml-serving's `custom_async` engine object the methods its OpenAI route calls.

    That route looks the method up on the engine object (`getattr(processor, "v1_...")`), and
    `custom_async` hands only `preprocess`/`process`/`postprocess` to endpoint code; each added
    method hands its call to the same method here. Outside clearml-serving this does nothing."""
    try:
        from clearml_serving.serving.preprocess_service import CustomAsyncPreprocessRequest
    except ImportError:
        return

    def pass_through(route: str) -> Callable[..., Any]:
        async def call(self: Any, data: Any, state: dict, collect_custom_statistics_fn: StatsFn = None) -> Any:
            method = getattr(self._preprocess, route, None)
            if method is None:
                raise ValueError(f"this endpoint's code does not answer {OPENAI_ROUTES[route]}")
            return await method(data, state, collect_custom_statistics_fn)

        call.__name__ = route
        return call

    for route in OPENAI_ROUTES:
        if not hasattr(CustomAsyncPreprocessRequest, route):
            setattr(CustomAsyncPreprocessRequest, route, pass_through(route))


_pass_openai_routes_through()
_list_models_without_a_body()
