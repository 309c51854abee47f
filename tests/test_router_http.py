"""The HTTP layer alone: the real app under real uvicorn on loopback, the official openai client,
and an in-test FAKE runtime and engine (no model, no scheduler) so that each wire-format rule,
error and disconnect path is checked quickly and deterministically. The real runtime with
real models is covered by tests/test_router_integration.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from starlette.testclient import TestClient

from clearml_umem.engines.base import Delta, EngineError, Footprint, GenerationRequest, InvalidRequest
from clearml_umem.engines.prompt_check import PromptBound
from clearml_umem.events import Event, EventBus, FirstToken, MoveFinished, RequestArrived, RequestFinished
from clearml_umem.log_setup import UVICORN_LOGGING
from clearml_umem.metrics import Metrics
from clearml_umem.router.app import create_app
from clearml_umem.runtime import Lease, ModelNotFound, Rejected
from clearml_umem.scheduler import PlacementRefused
from clearml_umem.spec import ModelSpec
from clearml_umem.tiers import ALL_TIERS, Tier
from tests.waiting import wait_until

CHAT = [{"role": "user", "content": "hello"}]
KEY = "s3cret-key"


class FakeEngine:
    """Answers 'w0 w1 w2 ...' one word per delta; prompts containing trigger words make it fail."""

    def __init__(self, spec: ModelSpec, delay_s: float = 0.0, tiers: frozenset[Tier] = frozenset(ALL_TIERS)) -> None:
        self.spec = spec
        self.delay_s = delay_s
        self._tiers = tiers
        self.started = 0
        self.closed = 0
        self.finished_normally = 0
        self.last_request: GenerationRequest | None = None

    @property
    def tiers(self) -> frozenset[Tier]:
        return self._tiers

    def footprint(self, tier: Tier) -> Footprint:
        return Footprint()

    def describe(self) -> dict[str, Any]:
        return {"engine": "fake", "delay_s": self.delay_s}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self.started += 1
        self.last_request = request
        text = request.prompt if request.prompt is not None else " ".join(m["content"] for m in request.messages or [])
        prompt_tokens = len(text.split())
        try:
            if "RAISE_INVALID" in text:
                raise InvalidRequest("the prompt is too long for this model's context")
            if "RAISE_ENGINE" in text:
                raise EngineError("the engine process died")
            if "RAISE_BUG" in text:
                raise KeyError("/secret/path/api-key-1234")
            produced = ""
            for i in range(request.max_tokens):
                word = f"w{i}"
                if word in request.stop:
                    yield Delta("", "stop", prompt_tokens, i)
                    self.finished_normally += 1
                    return
                if "BREAK_MIDWAY" in text and i == 2:
                    raise EngineError("lost the GPU mid-answer")
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                piece = word if i == 0 else " " + word
                produced += piece
                if i == request.max_tokens - 1:
                    yield Delta(piece, "length", prompt_tokens, i + 1)
                else:
                    yield Delta(piece)
            self.finished_normally += 1
        finally:
            self.closed += 1


class FakeRuntime:
    """The runtime contract (lease/place/admin_view/...) over dicts; a non-GPU model "swaps in" by sleeping."""

    def __init__(self, engines: dict[str, FakeEngine], swap_s: float = 0.01) -> None:
        self.bus = EventBus()
        self.engines = engines
        self.tiers = {name: Tier.COLD for name in engines}
        self.swap_s = dict.fromkeys(engines, swap_s)
        self.in_flight = dict.fromkeys(engines, 0)
        self.uses = dict.fromkeys(engines, 0)
        self.reject: dict[str, str] = {}
        self.cancelled_waits = 0
        self.keep_alives: list[float | None] = []
        self.bounds: dict[str, PromptBound] = {}

    def has_model(self, name: str) -> bool:
        return name in self.engines

    def spec(self, name: str) -> ModelSpec:
        if name not in self.engines:
            raise ModelNotFound(name)
        return self.engines[name].spec

    def model_names(self) -> list[str]:
        return sorted(self.engines)

    def prompt_bounds(self) -> dict[str, PromptBound]:
        return dict(self.bounds)

    async def check_request(self, model: str, request: GenerationRequest, small: bool = False) -> None:
        if model not in self.engines:
            raise ModelNotFound(model)

    @asynccontextmanager
    async def lease(self, model: str, request_id: str, keep_alive: float | None = None) -> AsyncIterator[Lease]:
        if model not in self.engines:
            raise ModelNotFound(model)
        arrived = time.monotonic()
        self.keep_alives.append(keep_alive)
        tier = self.tiers[model]
        self.bus.emit(RequestArrived(model=model, t=arrived, request_id=request_id, tier=tier))
        if model in self.reject:
            raise Rejected(503, self.reject[model])
        if tier is not Tier.GPU:
            try:
                await asyncio.sleep(self.swap_s[model])
            except asyncio.CancelledError:
                self.cancelled_waits += 1
                raise
            self.tiers[model] = Tier.GPU
            self.bus.emit(MoveFinished(model=model, t=time.monotonic(), src=tier, dst=Tier.GPU,
                                             seconds=self.swap_s[model], bytes_moved=1_000_000))
        self.in_flight[model] += 1
        self.uses[model] += 1
        try:
            yield Lease(self.engines[model], tier, arrived)
        finally:
            self.in_flight[model] -= 1

    async def place(self, model: str, tier: Tier) -> None:
        if model not in self.engines:
            raise ModelNotFound(model)
        if tier not in self.engines[model].tiers:
            raise PlacementRefused(f"model {model!r} cannot be put in tier {tier.value!r}")
        self.tiers[model] = tier

    def admin_view(self) -> list[dict[str, Any]]:
        return [{"name": n, "tier": self.tiers[n].value, "moving_to": None, "in_flight": self.in_flight[n],
                 "waiting": 0, "size_bytes": e.spec.size_bytes, "last_used": None, "uses": self.uses[n],
                 "engine": e.spec.engine, "engine_details": e.describe()} for n, e in sorted(self.engines.items())]

    def memory(self) -> dict[str, int]:
        return {"device_budget": 100, "device_used": 10, "host_budget": 1000, "host_used": 20}


def _spec(name: str) -> ModelSpec:
    return ModelSpec(name=name, weights="/nonexistent", size_bytes=1234, architecture="Fake", engine="transformers",
                     context_length=64)


class Served:
    def __init__(self, url: str, runtime: FakeRuntime, events: list[Event]) -> None:
        self.url = url
        self.runtime = runtime
        self.events = events

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=30)


def _serve(runtime: FakeRuntime, api_key: str | None, admin_key: str | None = None) -> Iterator[Served]:
    events: list[Event] = []
    runtime.bus.subscribe(events.append)
    app = create_app(runtime, Metrics(runtime.bus), api_key, admin_key=admin_key)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, **UVICORN_LOGGING, lifespan="off"))  # type: ignore[arg-type]
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        assert thread.is_alive(), "uvicorn thread died"
        time.sleep(0.01)
    try:
        yield Served(f"http://127.0.0.1:{port}", runtime, events)
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def _runtime() -> FakeRuntime:
    return FakeRuntime({
        "alpha": FakeEngine(_spec("alpha")),
        "beta": FakeEngine(_spec("beta"), tiers=frozenset({Tier.GPU, Tier.COLD})),
        "slow": FakeEngine(_spec("slow"), delay_s=0.05),
    })


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    yield from _serve(_runtime(), None)


@pytest.fixture(scope="module")
def keyed() -> Iterator[Served]:
    yield from _serve(_runtime(), KEY)


ADMIN_KEY = "adm1n-key"


@pytest.fixture(scope="module")
def admin_keyed() -> Iterator[Served]:
    yield from _serve(_runtime(), KEY, ADMIN_KEY)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name) + 1:line.index("}")]))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


# -- the happy paths, through the official client -------------------------------------------


def test_models_list(served: Served) -> None:
    models = served.client().models.list().data
    assert [m.id for m in models] == ["alpha", "beta", "slow"]
    assert all(m.owned_by == "clearml-umem" and m.object == "model" for m in models)
    raw = httpx.get(served.url + "/v1/models").json()
    assert raw["object"] == "list"
    assert {m["tier"] for m in raw["data"]} <= {t.value for t in ALL_TIERS}
    assert served.client().models.retrieve("alpha").id == "alpha"
    with pytest.raises(openai.NotFoundError):
        served.client().models.retrieve("nope")


def test_chat_non_streaming_and_streaming_agree(served: Served) -> None:
    client = served.client()
    out = client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=4, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "w0 w1 w2 w3"
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (1, 4, 5)

    chunks = list(client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == out.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


def test_responses_name_the_tier_the_model_was_served_from(served: Served) -> None:
    client = served.client()
    served.runtime.tiers["alpha"] = Tier.RAM
    raw = client.chat.completions.with_raw_response.create(model="alpha", messages=CHAT, max_tokens=2)
    assert raw.headers["x-umem-served-from"] == "ram" and raw.parse().choices[0].message.content
    raw = client.completions.with_raw_response.create(model="alpha", prompt="hi", max_tokens=2, stream=True)
    assert raw.headers["x-umem-served-from"] == "gpu"
    assert "".join(c.choices[0].text for c in raw.parse() if c.choices)


def test_stream_without_usage_has_no_usage_chunk(served: Served) -> None:
    chunks = list(served.client().chat.completions.create(model="alpha", messages=CHAT, max_tokens=2, stream=True))
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_raw_sse_wire_format(served: Served) -> None:
    body = {"model": "alpha", "prompt": "x", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert [p["choices"][0]["text"] for p in payloads] == ["w0", " w1", ""]
    assert [p["choices"][0]["finish_reason"] for p in payloads] == [None, None, "length"]
    assert all(p["object"] == "text_completion" for p in payloads)


def test_completions_non_streaming_and_streaming(served: Served) -> None:
    client = served.client()
    out = client.completions.create(model="alpha", prompt="once upon a time", max_tokens=3)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.choices[0].text == "w0 w1 w2"
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.prompt_tokens == 4 and out.usage.completion_tokens == 3

    chunks = list(client.completions.create(model="alpha", prompt=["once upon a time"], max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "w0 w1 w2"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 7


def test_stop_and_sampling_reach_the_engine(served: Served) -> None:
    client = served.client()
    out = client.completions.create(model="alpha", prompt="p", max_tokens=10, stop=["w2"], temperature=0.5,
                                    top_p=0.9, seed=7, user="someone")
    assert out.choices[0].text == "w0 w1"
    assert out.choices[0].finish_reason == "stop"
    req = served.runtime.engines["alpha"].last_request
    assert req is not None and req.stop == ["w2"] and req.temperature == 0.5 and req.top_p == 0.9 and req.seed == 7
    chat = client.chat.completions.create(model="alpha", messages=CHAT, max_completion_tokens=10, stop="w1")
    assert chat.choices[0].message.content == "w0" and chat.choices[0].finish_reason == "stop"


def test_chat_content_parts_and_defaults(served: Served) -> None:
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    resp = httpx.post(served.url + "/v1/chat/completions", json={"model": "alpha", "messages": messages,
                                                                 "unknown_field": {"ignored": True}}, timeout=30)
    assert resp.status_code == 200, resp.text
    req = served.runtime.engines["alpha"].last_request
    assert req is not None and req.messages == [{"role": "system", "content": "be brief"},
                                                 {"role": "user", "content": "a\nb"}]
    assert req.max_tokens == 32, "without max_tokens a chat gets half the context (64) at most"


def test_requests_emit_ttft_and_finished_events(served: Served) -> None:
    served.runtime.tiers["beta"] = Tier.COLD
    start = len(served.events)
    served.client().chat.completions.create(model="beta", messages=CHAT, max_tokens=2)
    assert wait_until(lambda: any(isinstance(e, RequestFinished) and e.model == "beta"
                                for e in served.events[start:]))
    new = served.events[start:]
    ttft = [e for e in new if isinstance(e, FirstToken)]
    assert len(ttft) == 1 and ttft[0].model == "beta" and ttft[0].served_from is Tier.COLD
    assert ttft[0].ttft_s >= served.runtime.swap_s["beta"], "TTFT counts the wait for the model"
    finished = [e for e in new if isinstance(e, RequestFinished)]
    assert finished[0].ok and finished[0].completion_tokens == 2 and finished[0].request_id == ttft[0].request_id


def test_metrics_show_ttft_and_request_series(served: Served) -> None:
    client = served.client()
    served.runtime.tiers["alpha"] = Tier.RAM
    client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=1)
    list(client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=1, stream=True))
    resp = httpx.get(served.url + "/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert metric(text, "umem_ttft_seconds_count", model="alpha", tier="ram") >= 1
    assert metric(text, "umem_ttft_seconds_count", model="alpha", tier="gpu") >= 1
    assert metric(text, "umem_requests_total", model="alpha", tier="ram", result="miss") >= 1
    assert metric(text, "umem_requests_total", model="alpha", tier="gpu", result="hit") >= 1
    assert metric(text, "umem_requests_finished_total", model="alpha", ok="true") >= 2
    assert metric(text, "umem_move_seconds_count", model="alpha", direction="in") >= 1
    assert metric(text, "umem_model_tier", model="alpha", tier="gpu") == 1
    assert metric(text, "umem_model_tier", model="slow") == 1, "every model has exactly one current tier"


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "needle"),
    [
        ("/v1/chat/completions", b"{not json", 400, None, "json"),
        ("/v1/chat/completions", b"[1, 2]", 400, None, "object"),
        ("/v1/chat/completions", b'{"model": "ghost", "messages": [{"role": "user", "content": "hi"}]}', 404,
         "model", "ghost"),
        ("/v1/chat/completions", b'{"model": "alpha"}', 400, "messages", "required"),
        ("/v1/chat/completions", b'{"model": "alpha", "messages": []}', 400, "messages", "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "model", "model"),
        ("/v1/chat/completions", b'{"model": "alpha", "messages": [{"role": "wizard", "content": "hi"}]}', 400,
         "messages.0.role", "role"),
        ("/v1/chat/completions",
         b'{"model": "alpha", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400,
         "messages.0.content", "image_url"),
        ("/v1/chat/completions", b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], '
         b'"max_tokens": 100000000}', 400, "max_tokens", "context length"),
        ("/v1/chat/completions", b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], '
         b'"max_tokens": 0}', 400, "max_tokens", "max_tokens"),
        ("/v1/chat/completions", b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], '
         b'"max_completion_tokens": 65}', 400, "max_completion_tokens", "context length"),
        ("/v1/chat/completions", b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], '
         b'"n": 2}', 400, "n", "n=1"),
        ("/v1/chat/completions", b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], '
         b'"temperature": 7}', 400, "temperature", "temperature"),
        ("/v1/completions", b'{"model": "alpha", "prompt": ["a", "b"]}', 400, "prompt", "one prompt"),
        ("/v1/completions", b'{"model": "alpha", "prompt": [1, 2, 3]}', 400, "prompt", "token ids"),
        ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "max_tokens": -3}', 400, "max_tokens",
         "max_tokens"),
        ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "stream": "yes"}', 400, "stream", "boolean"),
        ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "logit_bias": "z"}', 400, "logit_bias",
         "dictionary"),
        ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "logit_bias": {"a": 1}}', 400, "logit_bias",
         "token ids"),
        ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "logit_bias": {"5": 300}}', 400, "logit_bias",
         "-100 and 100"),
        ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "frequency_penalty": "a"}', 400,
         "frequency_penalty", "number"),
        ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "presence_penalty": 3}', 400, "presence_penalty",
         "less than or equal to 2"),
        ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "max_tokens": "5"}', 400, "max_tokens", "integer"),
        ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "max_tokens": true}', 400, "max_tokens",
         "integer"),
        ("/v1/completions", b'{"model": "alpha", "prompt": "RAISE_INVALID"}', 400, None, "context"),
        ("/v1/completions", b'{"model": "alpha", "prompt": "RAISE_ENGINE", "stream": true}', 503, None,
         "reference"),
        ("/v1/nothing-here", b"{}", 404, None, "route"),
        ("/v1/completions", b'{"model": "alpha", "prompt": "hi", '
         b'"tools": [{"type": "function", "function": {"name": "f"}}]}', 400, "tools", "not supported"),
        ("/v1/chat/completions", b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], '
         b'"response_format": {"type": "xml"}}', 400, "response_format.type", "json_schema"),
        ("/v1/chat/completions", b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], '
         b'"top_logprobs": 2}', 400, "top_logprobs", "needs 'logprobs'"),
        ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "logprobs": 6}', 400, "logprobs", "0 to 5"),
        ("/v1/chat/completions", b'{"model": "alpha", "messages": [{"role": "tool", "content": "hi"}]}', 400,
         "messages.0.tool_call_id", "required"),
        ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "echo": true}', 400, "echo", "leave it unset"),
        ("/v1/chat/completions", b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], '
         b'"tool_choice": "required"}', 400, "tool_choice", "no 'tools'"),
        ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "best_of": 3}', 400, "best_of", "not supported"),
        # hostile bodies: 400s naming the field, never a 5xx that SDKs would retry
        ("/v1/chat/completions", b'{"model": "alpha", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400, None,
         "nested"),
        ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "seed": 18446744073709551616}', 400, "seed", "seed"),
        ("/v1/completions", b'{"model": "alpha", "prompt": "hi", "seed": -9223372036854775809}', 400, "seed", "seed"),
        ("/v1/chat/completions", b'{"model": "alpha", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
         400, "messages.0.content", "unicode"),
        ("/v1/completions", b'{"model": "alpha", "prompt": ["\\udfff"]}', 400, "prompt.0", "unicode"),
        ("/admin/models/alpha/place", b'{"tier": "\\ud800"}', 400, "tier", "unicode"),
    ],
)
def test_bad_input_gets_openai_errors_and_server_keeps_serving(served: Served, path: str, body: bytes, status: int,
                                                               param: str | None, needle: str) -> None:
    resp = httpx.post(served.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle in error["message"].lower(), error
    assert error["type"]
    if param is not None:
        assert error["param"] == param, error
    if status == 404 and param == "model":
        assert error["code"] == "model_not_found"
    assert served.client().chat.completions.create(model="alpha", messages=CHAT, max_tokens=1).choices
    assert all(n == 0 for n in served.runtime.in_flight.values()), "an error must not keep a lease"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_inference_routes_take_post_only(served: Served, path: str) -> None:
    """They are answered before FastAPI's routing (router/fast_routes.py), which would say the same."""
    for method in ("GET", "PUT", "DELETE"):
        resp = httpx.request(method, served.url + path, timeout=30)
        assert resp.status_code == 405 and resp.headers["allow"] == "POST", (method, resp.text)
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.head(served.url + path, timeout=30).status_code == 405


