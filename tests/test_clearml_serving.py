"""The clearml-serving path: serving/preprocess.py in front of a real router on loopback,
loaded and called by clearml-serving's own request processor (offline ClearML SDK)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from clearml_umem.catalog import write_manifest
from clearml_umem.spec import spec_from_mapping
from tests.clearml_env import REPO, offline_env, run_python
from tests.routerproc import RouterProcess, start_room_for_one, start_router

pytestmark = pytest.mark.slow

PREPROCESS = REPO / "serving" / "preprocess.py"
CHAT = [{"role": "user", "content": "Tell me about tiers."}]


@pytest.fixture(scope="module")
def router(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    proc, _ = start_room_for_one(tiny_models, tmp_path_factory.mktemp("serving-router"))
    yield proc
    proc.kill()


def load_preprocess(monkeypatch: pytest.MonkeyPatch, **env: str) -> ModuleType:
    for key in ("UMEM_ROUTER_URL", "UMEM_API_KEY", "UMEM_ROUTER_TIMEOUT_S"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location("umem_serving_preprocess", PREPROCESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clearml_serving_processor_forwards_to_the_router(router: RouterProcess, tmp_path: Path) -> None:
    env = offline_env(tmp_path, UMEM_ROUTER_URL=router.url)
    proc = run_python(["tests/clearml_serving_run.py", str(PREPROCESS)], env, timeout=600)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out: dict[str, Any] = json.loads(line[len("RESULT "):])

    first = out["chat_by_endpoint_name"]["answer"]
    assert first["object"] == "chat.completion" and first["model"] == "tiny-llama"
    assert first["choices"][0]["message"]["content"] and first["usage"]["completion_tokens"] > 0
    assert out["chat_again"]["answer"]["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    for label in ("completion_by_body_model", "completion_by_aux_config"):
        answer = out[label]["answer"]
        assert answer["object"] == "text_completion" and answer["model"] == "tiny-qwen2", label
        assert answer["choices"][0]["finish_reason"] in ("length", "stop")

    assert out["stream"]["error"] == "ValueError" and "streaming" in out["stream"]["message"]
    not_served = out["unknown_model"]["response"]
    assert not_served["status"] == 503, "a model no running router serves is a 503 naming it"
    assert "no-such-model" in not_served["body"]["error"]["message"]
    assert not_served["body"]["error"]["code"] == "model_not_served"
    assert out["neither_prompt_nor_messages"]["error"] == "ValueError"
    assert out["unknown_endpoint"]["error"] == "EndpointNotFoundException"

    openai = out["openai"]
    chat = openai["chat"]["answer"]
    assert chat["object"] == "chat.completion" and chat["model"] == "tiny-llama"
    assert chat["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert openai["chat"]["stats"]["umem_served_from"] in ("cold", "ram", "disk", "gpu")
    streamed = openai["chat_stream"]
    assert streamed["media_type"] == "text/event-stream" and streamed["keys"] == []
    assert streamed["headers"]["x-umem-served-from"] in ("cold", "ram", "disk", "gpu")
    assert sse_text(streamed["stream"], "chat") == chat["choices"][0]["message"]["content"]
    completion = openai["completion"]["answer"]
    assert completion["object"] == "text_completion" and completion["model"] == "tiny-qwen2", \
        "the endpoint's aux-config names the model"
    assert sse_text(openai["completion_stream"]["stream"], "completion") == completion["choices"][0]["text"]
    assert [m["id"] for m in openai["models"]["answer"]["data"]] == ["tiny-llama"]
    for label in ("bad_field", "bad_field_stream"):
        assert openai[label]["error"] == "ValueError", label
        assert "400" in openai[label]["message"] and "max_tokens" in openai[label]["message"], label


def sse_text(stream: str, kind: str) -> str:
    """The text of an OpenAI event stream, which must end with [DONE]."""
    events = [line[len("data: "):] for line in stream.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", stream[-200:]
    key = "content" if kind == "chat" else "text"
    parts = []
    for data in events[:-1]:
        choice = json.loads(data)["choices"][0]
        piece = (choice.get("delta") or {}).get(key) if kind == "chat" else choice.get(key)
        parts.append(piece or "")
    return "".join(parts)


def test_a_router_refusal_cannot_restart_clearml_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """clearml-serving kills its inference process when an exception's text holds one of these."""
    module = load_preprocess(monkeypatch)
    for status, error in ((503, RuntimeError), (500, RuntimeError), (400, ValueError)):
        for trigger in module.RESTART_TRIGGERS:
            answer = {"error": {"message": f"engine failed: {trigger}Tried to allocate 2.00 GiB"}}
            exc = module._refusal("m", status, json.dumps(answer))
            assert type(exc) is error
            assert trigger not in str(exc) and "Tried to allocate 2.00 GiB" in str(exc)


