"""GGUF models through the real router, served by a real llama-server, asked with the real openai client.

Two tiny GGUF models (f16 and q8_0, written locally) with room for one on the device: every
switch is a swap, and placements visit the disk and cold tiers. Greedy answers must be
bit-identical after every round trip. Engines and the router are killed with SIGKILL: no
llama-server may outlive them.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import openai
import pytest

from clearml_umem.catalog import write_manifest
from clearml_umem.demo import room_for_one
from clearml_umem.engines import EngineContext
from clearml_umem.engines.resident_file import cached_bytes
from clearml_umem.spec import ModelSpec, spec_from_mapping
from clearml_umem.tinygguf import DEMO_GGUF, ensure_tiny_gguf
from tests import openai_tools_checks as checks
from tests.llamacpp_env import needs_llama_server, server_env
from tests.routerproc import RouterProcess, start_router
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, needs_llama_server]

CHAT = [{"role": "user", "content": "Tell me about the tier of a model."}]


def _start(specs: list[ModelSpec], work: Path) -> RouterProcess:
    manifest = work / "models.yaml"
    work.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest, specs)
    device_budget, host_budget, _ = room_for_one(specs, EngineContext(work_dir=work, device="cpu"))
    return start_router(manifest, work, "--device", "cpu", "--device-budget", str(device_budget),
                        "--host-budget", str(host_budget), env=server_env())


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_tiny_gguf(tmp_path_factory.mktemp("gguf"), DEMO_GGUF)


@pytest.fixture(scope="module")
def served(ggufs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    specs = [spec_from_mapping({"name": n, "weights": str(p)}) for n, p in ggufs.items()]
    assert {s.engine for s in specs} == {"llamacpp"}
    router = _start(specs, tmp_path_factory.mktemp("router"))
    yield router, [s.name for s in specs], ggufs
    router.kill()


def _client(router: RouterProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _rows(router: RouterProcess) -> dict[str, dict]:
    return {r["name"]: r for r in httpx.get(router.url + "/admin/models", timeout=30).json()["data"]}


def _ask(router: RouterProcess, model: str) -> tuple[str, str]:
    """A greedy chat answer and the tier it was served from."""
    raw = _client(router).chat.completions.with_raw_response.create(model=model, messages=CHAT, max_tokens=12,
                                                                     temperature=0)
    return raw.parse().choices[0].message.content or "", raw.headers["x-umem-served-from"]


def _place(router: RouterProcess, model: str, tier: str) -> None:
    resp = httpx.post(f"{router.url}/admin/models/{model}/place", json={"tier": tier}, timeout=120)
    assert resp.status_code == 200, resp.text


def test_every_tier_is_visited_and_greedy_answers_survive_each_round_trip(served) -> None:
    router, names, files = served
    first, other = names
    answer, tier = _ask(router, first)
    assert tier == "cold" and answer.strip(), "a random model still answers printable words"
    client = _client(router)

    # streaming and plain completions agree, through the router, from llama-server
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=first, messages=CHAT, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == answer
    comp = client.completions.create(model=first, prompt="once upon a time", max_tokens=8, temperature=0)
    assert comp.choices[0].text and comp.usage is not None and comp.usage.completion_tokens > 0
    assert comp.choices[0].finish_reason in ("length", "stop")

    # room for one: asking the other model moves the first to RAM, where the router holds its file
    _ask(router, other)
    rows = _rows(router)
    assert rows[first]["tier"] == "ram" and rows[other]["tier"] == "gpu"
    ram = rows[first]["engine_details"]["ram_tier"]
    assert ram["held"] is True and ram["locked"] in (True, False)
    assert ram["locked"] or "mapped and touched" in ram["lock_problem"]
    assert rows[first]["engine_details"]["running"] is False, "no server runs in the ram tier"
    assert cached_bytes(files[first]) == files[first].stat().st_size
    assert _ask(router, first) == (answer, "ram")

    # disk: the server stops and the file is dropped from memory; cold: the same, from nothing
    for tier in ("disk", "cold"):
        _place(router, first, tier)
        row = _rows(router)[first]
        assert row["tier"] == tier and row["engine_details"]["ram_tier"]["held"] is False
        assert _ask(router, first) == (answer, tier)
    assert _ask(router, first) == (answer, "gpu")

    details = _rows(router)[first]["engine_details"]
    assert details["engine"] == "llamacpp" and details["transport"] in ("uds", "tcp")
    assert details["gguf"]["quantization"] in ("f16", "q8_0") and details["kv_cache_bytes"] > 0
    assert Path(details["log_file"]).is_file()
    logs = httpx.get(f"{router.url}/admin/models/{first}/logs", timeout=30).json()
    assert logs["path"] == details["log_file"] and "umem starting:" in logs["text"] and "llama-server" in logs["text"]


def test_options_llama_server_honours_pass(served) -> None:
    router, names, _ = served
    body = {"model": names[0], "messages": CHAT, "max_tokens": 4, "temperature": 0}
    ok = httpx.post(router.url + "/v1/chat/completions", json={**body, "presence_penalty": 0.5,
                                                               "frequency_penalty": 0.5, "seed": 7}, timeout=120)
    assert ok.status_code == 200, ok.text
    logprobs = httpx.post(router.url + "/v1/chat/completions", json={**body, "logprobs": True}, timeout=120)
    assert logprobs.status_code == 200, logprobs.text
    assert len(logprobs.json()["choices"][0]["logprobs"]["content"]) == logprobs.json()["usage"]["completion_tokens"]
    too_long = httpx.post(router.url + "/v1/completions", json={"model": names[0], "prompt": "x " * 5000,
                                                                "max_tokens": 4}, timeout=120)
    assert too_long.status_code == 400, too_long.text
    error = too_long.json()["error"]
    assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"
    assert "context size" in error["message"]


def test_a_prompt_that_can_never_fit_is_refused_before_any_move(served) -> None:
    """With one model hot, a prompt for the other far over its served context (a lower bound of its
    tokens from the longest token of the vocabulary) is a 400 naming the field; nothing moves."""
    router, names, _ = served
    hot, other = names
    _ask(router, hot)
    before = {n: r["tier"] for n, r in _rows(router).items()}
    assert before[hot] == "gpu" and before[other] != "gpu"
    for path, body in (("/v1/completions", {"prompt": "tier " * 20000}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "tier " * 20000}]})):
        resp = httpx.post(router.url + path, json={"model": other, "max_tokens": 4, **body}, timeout=120)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] in ("prompt", "messages") and error["code"] == "context_length_exceeded"
        assert "served with a context of" in error["message"]
    assert {n: r["tier"] for n, r in _rows(router).items()} == before


def test_every_slot_has_the_whole_served_context(served) -> None:
    """llama-server splits its -c between its slots: a prompt of most of the served context must
    still be answered (it is refused when the context is split four ways), and the router lets
    one request per slot in at once."""
    router, names, _ = served
    model = names[0]
    context = _rows(router)[model]["context_length"]

    def prompt_tokens(repeats: int) -> int:
        usage = _client(router).completions.create(model=model, prompt="tier " * repeats, max_tokens=2,
                                                   temperature=0).usage
        assert usage is not None
        return usage.prompt_tokens

    per_repeat = prompt_tokens(100) / 100
    assert context // 2 < prompt_tokens(int(context * 0.6 / per_repeat)) < context
    details = _rows(router)[model]["engine_details"]
    assert details["parallel"] == 4 and details["kv_tokens"] == 4 * context
    assert details["max_concurrency"] == 4


def test_a_killed_llama_server_is_noticed_and_started_again(served) -> None:
    router, names, _ = served
    model = names[1]
    before, _ = _ask(router, model)
    pid = _rows(router)[model]["engine_details"]["pid"]
    assert pid
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: _rows(router)[model]["tier"] == "cold", 15), _rows(router)[model]
    assert "exited with code -9" in _rows(router)[model]["last_error"]
    assert _ask(router, model) == (before, "cold")
    assert _rows(router)[model]["engine_details"]["pid"] != pid


def test_a_request_right_after_the_server_died_is_answered_by_a_restarted_one(served) -> None:
    """Killed, then asked at once: the request finds the process dead and the engine restarts it
    (restart once on death); had the runtime's watcher (every second) seen the death first, the
    model is cold and starts anew. Either way the answer is the same greedy text."""
    router, names, _ = served
    model = names[0]
    before, _ = _ask(router, model)
    details = _rows(router)[model]["engine_details"]
    os.kill(details["pid"], signal.SIGKILL)
    answer, tier = _ask(router, model)
    assert answer == before
    after = _rows(router)[model]
    if tier == "gpu":
        assert after["engine_details"]["restarts"] == details["restarts"] + 1 and after["last_error"] is None
    else:
        assert tier == "cold" and "exited with code -9" in after["last_error"]
    assert after["engine_details"]["pid"] not in (None, details["pid"])


def test_killing_the_router_leaves_no_llama_server_behind(ggufs: dict[str, Path], tmp_path: Path) -> None:
    specs = [spec_from_mapping({"name": n, "weights": str(p)}) for n, p in ggufs.items()]
    for how in ("terminate", "kill"):
        router = _start(specs, tmp_path / how)
        for spec in specs:  # both started once: one runs, the other's file is held in RAM
            assert _ask(router, spec.name)[0]
        servers = [p for p in router.descendants() if "llama-server" in p.name()]
        assert servers, "a llama-server runs under the router"
        assert router.end_leaving(how) == []


def test_a_catalog_mixing_gguf_and_transformers_models_with_room_for_one(ggufs: dict[str, Path],
                                                                        tiny_models: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    specs = [spec_from_mapping({"name": "gguf", "weights": str(next(iter(ggufs.values())))}),
             spec_from_mapping({"name": "hf", "weights": str(tiny_models["tiny-llama"])})]
    assert [s.engine for s in specs] == ["llamacpp", "transformers"]
    router = _start(specs, tmp_path / "mixed")
    try:
        first = {s.name: _ask(router, s.name) for s in specs}
        assert [tier for _, tier in first.values()] == ["cold", "cold"]
        for _ in range(2):
            for s in specs:
                assert _ask(router, s.name) == (first[s.name][0], "ram")
                rows = _rows(router)
                assert rows[s.name]["tier"] == "gpu" and [r["tier"] for r in rows.values()].count("gpu") == 1
    finally:
        router.kill()


def test_the_benchmark_task_covers_a_gguf_model(ggufs: dict[str, Path], tmp_path: Path) -> None:
    """tasks/benchmark.py offline on a GGUF model, as on a transformers one: every scenario measured."""
    from clearml_umem.clearml_io.offline import OfflineSession
    from tests.clearml_env import offline_env, run_python

    name, path = next(iter(ggufs.items()))
    manifest = tmp_path / "models.yaml"
    manifest.write_text(f"models:\n  - name: {name}\n    weights: {path}\n")
    env = {**offline_env(tmp_path), **server_env()}
    run_python(["tasks/benchmark.py", "--manifest", str(manifest), "--port", "0", "--device", "cpu",
                "--work-dir", str(tmp_path / "work"), "--runs", "2", "--probe-mb", "16"], env, timeout=600)
    session = OfflineSession.find(task_name="benchmark", cache_dir=env["CLEARML_CACHE_DIR"])
    table = session.table("benchmark")
    measured = {row[1] for row in table[1:] if row[0] == name and row[2] != "n/a"}
    assert {"hot", "from RAM", "cold start"} <= measured, table


@pytest.mark.parametrize("script", ["llamacpp_slots.py", "llamacpp_tiers.py"])
def test_the_llamacpp_benchmarks_run(script: str) -> None:
    """Small shapes, one run each: the benchmarks the README quotes still work end to end."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    small = ["--hidden", "64", "--layers", "2", "--runs", "1"]
    args = small + (["--tokens", "8"] if script == "llamacpp_slots.py" else [])
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **server_env()}, cwd=repo)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    if script == "llamacpp_slots.py":
        split = (line.split() for line in proc.stdout.splitlines())
        rows = [row for row in split if len(row) == 3 and row[0].isdigit()]
        assert [row[0] for row in rows] == ["1", "4"] and rows[0][2] == "1.00"