def test_tiny_temperatures_sample_greedily(served: Served) -> None:
    """1e-39 would overflow the logits into NaNs: like vLLM, anything under 1e-5 is greedy."""
    served.client().completions.create(model="alpha", prompt="p", max_tokens=2, temperature=1e-39)
    req = served.runtime.engines["alpha"].last_request
    assert req is not None and req.temperature == 0.0


def test_oversized_body_is_refused_before_it_is_read(served: Served) -> None:
    big = b'{"model": "alpha", "prompt": "' + b"x" * (9 * 2**20) + b'"}'
    with httpx.Client(timeout=30) as client:
        resp = client.post(served.url + "/v1/completions", content=big, headers={"content-type": "application/json"})
        assert resp.status_code == 413, resp.text
        assert resp.json()["error"]["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no content-length: refused while it streams in
            yield b'{"model": "alpha", "prompt": "'
            for _ in range(10):
                yield b"x" * 2**20
            yield b'"}'

        resp = client.post(served.url + "/v1/completions", content=chunks(),
                           headers={"content-type": "application/json"})
        assert resp.status_code == 413, resp.text
    assert served.client().completions.create(model="alpha", prompt="p", max_tokens=1).choices


def test_a_bug_answers_500_without_internal_text(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("ERROR"):
        resp = httpx.post(served.url + "/v1/completions", json={"model": "alpha", "prompt": "RAISE_BUG"}, timeout=30)
    assert resp.status_code == 500
    message = resp.json()["error"]["message"]
    assert "secret" not in message and "KeyError" not in message and "reference" in message
    reference = message.split("reference ")[1].split(")")[0]
    assert any(reference in r.getMessage() for r in caplog.records), "the log has the reference and the details"


def test_hostile_body_keeps_the_connection(served: Served) -> None:
    """A 400 for a deep body on a kept-alive connection: the next request goes over the same one."""
    with httpx.Client(timeout=30) as client:
        deep = b'{"model": "alpha", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        first = client.post(served.url + "/v1/chat/completions", content=deep,
                            headers={"content-type": "application/json"})
        assert first.status_code == 400
        second = client.post(served.url + "/v1/completions", json={"model": "alpha", "prompt": "p", "max_tokens": 1})
        assert second.status_code == 200
        assert second.extensions["network_stream"] is first.extensions["network_stream"], "same connection"


def test_openai_client_raises_typed_errors(served: Served) -> None:
    client = served.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="ghost", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model="alpha", messages=CHAT, n=2)
    with pytest.raises(openai.InternalServerError, match="reference") as raised:
        client.completions.create(model="alpha", prompt="RAISE_ENGINE")
    assert "died" not in str(raised.value)  # the engine's own words go to the log only