def test_preprocess_reports_the_tier_and_tokens(router: RouterProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_preprocess(monkeypatch, UMEM_ROUTER_URL=router.url + "/")
    pre = module.Preprocess()
    pre.model_endpoint = SimpleNamespace(serving_url="tiny-mistral", auxiliary_cfg=None)
    stats: dict[str, Any] = {}
    state: dict[str, Any] = {}
    answer = asyncio.run(pre.process({"messages": CHAT, "max_tokens": 3}, state, stats.update))
    assert answer["model"] == "tiny-mistral" and answer["choices"][0]["message"]["content"]
    assert stats["umem_served_from"] in ("cold", "ram", "disk", "gpu")
    assert state["umem_served_from"] == stats["umem_served_from"]
    assert stats["umem_completion_tokens"] == answer["usage"]["completion_tokens"] > 0
    asyncio.run(pre.process({"messages": CHAT, "max_tokens": 3}, state, stats.update))
    assert stats["umem_served_from"] == "gpu", "asked again at once, the model is hot"


def test_preprocess_settings_are_checked_when_the_endpoint_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="UMEM_ROUTER_URL"):
        load_preprocess(monkeypatch, UMEM_ROUTER_URL="127.0.0.1:8000").Preprocess()
    with pytest.raises(ValueError, match="UMEM_ROUTER_TIMEOUT_S"):
        load_preprocess(monkeypatch, UMEM_ROUTER_TIMEOUT_S="soon").Preprocess()
    with pytest.raises(ValueError, match="names no model"):
        load_preprocess(monkeypatch).Preprocess().request_for({"prompt": "hi"})


def test_router_down_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pre = load_preprocess(monkeypatch, UMEM_ROUTER_URL=f"http://127.0.0.1:{port}").Preprocess()
    with pytest.raises(RuntimeError, match=f"127.0.0.1:{port} did not answer"):
        asyncio.run(pre.process({"model": "m", "prompt": "hi"}, {}))


def test_router_api_key_is_sent(tiny_models: dict[str, Path], tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    spec = spec_from_mapping({"name": "tiny-llama", "weights": str(tiny_models["tiny-llama"])})
    manifest = tmp_path / "one.yaml"
    write_manifest(manifest, [spec])
    keyed = start_router(manifest, tmp_path, "--device", "cpu", "--device-budget", "1GB", "--host-budget", "1GB",
                         env={"UMEM_API_KEY": "sekrit"})
    try:
        body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}
        without = load_preprocess(monkeypatch, UMEM_ROUTER_URL=keyed.url).Preprocess()
        with pytest.raises(RuntimeError, match="401.*UMEM_API_KEY"):
            asyncio.run(without.process(body, {}))
        with_key = load_preprocess(monkeypatch, UMEM_ROUTER_URL=keyed.url, UMEM_API_KEY="sekrit").Preprocess()
        assert asyncio.run(with_key.process(body, {}))["choices"][0]["text"] is not None
    finally:
        keyed.kill()