# Function calling, structured output and logprobs (docs/tools-and-structured-output.md): the tiny
# GGUF's chat template does not take tools, so the router's fallback runs (tools in a system
# message, required/named as a json_schema grammar, the answer shaped into calls); logprobs
# and json_schema are llama-server's own.

TOOLS_ROOM = 400
"""llama.cpp's JSON grammars allow up to ~22 whitespace tokens between tokens of JSON: room for them."""


def test_tools_named_tool_choice(served) -> None:
    checks.named_call(_client(served[0]), served[1][0], TOOLS_ROOM)


def test_tools_required_tool_choice_streamed(served) -> None:
    checks.required_call_streamed(_client(served[0]), served[1][0], TOOLS_ROOM)


def test_tools_results_in_the_conversation_and_a_json_schema_answer(served) -> None:
    checks.conversation_with_tool_results(_client(served[0]), served[1][0], TOOLS_ROOM)


def test_tools_json_object_mode(served) -> None:
    checks.json_object(_client(served[0]), served[1][0])


def test_tools_chat_and_completion_logprobs(served) -> None:
    checks.chat_logprobs(_client(served[0]), served[1][0])
    checks.completion_logprobs(_client(served[0]), served[1][0])


def test_tools_client_mistakes_are_400s_naming_the_field(served) -> None:
    checks.client_mistakes(_client(served[0]), served[1][0])


def test_tools_logprobs_with_tools_are_refused_naming_model_and_engine(served) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        _client(served[0]).chat.completions.create(model=served[1][0], messages=checks.ASK, tools=checks.TOOLS,
                                                   logprobs=True, tool_choice="required", max_tokens=5)
    assert err.value.body["param"] == "logprobs" and "engine llamacpp" in err.value.body["message"]


def test_tools_langchain_tool_call_and_structured_output(served) -> None:
    checks.langchain_agent_calls(served[0].url + "/v1", served[1][0], TOOLS_ROOM)