def test_rejection_by_the_scheduler_is_a_503_with_the_reason(served: Served) -> None:
    served.runtime.reject["beta"] = "model 'beta' needs 90 GB on the device, the budget is 80 GB"
    try:
        resp = httpx.post(served.url + "/v1/chat/completions", json={"model": "beta", "messages": CHAT}, timeout=30)
        assert resp.status_code == 503
        assert "needs 90 GB" in resp.json()["error"]["message"]
    finally:
        del served.runtime.reject["beta"]


def test_engine_failure_mid_stream_ends_the_stream_with_an_error(served: Served,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(openai.APIError, match="reference ([0-9a-f]+)") as raised:
        list(served.client().completions.create(model="alpha", prompt="BREAK_MIDWAY", max_tokens=8, stream=True))
    reference = re.search("reference ([0-9a-f]+)", str(raised.value)).group(1)  # type: ignore[union-attr]
    assert "lost the GPU" not in str(raised.value)
    assert any(reference in r.getMessage() and "lost the GPU" in r.getMessage() for r in caplog.records)
    assert wait_until(lambda: served.runtime.in_flight["alpha"] == 0)


# -- disconnects ----------------------------------------------------------------------------


def test_client_disconnect_mid_stream_closes_the_generator_and_releases_the_lease(served: Served) -> None:
    engine = served.runtime.engines["slow"]
    started, closed, normal = engine.started, engine.closed, engine.finished_normally
    start = len(served.events)
    body = {"model": "slow", "messages": CHAT, "max_tokens": 60, "stream": True}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data: ") and '"content":"w' in line.replace(" ", ""):
                seen += 1
            if seen == 2:
                break
        assert served.runtime.in_flight["slow"] == 1
    # 60 tokens at 50 ms would take 3 s; the generator must be closed long before that.
    assert wait_until(lambda: engine.closed == closed + 1, timeout=2.0), "the engine's generator was not closed"
    assert engine.started == started + 1 and engine.finished_normally == normal
    assert wait_until(lambda: served.runtime.in_flight["slow"] == 0, timeout=2.0), "the lease was not released"
    assert wait_until(lambda: any(isinstance(e, RequestFinished) and e.model == "slow" and not e.ok
                                for e in served.events[start:]))
    assert served.client().chat.completions.create(model="slow", messages=CHAT, max_tokens=1).choices


def test_client_disconnect_while_waiting_for_the_model_cancels_the_wait(served: Served) -> None:
    runtime = served.runtime
    runtime.tiers["slow"] = Tier.DISK
    runtime.swap_s["slow"] = 30.0
    before = runtime.cancelled_waits
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served.url + "/v1/chat/completions", json={"model": "slow", "messages": CHAT}, timeout=0.3)
        assert wait_until(lambda: runtime.cancelled_waits == before + 1, timeout=3.0)
        assert runtime.in_flight["slow"] == 0
    finally:
        runtime.swap_s["slow"] = 0.01


