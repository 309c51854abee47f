"""clearml-serving engine hook: an endpoint whose requests the unified-memory router serves.

clearml-serving uploads this file as an endpoint's code and loads it in its inference
container (engine `custom_async`); each request is forwarded to the router, which keeps many
LLMs on one GPU and swaps them in on demand. The file is self-contained on purpose (standard
library and `requests`, which the clearml SDK always brings; FastAPI for streaming, which the
inference container runs on): the container does not need clearml-unified-memory installed,
only to reach the router.

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

The model: on `/serve/<endpoint>` the body's `model`, else the endpoint's `--aux-config
model=...`, else the endpoint's name; on `/serve/openai/...`, where the body's `model` chose
the endpoint, the endpoint's `--aux-config model=...`, else the body's `model`.

Settings (environment of the inference container):
- `UMEM_ROUTER_URL`: the router's base URL (default http://127.0.0.1:8000).
- `UMEM_API_KEY`: the router's API key, if it has one.
- `UMEM_ROUTER_TIMEOUT_S`: seconds to wait for an answer (default 600: a cold start of a big
  model takes minutes).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import requests

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


class Preprocess:
    """Instantiated once per endpoint by clearml-serving, which then sets `model_endpoint`."""

    model_endpoint: Any = None

    def __init__(self) -> None:
        url = os.environ.get("UMEM_ROUTER_URL", DEFAULT_ROUTER_URL).strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"UMEM_ROUTER_URL must be an http(s) URL, got {url!r}")
        timeout = os.environ.get("UMEM_ROUTER_TIMEOUT_S", "600")
        try:
            self.timeout_s = float(timeout)
        except ValueError:
            raise ValueError(f"UMEM_ROUTER_TIMEOUT_S must be a number of seconds, got {timeout!r}") from None
        if self.timeout_s <= 0:
            raise ValueError(f"UMEM_ROUTER_TIMEOUT_S must be positive, got {timeout!r}")
        self.router_url = url
        key = os.environ.get("UMEM_API_KEY")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._local = threading.local()

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

    def _session(self) -> requests.Session:
        """One kept-alive session per worker thread: a requests.Session is not safe to share."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.trust_env = False
        return session

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, stream: bool = False
              ) -> requests.Response:
        try:
            return self._session().request(method, self.router_url + path, json=body, headers=self._headers,
                                           timeout=self.timeout_s, stream=stream)
        except requests.RequestException as exc:
            raise RuntimeError(_defused(f"the unified-memory router at {self.router_url} did not answer: {exc}")
                               ) from exc

    async def _answer(self, path: str, body: dict[str, Any], state: dict, stats: StatsFn) -> Any:
        resp = await asyncio.to_thread(self._call, "POST", path, body)
        if resp.status_code != 200:
            raise _refusal(body["model"], resp.status_code, resp.text)
        answer = _parsed(resp.text)
        served_from = resp.headers.get(SERVED_FROM_HEADER)
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
        """The model this endpoint serves, as the router lists it: clearml-serving reaches one
        endpoint per request, so it lists that endpoint's model, not the router's whole catalog."""
        model = (await self._openai_body(data))["model"]
        resp = await asyncio.to_thread(self._call, "GET", OPENAI_ROUTES["v1_models"])
        if resp.status_code != 200:
            raise _refusal(model, resp.status_code, resp.text)
        answer = _parsed(resp.text)
        listed = [entry for entry in answer.get("data", []) if entry.get("id") == model]
        if not listed:
            raise ValueError(f"model {model!r} is not served by the router at {self.router_url}")
        return {"object": "list", "data": listed}

    async def _stream(self, path: str, body: dict[str, Any], state: dict, stats: StatsFn) -> Any:
        """The router's event stream, passed through as it arrives. A refusal comes before the
        first byte, so it is still an error status; a client that leaves closes the router
        connection, which cancels the generation there."""
        from fastapi.responses import StreamingResponse

        class EventStream(StreamingResponse):
            """clearml-serving main reads `keys()` of an answer to collect the endpoint's
            configured metrics: an event stream has none."""

            def keys(self) -> tuple[str, ...]:
                return ()

        resp = await asyncio.to_thread(self._call, "POST", path, body, True)
        if resp.status_code != 200:
            try:
                raw = await asyncio.to_thread(lambda: resp.text)
            finally:
                resp.close()
            raise _refusal(body["model"], resp.status_code, raw)
        served_from = resp.headers.get(SERVED_FROM_HEADER)
        state["umem_served_from"] = served_from
        self._report(stats, {"umem_served_from": served_from})

        async def relay() -> AsyncIterator[bytes]:
            chunks = resp.iter_content(chunk_size=None)
            try:
                while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                    yield chunk
            finally:
                resp.close()

        headers = {SERVED_FROM_HEADER: served_from} if served_from else None
        return EventStream(relay(), media_type="text/event-stream", headers=headers)


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
