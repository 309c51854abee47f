"""The vLLM engine's control logic against a fake vLLM server (tests/fixtures/fake_vllm_server.py).

The fake is started by the engine as vLLM would be (a real process, its own group, its log
file), so these tests cover process management too; they need no vLLM and take seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from clearml_umem.engines import (
    EngineContext,
    EngineError,
    EngineOutOfMemory,
    GenerationRequest,
    InvalidRequest,
    vllm_process,
)
from clearml_umem.engines import vllm_engine as ve
from clearml_umem.engines.kv_sizing import GiB
from clearml_umem.engines.openai_stream import SSEDecoder
from clearml_umem.engines.vllm_engine import VLLMEngine
from clearml_umem.engines.vllm_process import Endpoint, EngineNoUnixSocket
from clearml_umem.spec import spec_from_mapping
from clearml_umem.tiers import Tier
from tests.waiting import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="engine processes need Linux")

FAKE = Path(__file__).parent / "fixtures" / "fake_vllm_server.py"
CONTROL_PATHS = ("/sleep", "/wake_up", "/collective_rpc", "/reset_prefix_cache")
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256, "max_position_embeddings": 2048,
          "torch_dtype": "bfloat16"}
WEIGHTS = 3 * 2**20


class Journal:
    """Reads what the fake server recorded; sets what it should do next."""

    def __init__(self, state: Path) -> None:
        self.state = state

    def set(self, **behaviour: Any) -> None:
        (self.state / "behaviour.json").write_text(json.dumps(behaviour))

    def _lines(self, name: str) -> list[dict[str, Any]]:
        path = self.state / name
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def starts(self) -> list[dict[str, Any]]:
        return self._lines("starts.jsonl")

    def calls(self) -> list[dict[str, Any]]:
        return [c for c in self._lines("calls.jsonl") if c.get("path") != "/health"]

    def control(self) -> list[tuple[str, dict[str, Any], Any]]:
        return [(c["path"], c["query"], c["body"]) for c in self.calls() if c.get("path") in CONTROL_PATHS]

    def clear_calls(self) -> None:
        (self.state / "calls.jsonl").unlink(missing_ok=True)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    (d / "model.safetensors").write_bytes(b"\0" * WEIGHTS)
    return d


@pytest.fixture
def make_engine(tmp_path: Path, model_dir: Path) -> Any:
    engines: list[VLLMEngine] = []

    def make(sleep_mode: bool = True, behaviour: dict[str, Any] | None = None,
             **options: Any) -> tuple[VLLMEngine, Journal]:
        state = tmp_path / f"state{len(engines)}"
        state.mkdir()
        journal = Journal(state)
        journal.set(**(behaviour or {}))
        spec = spec_from_mapping({"name": f"m{len(engines)}", "weights": str(model_dir), "engine": "vllm",
                                  "dtype": "bfloat16"})
        ctx = EngineContext(work_dir=tmp_path, device="cuda" if sleep_mode else "cpu", device_budget_bytes=8 * GiB,
                            options={"vllm_command": [sys.executable, str(FAKE)], "sleep_mode": sleep_mode,
                                     "env": {"FAKE_VLLM_STATE": str(state)}, "stop_grace_s": 3.0,
                                     "start_timeout_s": 20.0, **options})
        engine = VLLMEngine(spec, ctx)
        engines.append(engine)
        return engine, journal

    yield make
    for engine in engines:
        asyncio.run(engine.close())


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def collect(engine: VLLMEngine, request: GenerationRequest) -> list[Any]:
    return [d async for d in engine.generate(request)]


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_tiers_with_and_without_sleep_mode(make_engine: Any, caplog: pytest.LogCaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ve, "_degraded_logged", False)
    with caplog.at_level(logging.INFO, logger=ve.__name__):
        gpu, _ = make_engine(sleep_mode=True)
        cpu, _ = make_engine(sleep_mode=False)
        cpu2, _ = make_engine(sleep_mode=False)
    assert gpu.tiers == frozenset(Tier)
    assert cpu.tiers == cpu2.tiers == frozenset({Tier.GPU, Tier.COLD})
    assert gpu.transits == {(Tier.COLD, Tier.RAM): Tier.GPU, (Tier.COLD, Tier.DISK): Tier.GPU,
                            (Tier.DISK, Tier.RAM): Tier.GPU}, "sleeping needs an awake engine"
    assert cpu.transits == {}
    assert sum("without sleep mode" in r.getMessage() for r in caplog.records) == 1
    assert any("KV cache" in r.getMessage() and "max_model_len" in r.getMessage() for r in caplog.records)
    with pytest.raises(EngineError, match="no ram tier"):
        run(cpu.move(Tier.GPU, Tier.RAM))


def test_footprints_and_describe(make_engine: Any) -> None:
    engine, _ = make_engine()
    plan = engine.plan
    assert plan.max_model_len == 2048 and plan.kv_cache_bytes >= 4 * 2048 * plan.bytes_per_token
    assert engine.footprint(Tier.GPU).device_bytes == WEIGHTS + plan.kv_cache_bytes + ve.PROCESS_OVERHEAD_BYTES
    assert engine.footprint(Tier.RAM).device_bytes == ve.SLEEP_OVERHEAD_BYTES
    assert engine.footprint(Tier.RAM).host_bytes == WEIGHTS
    assert engine.footprint(Tier.DISK).device_bytes == ve.SLEEP_OVERHEAD_BYTES
    assert engine.footprint(Tier.DISK).host_bytes == 0
    assert engine.footprint(Tier.COLD).device_bytes == engine.footprint(Tier.COLD).host_bytes == 0
    info = engine.describe()
    assert info["kv_cache_bytes"] == plan.kv_cache_bytes and info["max_model_len"] == 2048
    assert info["log_file"].endswith("vllm-m0.log") and info["tier"] == "cold" and info["pid"] is None


class ScriptedProbe:
    """Stands in for NVML: answers the next scripted byte count and records the pids asked about."""

    def __init__(self, *answers: int | None) -> None:
        self.answers = list(answers)
        self.asked: list[set[int]] = []

    def used_by(self, pids: Any) -> int | None:
        self.asked.append(set(pids))
        return self.answers.pop(0)


def test_measured_device_memory_replaces_the_estimates(make_engine: Any) -> None:
    probe = ScriptedProbe()
    engine, journal = make_engine(behaviour={"spawn_child": True}, device_usage_probe=probe)
    kv, margin, mib = engine.plan.kv_cache_bytes, ve.MEASURE_MARGIN_BYTES, 2**20
    awake, asleep = WEIGHTS + kv + 300 * mib, 2 * GiB
    # one answer per move that ends with a live process: gpu, ram, (disk: stopped), gpu, ram
    probe.answers = [awake, asleep, awake + 10 * mib, asleep + 10 * mib]

    async def walk() -> list[Any]:
        return [await engine.move(src, dst) for src, dst in
                ((Tier.COLD, Tier.GPU), (Tier.GPU, Tier.RAM), (Tier.RAM, Tier.DISK), (Tier.DISK, Tier.GPU),
                 (Tier.GPU, Tier.RAM), (Tier.RAM, Tier.COLD))]

    to_gpu, to_ram, ram_to_disk, disk_to_gpu, to_ram_again, to_cold = run(walk())
    assert to_gpu.footprints is not None
    assert to_gpu.footprints[Tier.GPU].device_bytes == awake + margin
    assert engine.process_overhead_bytes == 300 * mib + margin
    assert to_ram.footprints is not None and to_ram.footprints[Tier.RAM].device_bytes == asleep + margin
    assert to_ram.footprints[Tier.DISK].device_bytes == asleep + margin
    assert engine.footprint(Tier.RAM).host_bytes == WEIGHTS
    # ram -> disk stops the process (nothing to measure); within the margin, nothing is re-planned
    assert ram_to_disk.footprints is None and disk_to_gpu.footprints is None
    assert to_ram_again.footprints is None and to_cold.footprints is None
    assert engine.describe()["measured_device_bytes"] == {"gpu": awake + 10 * mib, "ram": asleep + 10 * mib}
    child = int((journal.state / "children.txt").read_text().split()[0])
    assert {journal.starts()[0]["pid"], child} <= probe.asked[0], "the engine core child holds the memory"
    assert probe.answers == []


def test_explicit_overheads_and_unseen_processes_keep_the_estimates(make_engine: Any,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    fixed, _ = make_engine(device_usage_probe=ScriptedProbe(5 * GiB, 5 * GiB), sleep_overhead_bytes=GiB // 2)

    async def fixed_walk() -> list[Any]:
        return [await fixed.move(Tier.COLD, Tier.GPU), await fixed.move(Tier.GPU, Tier.RAM)]

    to_gpu, to_ram = run(fixed_walk())
    assert to_gpu.footprints is not None, "the awake overhead was not fixed, so it is measured"
    assert to_ram.footprints is None and fixed.sleep_overhead_bytes == GiB // 2

    hidden, _ = make_engine(device_usage_probe=ScriptedProbe(None, None))

    async def hidden_walk() -> list[Any]:
        return [await hidden.move(Tier.COLD, Tier.GPU), await hidden.move(Tier.GPU, Tier.RAM)]

    with caplog.at_level(logging.INFO, logger="clearml_umem.engines.vllm_engine"):
        results = run(hidden_walk())
    assert [r.footprints for r in results] == [None, None]
    assert hidden.sleep_overhead_bytes == ve.SLEEP_OVERHEAD_BYTES and hidden.describe()["measured_device_bytes"] == {}
    assert caplog.text.count("NVML does not see the vLLM processes") == 1


def test_measured_awake_footprint_is_capped_at_the_device_budget(make_engine: Any,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    engine, _ = make_engine(device_usage_probe=ScriptedProbe(20 * GiB))
    with caplog.at_level(logging.WARNING, logger="clearml_umem.engines.vllm_engine"):
        run(engine.move(Tier.COLD, Tier.GPU))
    assert engine.footprint(Tier.GPU).device_bytes == 8 * GiB
    assert "more than the device budget leaves it" in caplog.text


def test_start_command_environment_and_log(make_engine: Any) -> None:
    engine, journal = make_engine(vllm_args=["--max-num-seqs", "4"])
    result = run(engine.move(Tier.COLD, Tier.GPU))
    assert result.bytes_moved == WEIGHTS
    [start] = journal.starts()
    argv = start["argv"]
    socket_path = Path(argv[argv.index("--uds") + 1])
    assert "--host" not in argv and "--port" not in argv, "a Unix socket only, no TCP port"
    assert socket_path.name == "api.sock" and socket_path.parent.parent == vllm_process.SOCKETS.path
    assert start["env"]["VLLM_RPC_BASE_PATH"] == str(socket_path.parent), "vLLM's IPC sockets go there too"
    assert "VLLM_API_KEY" not in start["env"]
    assert argv[argv.index("--served-model-name") + 1] == "m0"
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(engine.plan.kv_cache_bytes)
    assert argv[argv.index("--max-model-len") + 1] == "2048"
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert "--enable-sleep-mode" in argv and "--enforce-eager" not in argv and "--max-num-seqs" in argv
    assert start["env"]["VLLM_SERVER_DEV_MODE"] == "1"
    info = engine.describe()
    assert info["running"] and info["pid"] == start["pid"] and info["url"] == f"unix:{socket_path}"
    assert info["transport"] == "uds" and info["socket"] == str(socket_path) and info["allow_tcp"] is False
    assert "fake-vllm: serving m0" in Path(info["log_file"]).read_text()
    pid = engine.pid
    run(engine.move(Tier.GPU, Tier.COLD))
    assert not pid_alive(pid)
    assert engine.describe()["running"] is False


def test_cpu_mode_runs_eager_without_sleep_mode(make_engine: Any) -> None:
    engine, journal = make_engine(sleep_mode=False)
    run(engine.move(Tier.COLD, Tier.GPU))
    argv = journal.starts()[0]["argv"]
    assert "--enforce-eager" in argv and "--enable-sleep-mode" not in argv


@pytest.fixture
def old_vllm(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A vLLM from before `--uds` (the fake, told so), with nothing learnt about it yet."""
    monkeypatch.setattr(vllm_process, "_NO_UDS", set())
    monkeypatch.delenv(vllm_process.ALLOW_TCP_ENV, raising=False)
    return [sys.executable, str(FAKE), "--without-uds"]