# -- admin, health, auth --------------------------------------------------------------------


def test_admin_view_and_place(served: Served) -> None:
    data = httpx.get(served.url + "/admin/models").json()
    rows = {r["name"]: r for r in data["data"]}
    assert set(rows) == {"alpha", "beta", "slow"}
    assert {"tier", "moving_to", "in_flight", "waiting", "size_bytes", "last_used", "uses", "engine",
            "engine_details"} <= set(rows["alpha"])
    assert data["memory"]["device_budget"] == 100

    resp = httpx.post(served.url + "/admin/models/alpha/place", json={"tier": "ram"}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["tier"] == "ram" and resp.json()["name"] == "alpha"
    resp = httpx.post(served.url + "/admin/models/beta/place", json={"tier": "ram"}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "tier"
    resp = httpx.post(served.url + "/admin/models/alpha/place", json={"tier": "warp"}, timeout=30)
    assert resp.status_code == 400 and "warp" in resp.json()["error"]["message"]
    resp = httpx.post(served.url + "/admin/models/ghost/place", json={"tier": "gpu"}, timeout=30)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    resp = httpx.post(served.url + "/admin/models/alpha/place", content=b"nope", timeout=30)
    assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_media_type"
    resp = httpx.post(served.url + "/admin/models/alpha/place", content=b"nope",
                      headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == 400


def test_health(served: Served) -> None:
    resp = httpx.get(served.url + "/health")
    assert resp.status_code == 200 and resp.json()["status"] == "ok" and resp.json()["models"] == 3


def test_unused_openai_options_at_their_defaults_pass(served: Served) -> None:
    """Clients that always send these fields, at values that ask for nothing, keep working."""
    out = served.client().chat.completions.create(
        model="alpha", messages=CHAT, max_tokens=2, logprobs=False, frequency_penalty=0, presence_penalty=0.0,
        response_format={"type": "text"}, tool_choice="auto", tools=[], logit_bias={})
    assert out.choices[0].message.content
    comp = served.client().completions.create(model="alpha", prompt="hi", max_tokens=2, echo=False, best_of=1,
                                              logprobs=None, suffix=None)
    assert comp.choices[0].text


def test_api_options_reach_every_engine_as_sent() -> None:
    """Penalties, logit_bias, tools and logprobs reach vLLM and transformers models alike (each
    engine honours them: docs/tools-and-structured-output.md); defaults are not passed at all."""
    vllm_engine = FakeEngine(dataclasses.replace(_spec("vee"), engine="vllm"))
    local = FakeEngine(_spec("alpha"))
    serving = _serve(FakeRuntime({"vee": vllm_engine, "alpha": local}), None)
    served = next(serving)
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    try:
        client = served.client()
        for name, engine in (("vee", vllm_engine), ("alpha", local)):
            out = client.completions.create(model=name, prompt="hi", max_tokens=2, presence_penalty=0.5,
                                            frequency_penalty=0, logit_bias={"7": -100}, logprobs=0)
            assert out.choices[0].text
            assert engine.last_request is not None
            assert engine.last_request.options == {"presence_penalty": 0.5, "logit_bias": {"7": -100}, "logprobs": 0}
            client.chat.completions.create(model=name, messages=CHAT, max_tokens=2, tools=[tool],
                                           tool_choice="required", logprobs=True, top_logprobs=2,
                                           response_format={"type": "json_object"})
            assert engine.last_request.options == {"tools": [tool], "tool_choice": "required", "logprobs": True,
                                                   "top_logprobs": 2, "response_format": {"type": "json_object"}}
            client.chat.completions.create(model=name, messages=CHAT, max_tokens=2, tools=[tool], tool_choice="none")
            assert engine.last_request.options == {}, "tool_choice none: the tools are not offered"
    finally:
        serving.close()


def test_openai_client_gets_a_bad_request_for_a_tool_choice_naming_no_tool(served: Served) -> None:
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as info:
        served.client().chat.completions.create(model="alpha", messages=CHAT, max_tokens=2, tools=[tool],
                                                tool_choice={"type": "function", "function": {"name": "other"}})
    assert info.value.param == "tool_choice.function.name" and "lookup" in info.value.message


@pytest.mark.parametrize("path", ["/health", "/metrics", "/admin/models", "/v1/models", "/no-such-route"])
def test_api_key_guards_every_route(keyed: Served, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        resp = httpx.get(keyed.url + path, headers=headers)
        assert resp.status_code == 401, (path, headers)
        assert resp.json()["error"]["code"] == "invalid_api_key"
    resp = httpx.get(keyed.url + path, headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == (404 if path == "/no-such-route" else 200)


def test_api_key_with_the_openai_client(keyed: Served) -> None:
    with pytest.raises(openai.AuthenticationError):
        keyed.client("wrong").chat.completions.create(model="alpha", messages=CHAT, max_tokens=1)
    assert keyed.client(KEY).chat.completions.create(model="alpha", messages=CHAT, max_tokens=1).choices
    resp = httpx.post(keyed.url + "/admin/models/alpha/place", json={"tier": "gpu"})
    assert resp.status_code == 401


def test_with_an_admin_key_inference_keys_cannot_evict(admin_keyed: Served) -> None:
    def call(method: str, path: str, key: str | None) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, admin_keyed.url + path, headers=headers, timeout=30,
                             json={"tier": "ram"} if method == "POST" else None).status_code

    assert call("POST", "/admin/models/alpha/place", KEY) == 401, "the API key does not place models"
    assert call("GET", "/admin/models", KEY) == 401
    assert call("POST", "/admin/models/alpha/place", None) == 401
    assert call("POST", "/admin/models/alpha/place", ADMIN_KEY) == 200
    assert call("GET", "/v1/models", KEY) == 200 and call("GET", "/v1/models", ADMIN_KEY) == 200
    assert call("GET", "/v1/models", "wrong") == 401
    assert admin_keyed.client(KEY).chat.completions.create(model="alpha", messages=CHAT, max_tokens=1).choices


def test_admin_key_is_read_from_the_environment_only() -> None:
    from clearml_umem.config import ServeConfig, parse_serve_args

    cfg = parse_serve_args(["--manifest", __file__], env={"UMEM_ADMIN_KEY": "adm-zz9", "UMEM_API_KEY": "api-zz8"})
    assert (cfg.admin_key, cfg.api_key) == ("adm-zz9", "api-zz8")
    assert "admin_key" not in cfg.public_dict() and "zz9" not in repr(cfg) and "zz8" not in repr(cfg)
    assert ServeConfig.from_mapping({"admin_key": "leak"}, env={}).admin_key is None


def test_a_client_that_leaves_during_its_body_costs_nothing_and_logs_no_error(
        served: Served, caplog: pytest.LogCaptureFixture, access_lines: AccessLines) -> None:
    """Half a body, then the connection closes: no 500, no 'internal error' in the log (the access
    line says the client left), still serving."""
    port = int(served.url.rsplit(":", 1)[1])
    with caplog.at_level("DEBUG"):
        for path in ("/v1/completions", "/admin/models/alpha/place"):
            conn = socket.create_connection(("127.0.0.1", port))
            conn.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         "Content-Length: 500\r\n\r\n{\"model\":".encode())
            conn.close()
        assert wait_until(lambda: sum("client left during its request body" in r.getMessage()
                                      for r in caplog.records) == 2, 10)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]
    left = wait_for_line(access_lines, "POST /v1/completions model=- ")
    assert "status=499 " in left and "note='client left'" in left, left
    assert served.client().completions.create(model="alpha", prompt="p", max_tokens=1).choices


class AccessLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def access_lines() -> Iterator[AccessLines]:
    handler = AccessLines()
    logger = logging.getLogger("clearml_umem.access")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def wait_for_line(handler: AccessLines, needle: str) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = [line for line in handler.lines if needle in line]
        if found:
            return found[-1]
        time.sleep(0.02)
    raise AssertionError(f"no access line with {needle!r} in {handler.lines}")


def test_one_access_line_per_request_with_tier_status_ttft_tokens_and_duration(served: Served,
                                                                               access_lines: AccessLines) -> None:
    client = served.client()
    client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "one two three"}], max_tokens=4,
                                   extra_body={"keep_alive": "5m"})
    assert served.runtime.keep_alives[-1] == 300.0, "a request's keep_alive reaches the runtime, in seconds"
    line = wait_for_line(access_lines, "model=alpha ")
    assert line.startswith("POST /v1/chat/completions model=alpha status=200 from=")
    fields = dict(part.split("=", 1) for part in line.split()[2:])
    assert fields["from"] in ("gpu", "ram", "disk", "cold") and fields["tokens_in"] == "3"
    assert fields["ttft"].endswith("s") and float(fields["ttft"][:-1]) >= 0
    assert int(fields["tokens_out"]) >= 1 and float(fields["duration"][:-1]) >= float(fields["ttft"][:-1])

    stream = client.completions.create(model="alpha", prompt="a b", max_tokens=3, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices)
    streamed = wait_for_line(access_lines, "POST /v1/completions model=alpha ")
    assert "status=200 from=" in streamed and "tokens_in=2" in streamed

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    refused = wait_for_line(access_lines, "model=nope ")
    assert "status=404" in refused and "from=- ttft=-" in refused
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"keep_alive": "soon"})
    assert bad.value.body["param"] == "keep_alive"  # type: ignore[index]
    assert "status=400" in wait_for_line(access_lines, "status=400")


def test_the_access_log_can_be_turned_off(access_lines: AccessLines) -> None:
    body = {"model": "alpha", "messages": [{"role": "user", "content": "x"}]}
    for enabled in (True, False):
        access_lines.lines.clear()
        runtime = _runtime()
        app = create_app(runtime, Metrics(runtime.bus), None, access_log=enabled)
        with TestClient(app, base_url="http://localhost") as client:
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        assert len(access_lines.lines) == (1 if enabled else 0), access_lines.lines
