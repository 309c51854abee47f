"""The vLLM server process on its own (against the fake server), its start gate, and the vLLM move tables."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from clearml_umem.engines.start_gate import StartGate, StartGates
from clearml_umem.engines.vllm_engine import AWAKE_ONLY_MOVES, SLEEP_MODE_MOVES, Step
from clearml_umem.engines.vllm_process import ProcessConfig, ProcessTimeouts, VLLMProcess
from clearml_umem.tiers import Tier
from tests.waiting import wait_until

GPU, RAM, DISK, COLD = Tier.GPU, Tier.RAM, Tier.DISK, Tier.COLD
FAKE = Path(__file__).parent / "fixtures" / "fake_vllm_server.py"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="engine processes need Linux")


@pytest.mark.parametrize(("src", "dst", "steps"), [
    (COLD, GPU, [(GPU, Step.START)]),
    (GPU, RAM, [(RAM, Step.SLEEP_RAM)]),
    (GPU, DISK, [(DISK, Step.SLEEP_DISK)]),
    (RAM, GPU, [(GPU, Step.WAKE)]),
    (DISK, GPU, [(GPU, Step.WAKE)]),
    (RAM, DISK, [(DISK, Step.STOP)]),
    (COLD, RAM, [(GPU, Step.START), (RAM, Step.SLEEP_RAM)]),
    (COLD, DISK, [(GPU, Step.START), (DISK, Step.SLEEP_DISK)]),
    (DISK, RAM, [(GPU, Step.WAKE), (RAM, Step.SLEEP_RAM)]),
    (GPU, COLD, [(COLD, Step.STOP)]),
    (RAM, COLD, [(COLD, Step.STOP)]),
    (DISK, COLD, [(COLD, Step.STOP)]),
])
def test_sleep_mode_moves(src: Tier, dst: Tier, steps: list) -> None:
    assert SLEEP_MODE_MOVES.route(src, dst) == steps


def test_without_sleep_mode_a_server_runs_or_is_stopped() -> None:
    assert AWAKE_ONLY_MOVES.tiers == frozenset({GPU, COLD}) and AWAKE_ONLY_MOVES.transits == {}
    assert AWAKE_ONLY_MOVES.route(COLD, GPU) == [(GPU, Step.START)]
    assert AWAKE_ONLY_MOVES.route(GPU, COLD) == [(COLD, Step.STOP)]


def test_one_gate_per_device() -> None:
    gates = StartGates()
    assert gates.for_device("cuda:0") is gates.for_device("cuda:0")
    assert gates.for_device("cuda:1") is not gates.for_device("cuda:0")
    assert gates.for_device("cuda:1").device == "cuda:1"


def test_a_gate_lets_one_start_through_at_a_time_in_each_loop() -> None:
    gate = StartGate("cuda")
    order: list[str] = []

    async def start(name: str) -> None:
        async with gate.turn():
            order.append(f"{name} in")
            await asyncio.sleep(0.05)
            order.append(f"{name} out")

    async def both() -> bool:
        first = asyncio.create_task(start("a"))
        await asyncio.sleep(0)
        busy = gate.busy
        await asyncio.gather(first, start("b"))
        return busy

    assert asyncio.run(both()) is True
    assert order == ["a in", "a out", "b in", "b out"]
    assert asyncio.run(both()) is True, "a new event loop gets a lock of its own"


@pytest.fixture
def fake_process(tmp_path: Path) -> Iterator[VLLMProcess]:
    state = tmp_path / "state"
    state.mkdir()
    (state / "behaviour.json").write_text(json.dumps({}))
    config = ProcessConfig(
        name="m", log_file=tmp_path / "vllm-m.log",
        command=lambda port: [sys.executable, str(FAKE), "--model", "m", "--port", str(port)],
        environment=lambda: {**os.environ, "FAKE_VLLM_STATE": str(state)},
        timeouts=ProcessTimeouts(start_s=20.0, stop_grace_s=3.0))
    proc = VLLMProcess(config, StartGate("cpu"))
    yield proc
    asyncio.run(proc.close())


@linux_only
def test_ensure_running_starts_once_and_again_after_a_death(fake_process: VLLMProcess) -> None:
    async def go() -> list[bool]:
        started = [await fake_process.ensure_running(), await fake_process.ensure_running()]
        assert fake_process.incarnation == 1 and (await fake_process.client().get("/health")).status_code == 200
        assert fake_process.pid is not None
        os.kill(fake_process.pid, signal.SIGKILL)
        assert await asyncio.to_thread(wait_until, lambda: not fake_process.running, 5)
        started.append(await fake_process.ensure_running())
        return started

    assert asyncio.run(go()) == [True, False, True]
    assert fake_process.restarts == 1 and fake_process.incarnation == 2
    assert fake_process.describe()["running"] and fake_process.last_start_s is not None


@linux_only
def test_restart_if_dead_leaves_a_newer_process_alone(fake_process: VLLMProcess) -> None:
    async def go() -> None:
        await fake_process.ensure_running()
        seen = fake_process.incarnation
        assert fake_process.pid is not None
        os.kill(fake_process.pid, signal.SIGKILL)
        assert await asyncio.to_thread(wait_until, lambda: not fake_process.running, 5)
        assert await fake_process.restart_if_dead(seen) is True
        assert await fake_process.restart_if_dead(seen) is False, "another caller restarted it already"

    asyncio.run(go())
    assert fake_process.restarts == 1 and fake_process.incarnation == 2


@linux_only
def test_stop_and_close(fake_process: VLLMProcess) -> None:
    async def go() -> None:
        await fake_process.ensure_running()
        await fake_process.stop()
        assert fake_process.pid is None and not fake_process.running and fake_process.describe()["url"] is None
        await fake_process.close()
        await fake_process.close()

    asyncio.run(go())