def test_a_vllm_without_uds_is_refused_unless_tcp_is_allowed(make_engine: Any, old_vllm: list[str]) -> None:
    engine, journal = make_engine(vllm_command=old_vllm)
    with pytest.raises(EngineNoUnixSocket, match="no --uds option.*allow_tcp"):
        run(engine.move(Tier.COLD, Tier.GPU))
    assert len(journal.starts()) == 1, "tried once with --uds, not retried"
    assert "unrecognized arguments: --uds" in engine.log_file.read_text()
    with pytest.raises(EngineNoUnixSocket):
        run(engine.move(Tier.COLD, Tier.GPU))
    assert len(journal.starts()) == 1, "what the first launch showed is remembered: no second try"
    assert engine.describe()["running"] is False and engine.describe()["url"] is None


def test_tcp_fallback_listens_on_loopback_with_a_key(make_engine: Any, old_vllm: list[str],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Only where allowed: the key guards vLLM's /v1 routes, not the dev routes (as in vLLM 0.32)."""
    engine, journal = make_engine(vllm_command=old_vllm, allow_tcp=True)
    with caplog.at_level(logging.WARNING, logger="clearml_umem.engines.vllm_engine"):
        run(engine.move(Tier.COLD, Tier.GPU))
    assert "has no --uds" in caplog.text and "/collective_rpc" in caplog.text
    rejected, start = journal.starts()
    assert "--uds" in rejected["argv"]
    argv = start["argv"]
    assert "--uds" not in argv
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    key = start["env"]["VLLM_API_KEY"]
    assert len(key) >= 32 and key not in " ".join(argv), "the key is never on the command line"
    info = engine.describe()
    assert info["running"] and info["pid"] == start["pid"] and info["url"].startswith("http://127.0.0.1:")
    assert info["transport"] == "tcp" and info["socket"] is None and info["allow_tcp"] is True
    deltas = run(collect(engine, GenerationRequest(prompt="hi", max_tokens=2)))
    assert deltas[-1].finish_reason == "length"
    run(engine.move(Tier.GPU, Tier.RAM))
    assert [c["auth"] for c in journal.calls()] == [True, True], "the router sends the key on every call"
    with httpx.Client(base_url=info["url"], timeout=5, trust_env=False) as stranger:
        assert stranger.get("/v1/models").status_code == 401
        assert stranger.post("/wake_up").status_code == 200, "what --api-key leaves open"
    run(engine.move(Tier.RAM, Tier.COLD))
    run(engine.move(Tier.COLD, Tier.GPU))
    assert len(journal.starts()) == 3 and "--uds" not in journal.starts()[2]["argv"], "straight to TCP next time"
    assert journal.starts()[2]["env"]["VLLM_API_KEY"] != key, "a new key per launch"


SEQUENCES: list[tuple[Tier, Tier, list[tuple[str, dict[str, Any], Any]], int]] = [
    (Tier.COLD, Tier.GPU, [], WEIGHTS),
    (Tier.GPU, Tier.RAM, [("/sleep", {"level": ["1"], "mode": ["wait"]}, None)], WEIGHTS),
    (Tier.RAM, Tier.GPU, [("/wake_up", {}, None)], WEIGHTS),
    (Tier.GPU, Tier.DISK, [("/sleep", {"level": ["2"], "mode": ["wait"]}, None)], 0),
    (Tier.DISK, Tier.GPU, [("/wake_up", {"tags": ["weights"]}, None),
                           ("/collective_rpc", {}, {"method": "reload_weights"}),
                           ("/wake_up", {"tags": ["kv_cache"]}, None),
                           ("/reset_prefix_cache", {}, None)], WEIGHTS),
    (Tier.GPU, Tier.GPU, [], 0),
    (Tier.GPU, Tier.COLD, [], 0),
    (Tier.COLD, Tier.RAM, [("/sleep", {"level": ["1"], "mode": ["wait"]}, None)], WEIGHTS),
    (Tier.RAM, Tier.COLD, [], 0),
    (Tier.COLD, Tier.DISK, [("/sleep", {"level": ["2"], "mode": ["wait"]}, None)], 0),
    (Tier.DISK, Tier.RAM, [("/wake_up", {"tags": ["weights"]}, None),
                           ("/collective_rpc", {}, {"method": "reload_weights"}),
                           ("/wake_up", {"tags": ["kv_cache"]}, None),
                           ("/reset_prefix_cache", {}, None),
                           ("/sleep", {"level": ["1"], "mode": ["wait"]}, None)], WEIGHTS),
]


def test_sleep_and_wake_sequences_per_tier_pair(make_engine: Any) -> None:
    engine, journal = make_engine()

    async def walk() -> None:
        for src, dst, expected, moved in SEQUENCES:
            journal.clear_calls()
            result = await engine.move(src, dst)
            assert journal.control() == expected, f"{src}->{dst}"
            assert result.bytes_moved == moved, f"{src}->{dst}"
            assert engine.describe()["tier"] == dst.value
            assert engine.describe()["running"] is (dst is not Tier.COLD), f"{src}->{dst}"
            if dst is Tier.GPU:
                assert not await engine.is_sleeping()

    run(walk())
    assert engine.restarts == 0
    assert len(journal.starts()) == 3


def test_calls_to_one_process_share_a_kept_alive_connection(make_engine: Any) -> None:
    """A client per call would pay a new connection and SSL context (about 20 ms) per request. A
    stream has a connection of its own (engines/engine_http.py: a Unix-socket connect, no client)."""
    engine, journal = make_engine()

    async def walk() -> None:
        await engine.move(Tier.COLD, Tier.GPU)
        journal.clear_calls()
        await engine.move(Tier.GPU, Tier.DISK)
        await engine.move(Tier.DISK, Tier.GPU)
        assert not await engine.is_sleeping()
        await collect(engine, GenerationRequest(prompt="hi", max_tokens=2))
        await engine.move(Tier.GPU, Tier.COLD)
        await engine.move(Tier.COLD, Tier.GPU)
        await engine.move(Tier.GPU, Tier.RAM)

    run(walk())
    calls = [c for c in journal.calls() if "path" in c]
    first, second = ([c for c in calls if c["pid"] == pid] for pid in dict.fromkeys(c["pid"] for c in calls))
    assert [c["path"] for c in first] == ["/sleep", "/wake_up", "/collective_rpc", "/wake_up",
                                          "/reset_prefix_cache", "/is_sleeping", "/v1/completions"]
    control = [c["peer"] for c in first if c["path"] != "/v1/completions"]
    assert len(set(control)) == 1, first
    assert first[-1]["peer"] not in control, "a stream does not take the control calls' connection"
    assert [c["path"] for c in second] == ["/sleep"]
    assert second[0]["peer"] != first[0]["peer"], "a new process needs a new connection"


def test_engines_start_one_at_a_time(make_engine: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Two models asked for at once: the second vLLM process is launched only once the first is healthy."""
    first, j1 = make_engine(behaviour={"startup_delay_s": 0.6})
    second, j2 = make_engine(behaviour={"startup_delay_s": 0.6})

    async def both() -> None:
        await asyncio.gather(first.move(Tier.COLD, Tier.GPU), second.move(Tier.COLD, Tier.GPU))

    with caplog.at_level(logging.INFO, logger="clearml_umem.engines.vllm_engine"):
        run(both())
    assert first.describe()["running"] and second.describe()["running"]
    healthy_first = min(c["t"] for c in j1._lines("calls.jsonl") if c.get("path") == "/health")
    assert j2.starts()[0]["t"] >= healthy_first
    assert "waiting for another engine to finish starting" in caplog.text


def test_close_while_waiting_to_start_launches_nothing(make_engine: Any) -> None:
    first, _ = make_engine(behaviour={"startup_delay_s": 0.6})
    second, j2 = make_engine()

    async def race() -> None:
        starting = asyncio.create_task(first.move(Tier.COLD, Tier.GPU))
        await asyncio.sleep(0.1)
        waiting = asyncio.create_task(second.move(Tier.COLD, Tier.GPU))
        await asyncio.sleep(0.1)
        await second.close()
        with pytest.raises(EngineError, match="engine closed while"):
            await waiting
        await starting

    run(race())
    assert j2.starts() == [] and second.describe()["tier"] == "cold"


def test_ram_to_disk_stops_and_disk_to_gpu_starts_again(make_engine: Any) -> None:
    engine, journal = make_engine()

    async def walk() -> None:
        await engine.move(Tier.COLD, Tier.GPU)
        await engine.move(Tier.GPU, Tier.RAM)
        journal.clear_calls()
        assert (await engine.move(Tier.RAM, Tier.DISK)).bytes_moved == 0
        assert engine.pid is None and journal.control() == []
        await engine.move(Tier.DISK, Tier.GPU)
        assert journal.control() == []

    run(walk())
    assert len(journal.starts()) == 2 and engine.restarts == 0


def test_generate_chat_and_completion(make_engine: Any) -> None:
    engine, journal = make_engine()

    async def go() -> tuple[list[Any], list[Any]]:
        await engine.move(Tier.COLD, Tier.GPU)
        chat = await collect(engine, GenerationRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                                       temperature=0.0, stop=["\n"], seed=7))
        text = await collect(engine, GenerationRequest(prompt="hello", max_tokens=6,
                                                       options={"presence_penalty": 0.5, "logit_bias": {"7": -100}}))
        return chat, text

    chat, text = run(go())
    assert "".join(d.text for d in chat) == "Hello, world!"
    assert chat[-1].finish_reason == "length" and chat[-1].text == ""
    assert (chat[-1].prompt_tokens, chat[-1].completion_tokens) == (3, 4)
    assert all(d.finish_reason is None for d in chat[:-1])
    assert "".join(d.text for d in text) == "Hello, world!Hello,"
    assert text[-1].completion_tokens == 6
    chat_call, text_call = [c for c in journal.calls() if c.get("path", "").startswith("/v1/")]
    assert chat_call["path"] == "/v1/chat/completions"
    body = chat_call["body"]
    assert body["model"] == "m0" and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert (body["temperature"], body["stop"], body["seed"], body["max_tokens"]) == (0.0, ["\n"], 7, 4)
    assert "presence_penalty" not in body
    assert (text_call["body"]["presence_penalty"], text_call["body"]["logit_bias"]) == (0.5, {"7": -100})
    assert text_call["path"] == "/v1/completions" and text_call["body"]["prompt"] == "hello"


def test_bad_request_maps_to_invalid_request(make_engine: Any) -> None:
    engine, _ = make_engine()

    async def go() -> None:
        await engine.move(Tier.COLD, Tier.GPU)
        await collect(engine, GenerationRequest(prompt="x", max_tokens=10**6))

    with pytest.raises(InvalidRequest, match="max_model_len"):
        run(go())
    assert engine.restarts == 0


def test_closing_the_iterator_closes_the_stream(make_engine: Any) -> None:
    engine, journal = make_engine(behaviour={"token_delay_s": 0.05})

    async def go() -> int:
        await engine.move(Tier.COLD, Tier.GPU)
        stream = engine.generate(GenerationRequest(prompt="x", max_tokens=400))
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break
        await stream.aclose()
        return got

    assert run(go()) == 3
    assert wait_until(lambda: any(c.get("event") == "client_disconnected" for c in journal._lines("calls.jsonl")),
                      5), "the server never saw the client go"
    [event] = [c for c in journal._lines("calls.jsonl") if c.get("event") == "client_disconnected"]
    assert event["sent"] < 100


def test_dead_process_is_restarted_before_a_request(make_engine: Any) -> None:
    engine, journal = make_engine()

    async def go() -> list[Any]:
        await engine.move(Tier.COLD, Tier.GPU)
        os.kill(engine.pid, signal.SIGKILL)
        assert wait_until(lambda: not engine._running(), 5)
        return await collect(engine, GenerationRequest(prompt="x", max_tokens=2))

    deltas = run(go())
    assert "".join(d.text for d in deltas) == "Hello,"
    assert engine.restarts == 1 and len(journal.starts()) == 2


def test_a_killed_engine_says_it_died_and_a_close_resets_it(make_engine: Any) -> None:
    """What the runtime's watcher asks every second: a process killed between requests is reported
    (the model is then counted cold and /admin/models shows why), and closing the engine resets it."""
    engine, journal = make_engine()

    async def go() -> None:
        await engine.move(Tier.COLD, Tier.GPU)
        assert engine.died() is None
        os.kill(engine.pid, signal.SIGKILL)
        assert wait_until(lambda: engine.died() is not None, 10)
        assert "exited with code -9" in engine.died() and "tier gpu" in engine.died()
        await engine.close()
        assert engine.died() is None and engine.describe()["tier"] == "cold"
        await engine.move(Tier.COLD, Tier.GPU)
        assert engine.died() is None

    run(go())
    assert len(journal.starts()) == 2


def test_crash_under_a_request_restarts_and_retries_once(make_engine: Any) -> None:
    engine, journal = make_engine(behaviour={"crash_on": {"/v1/completions": 1}})

    async def go() -> list[Any]:
        await engine.move(Tier.COLD, Tier.GPU)
        return await collect(engine, GenerationRequest(prompt="x", max_tokens=2))

    assert "".join(d.text for d in run(go())) == "Hello,"
    assert engine.restarts == 1 and len(journal.starts()) == 2


def test_a_second_crash_fails_the_request(make_engine: Any) -> None:
    engine, journal = make_engine(behaviour={"crash_on": {"/v1/completions": 5}})

    async def go() -> None:
        await engine.move(Tier.COLD, Tier.GPU)
        await collect(engine, GenerationRequest(prompt="x", max_tokens=2))

    with pytest.raises(EngineError, match="stream from vLLM failed"):
        run(go())
    assert len(journal.starts()) == 2


def test_failed_wake_restarts_the_process(make_engine: Any) -> None:
    engine, journal = make_engine()

    async def go() -> None:
        await engine.move(Tier.COLD, Tier.GPU)
        await engine.move(Tier.GPU, Tier.RAM)
        journal.set(fail={"/wake_up": {"status": 500, "message": "engine core is wedged", "times": 1}})
        await engine.move(Tier.RAM, Tier.GPU)
        assert not await engine.is_sleeping()

    run(go())
    assert engine.restarts == 1 and len(journal.starts()) == 2


def test_failed_wake_on_the_way_through_is_reported_not_restarted(make_engine: Any) -> None:
    """disk -> ram wakes on the GPU only to sleep again: a failed wake there goes to the scheduler."""
    engine, journal = make_engine()

    async def go() -> None:
        await engine.move(Tier.COLD, Tier.DISK)
        journal.set(fail={"/wake_up": {"status": 500, "message": "engine core is wedged", "times": 1}})
        with pytest.raises(EngineError, match="answered 500"):
            await engine.move(Tier.DISK, Tier.RAM)
        assert engine.describe()["tier"] == "disk"

    run(go())
    assert engine.restarts == 0 and len(journal.starts()) == 1


def test_dead_process_in_ram_is_started_on_wake(make_engine: Any) -> None:
    engine, journal = make_engine()

    async def go() -> None:
        await engine.move(Tier.COLD, Tier.GPU)
        await engine.move(Tier.GPU, Tier.RAM)
        os.kill(engine.pid, signal.SIGKILL)
        assert wait_until(lambda: not engine._running(), 5)
        journal.clear_calls()
        await engine.move(Tier.RAM, Tier.GPU)
        assert journal.control() == []

    run(go())
    assert engine.restarts == 1 and len(journal.starts()) == 2


def test_wake_out_of_memory_is_reported_not_restarted(make_engine: Any) -> None:
    engine, journal = make_engine()

    async def go() -> None:
        await engine.move(Tier.COLD, Tier.GPU)
        await engine.move(Tier.GPU, Tier.RAM)
        journal.set(fail={"/wake_up": {"status": 500, "times": 1,
                                       "message": "CUDA out of memory. Tried to allocate 2.00 GiB"}})
        with pytest.raises(EngineOutOfMemory):
            await engine.move(Tier.RAM, Tier.GPU)
        assert engine.describe()["tier"] == "ram"
        await engine.move(Tier.RAM, Tier.GPU)

    run(go())
    assert engine.restarts == 0 and len(journal.starts()) == 1


def test_out_of_memory_at_start_is_reported_without_retry(make_engine: Any) -> None:
    engine, journal = make_engine(behaviour={"exit_at_start_times": 5, "exit_message":
                                             "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1 GiB"})
    with pytest.raises(EngineOutOfMemory, match="exited with code 3"):
        run(engine.move(Tier.COLD, Tier.GPU))
    assert len(journal.starts()) == 1
    assert engine.pid is None


def test_crash_at_start_is_retried_once(make_engine: Any) -> None:
    engine, journal = make_engine(behaviour={"exit_at_start_times": 1})
    run(engine.move(Tier.COLD, Tier.GPU))
    assert engine.restarts == 1 and len(journal.starts()) == 2
    again, journal2 = make_engine(behaviour={"exit_at_start_times": 2})
    with pytest.raises(EngineError, match="failing at start"):
        run(again.move(Tier.COLD, Tier.GPU))
    assert len(journal2.starts()) == 2


def test_start_timeout_stops_the_process(make_engine: Any) -> None:
    engine, journal = make_engine(behaviour={"startup_delay_s": 60}, start_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(ve.EngineStartTimeout, match="not healthy after"):
        run(engine.move(Tier.COLD, Tier.GPU))
    assert time.monotonic() - started < 10
    [start] = journal.starts()
    assert wait_until(lambda: not pid_alive(start["pid"]), 5)
    assert len(journal.starts()) == 1


def test_failed_sleep_is_retried_once(make_engine: Any) -> None:
    engine, journal = make_engine()

    async def go() -> None:
        await engine.move(Tier.COLD, Tier.GPU)
        journal.set(fail={"/sleep": {"status": 500, "message": "busy", "times": 1}})
        journal.clear_calls()
        await engine.move(Tier.GPU, Tier.RAM)
        assert [c[0] for c in journal.control()] == ["/sleep", "/sleep"]
        journal.set(fail={"/sleep": {"status": 500, "message": "busy", "times": 5}})
        await engine.move(Tier.RAM, Tier.GPU)
        with pytest.raises(EngineError, match="answered 500"):
            await engine.move(Tier.GPU, Tier.DISK)

    run(go())


def test_process_dead_on_the_way_to_sleep_counts_as_asleep(make_engine: Any) -> None:
    engine, journal = make_engine()

    async def go() -> None:
        await engine.move(Tier.COLD, Tier.GPU)
        os.kill(engine.pid, signal.SIGKILL)
        assert wait_until(lambda: not engine._running(), 5)
        assert (await engine.move(Tier.GPU, Tier.RAM)).bytes_moved == 0
        assert engine.pid is None
        await engine.move(Tier.RAM, Tier.GPU)

    run(go())
    assert len(journal.starts()) == 2


def test_crash_while_going_to_sleep_leaves_it_stopped(make_engine: Any) -> None:
    engine, journal = make_engine(behaviour={"crash_on": {"/sleep": 1}})

    async def go() -> None:
        await engine.move(Tier.COLD, Tier.GPU)
        assert (await engine.move(Tier.GPU, Tier.RAM)).bytes_moved == 0
        assert engine.pid is None and engine.describe()["tier"] == "ram"
        await engine.move(Tier.RAM, Tier.GPU)

    run(go())
    assert len(journal.starts()) == 2


def test_close_stops_the_group_even_when_sigterm_is_ignored(make_engine: Any) -> None:
    engine, journal = make_engine(behaviour={"spawn_child": True, "ignore_sigterm": True}, stop_grace_s=0.5)
    run(engine.move(Tier.COLD, Tier.GPU))
    leader = engine.pid
    child = int((journal.state / "children.txt").read_text().split()[0])
    assert pid_alive(child)
    run(engine.close())
    run(engine.close())
    assert not pid_alive(leader)
    assert wait_until(lambda: not pid_alive(child), 5)
    assert engine.describe()["tier"] == "cold"
    run(engine.move(Tier.COLD, Tier.GPU))
    assert engine.describe()["running"] and len(journal.starts()) == 2


def test_close_during_start_is_not_retried(make_engine: Any) -> None:
    engine, journal = make_engine(behaviour={"startup_delay_s": 30})

    async def go() -> None:
        move = asyncio.ensure_future(engine.move(Tier.COLD, Tier.GPU))
        assert await asyncio.to_thread(wait_until, lambda: len(journal.starts()) == 1, 10)
        await engine.close()
        with pytest.raises(EngineError):
            await move

    run(go())
    assert len(journal.starts()) == 1 and engine.pid is None


def test_sse_decoder() -> None:
    chat = SSEDecoder(chat=True)
    lines = [
        'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}',
        "",
        ": keep-alive comment",
        'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}',
        'data: {"choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"stop"}]}',
        'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}',
        "data: [DONE]",
    ]
    texts = [d.text for line in lines for d in chat.feed(line)]
    assert texts == ["Hi", "!"] and chat.done
    last = chat.finish()
    assert (last.text, last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("", "stop", 5, 2)
    text = SSEDecoder(chat=False)
    assert [d.text for d in text.feed('data: {"choices":[{"index":0,"text":"abc","finish_reason":"length"}]}')] == [
        "abc"]
    assert text.finish().finish_reason == "length" and text.finish().completion_tokens is None
    with pytest.raises(EngineError, match="without a finish reason"):
        SSEDecoder(chat=False).finish()
    with pytest.raises(EngineError, match="mid-stream: boom"):
        SSEDecoder(chat=True).feed('data: {"error": {"message": "boom", "code": 500}}')


def test_budget_too_small_is_refused_at_creation(tmp_path: Path, model_dir: Path) -> None:
    spec = spec_from_mapping({"name": "big", "weights": str(model_dir), "engine": "vllm"})
    ctx = EngineContext(work_dir=tmp_path, device="cpu", device_budget_bytes=GiB)
    with pytest.raises(EngineError, match="cannot be served"):
        VLLMEngine(spec, ctx)


def test_interpreter_choice(tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = spec_from_mapping({"name": "m", "weights": str(model_dir), "engine": "vllm"})
    monkeypatch.delenv("UMEM_VLLM_PYTHON", raising=False)
    assert VLLMEngine(spec, EngineContext(work_dir=tmp_path, device="cpu")).python == sys.executable
    monkeypatch.setenv("UMEM_VLLM_PYTHON", "/opt/v/bin/python")
    engine = VLLMEngine(spec, EngineContext(work_dir=tmp_path, device="cpu"))
    assert engine.command(Endpoint(port=1234))[:3] == ["/opt/v/bin/python", "-m", ve.VLLM_SERVER_MODULE]
    opt = VLLMEngine(spec, EngineContext(work_dir=tmp_path, device="cpu", options={"vllm_python": "/x/python"}))
    assert opt.python == "/x/python"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    env = engine.environment()
    assert "VLLM_CPU_KVCACHE_SPACE" not in env, "a whole-GiB legacy setting would override the computed size"
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["HF_HUB_OFFLINE"] == "1"


def test_a_prompt_over_the_served_context_is_refused_without_starting_anything(
        tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    journal = Journal(state)
    spec = spec_from_mapping({"name": "tiny", "weights": str(tiny_models["tiny-llama"]), "engine": "vllm",
                              "dtype": "bfloat16"})
    ctx = EngineContext(work_dir=tmp_path, device="cpu", device_budget_bytes=8 * GiB,
                        options={"vllm_command": [sys.executable, str(FAKE)], "env": {"FAKE_VLLM_STATE": str(state)},
                                 "max_model_len": 256})
    engine = VLLMEngine(spec, ctx)
    with pytest.raises(InvalidRequest) as info:
        engine.check_request(GenerationRequest(messages=[{"role": "user", "content": "x" * 1000}], max_tokens=8))
    assert info.value.param == "messages" and info.value.code == "context_length_exceeded"
    assert engine.check_request(GenerationRequest(prompt="hello", max_tokens=8)) == 5
    assert journal.starts() == [], "nothing was started for it"


def test_without_a_tokenizer_the_check_is_skipped(make_engine: Any) -> None:
    engine, _ = make_engine()
    assert engine.check_request(GenerationRequest(prompt="x" * 10000, max_tokens=8)) is None
