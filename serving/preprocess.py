"""clearml-serving engine hook: an endpoint whose requests the unified-memory router serves.

clearml-serving uploads this file as an endpoint's code and loads it in its inference
container (engine `custom_async`); each request POSTed to `/serve/<endpoint>` is forwarded
to the router, which keeps many LLMs on one GPU and swaps them in on demand. The file is
self-contained on purpose (standard library and `requests`, which the clearml SDK always
brings): the inference container does not need clearml-unified-memory installed, only to
reach the router.

Request bodies are OpenAI's: `{"messages": [...]}` for a chat completion or `{"prompt": ...}`
for a completion, with the usual fields (`max_tokens`, `temperature`, `stop`...). The model
is the body's `model`, else the endpoint's `--aux-config model=...`, else the endpoint's name.
The answer is the router's JSON. Streaming is refused: clearml-serving returns one JSON body.

Settings (environment of the inference container):
- `UMEM_ROUTER_URL`: the router's base URL (default http://127.0.0.1:8000).
- `UMEM_API_KEY`: the router's API key, if it has one.
- `UMEM_ROUTER_TIMEOUT_S`: seconds to wait for an answer (default 600: a cold start of a big
  model takes minutes).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Any

import requests

DEFAULT_ROUTER_URL = "http://127.0.0.1:8000"
SERVED_FROM_HEADER = "x-umem-served-from"


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

    def model_for(self, data: dict[str, Any]) -> str:
        if data.get("model"):
            return str(data["model"])
        endpoint = self.model_endpoint
        aux = getattr(endpoint, "auxiliary_cfg", None)
        if isinstance(aux, dict) and aux.get("model"):
            return str(aux["model"])
        serving_url = str(getattr(endpoint, "serving_url", "") or "")
        name = serving_url.strip("/").split("/")[-1]
        if not name:
            raise ValueError("the request names no model, and the endpoint gives none")
        return name

    def request_for(self, data: Any) -> tuple[str, dict[str, Any]]:
        """The router path and body for one clearml-serving request; ValueError (a 422) when unusable."""
        if not isinstance(data, dict):
            raise ValueError("the request body must be a JSON object (OpenAI chat or completion fields)")
        if data.get("stream"):
            raise ValueError("streaming is not available through clearml-serving, which returns one JSON body; "
                             "send stream requests to the router itself")
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

    def _post(self, path: str, body: dict[str, Any]) -> requests.Response:
        try:
            return self._session().post(self.router_url + path, json=body, headers=self._headers,
                                        timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise RuntimeError(f"the unified-memory router at {self.router_url} did not answer: {exc}") from exc

    async def process(self, data: Any, state: dict, collect_custom_statistics_fn: Callable[[dict], None] | None = None
                      ) -> Any:
        path, body = self.request_for(data)
        resp = await asyncio.to_thread(self._post, path, body)
        try:
            answer = resp.json()
        except ValueError:
            answer = None
        if resp.status_code != 200:
            error = answer.get("error") if isinstance(answer, dict) else None
            message = error.get("message") if isinstance(error, dict) else resp.text[:500]
            text = f"model {body['model']!r}: the router answered {resp.status_code}: {message}"
            # clearml-serving turns ValueError into a 422 (the request is wrong) and the rest into a 500
            raise (ValueError if 400 <= resp.status_code < 500 else RuntimeError)(text)
        served_from = resp.headers.get(SERVED_FROM_HEADER)
        state["umem_served_from"] = served_from
        if collect_custom_statistics_fn is not None:
            usage = (answer.get("usage") if isinstance(answer, dict) else None) or {}
            collect_custom_statistics_fn({"umem_served_from": served_from,
                                          "umem_prompt_tokens": usage.get("prompt_tokens"),
                                          "umem_completion_tokens": usage.get("completion_tokens")})
        return answer
