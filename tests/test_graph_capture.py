"""A CUDA-graph capture has its device alone against every model's batched steps (`engines/graph_capture.py`).

The gate is pure threading: these tests gate the world with events (who is inside when) and never
time anything; the last one runs it where it matters, several batched models sampling on one GPU.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from clearml_umem.engines.batching import gate_captures
from clearml_umem.engines.graph_capture import CaptureGate, gate_for

WAIT = 10.0
"""Bound on every wait in these tests (a failure, not a timing)."""


def in_thread(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


@contextmanager
def step_stuck_in_another_thread(gate: CaptureGate) -> Iterator[None]:
    """Another thread's step that does not end until the block does."""
    inside, release = threading.Event(), threading.Event()

    def stuck_step() -> None:
        with gate.step():
            inside.set()
            assert release.wait(WAIT)

    stuck = in_thread(stuck_step)
    assert inside.wait(WAIT)
    try:
        yield
    finally:
        release.set()
        stuck.join(WAIT)


def waiting_threads(gate: CaptureGate, count: int) -> None:
    """Wait until `count` threads are blocked on the gate (CPython's Condition keeps its waiters in `_waiters`)."""
    deadline = threading.Event()
    for _ in range(int(WAIT / 0.01)):
        with gate._cond:
            if len(gate._cond._waiters) == count:  # type: ignore[attr-defined]
                return
        deadline.wait(0.01)
    raise AssertionError(f"{count} thread(s) never waited on the gate")


def test_a_capture_waits_for_other_steps_and_new_steps_wait_for_it() -> None:
    gate = CaptureGate()
    log: list[str] = []
    other_inside, other_may_end = threading.Event(), threading.Event()
    capturing, capture_may_end = threading.Event(), threading.Event()

    def other_step() -> None:
        with gate.step():
            log.append("other step begins")
            other_inside.set()
            assert other_may_end.wait(WAIT)
            log.append("other step ends")

    def capturing_step() -> None:
        with gate.step(), gate.capture() as alone:
            assert alone
            log.append("capture begins")
            capturing.set()
            assert capture_may_end.wait(WAIT)
            log.append("capture ends")

    first = in_thread(other_step)
    assert other_inside.wait(WAIT)
    capturer = in_thread(capturing_step)
    with gate._cond:  # the capture is waiting for the other step
        assert gate._cond.wait_for(lambda: gate._waiting == 1, timeout=WAIT)
    def late_step() -> None:
        with gate.step():
            log.append("late step begins")

    late = in_thread(late_step)
    other_may_end.set()
    assert capturing.wait(WAIT)
    waiting_threads(gate, 1)  # the late step is blocked in the gate
    assert "late step begins" not in log
    capture_may_end.set()
    for thread in (first, capturer, late):
        thread.join(WAIT)
    assert log == ["other step begins", "other step ends", "capture begins", "capture ends", "late step begins"]
    assert (gate.captures, gate.skipped) == (1, 0)


def test_a_capture_inside_its_own_step_does_not_wait_for_itself() -> None:
    gate = CaptureGate(wait_s=WAIT)
    with gate.step(), gate.capture() as alone:
        assert alone
        assert gate._steps == 0 and gate._capturing
    assert gate._steps == 0 and not gate._capturing and gate.captures == 1


def test_two_captures_at_once_run_one_after_the_other() -> None:
    gate = CaptureGate()
    inside: list[int] = []
    overlap: list[int] = []
    both_in_step = threading.Barrier(2, timeout=WAIT)
    lock = threading.Lock()

    def capture_once(n: int) -> None:
        with gate.step():
            both_in_step.wait()
            with gate.capture() as alone:
                assert alone
                with lock:
                    inside.append(n)
                    if len(inside) > 1:
                        overlap.append(n)
                for _ in range(1000):  # give the other thread every chance to come in
                    pass
                with lock:
                    inside.remove(n)

    threads = [in_thread(lambda n=n: capture_once(n)) for n in range(2)]
    for thread in threads:
        thread.join(WAIT)
    assert not overlap and gate.captures == 2 and gate._steps == 0


def test_a_capture_stuck_behind_a_step_gives_up_and_nothing_is_held() -> None:
    gate = CaptureGate(wait_s=0.2)
    with step_stuck_in_another_thread(gate):
        with gate.step(), gate.capture() as alone:
            assert not alone
            assert gate._steps == 2  # this step counts again: it runs eagerly beside the stuck one
        assert gate.skipped == 1 and gate.captures == 0
        with gate.step():  # steps still begin
            pass
    assert gate._steps == 0 and not gate._capturing and gate._waiting == 0


def test_an_error_in_a_capture_leaves_the_gate_open() -> None:
    gate = CaptureGate()
    with pytest.raises(RuntimeError, match="capture failed"), gate.step(), gate.capture():
        raise RuntimeError("capture failed")
    assert gate._steps == 0 and not gate._capturing
    with gate.step(), gate.capture() as alone:
        assert alone


def test_one_gate_per_device() -> None:
    assert gate_for("cuda:0") is gate_for("cuda:0")
    assert gate_for("cuda:0") is not gate_for("cuda:1")


def test_transformers_captures_go_through_the_gate() -> None:
    """The installed transformers' `ModelRunner._capture_graph` is wrapped: in a gated step whose capture
    cannot begin (another step is stuck), the step's forward runs once, eagerly, without a graph."""
    from transformers.generation.continuous_batching.model_runner import ModelRunner

    assert gate_captures()
    gate = CaptureGate(wait_s=0.1)
    calls: list[tuple[Any, ...]] = []
    with step_stuck_in_another_thread(gate), gate.step():
        ModelRunner._capture_graph(object(), lambda *args: calls.append(args), None, "model", "batch")
    assert calls == [("model", "batch")] and gate.skipped == 1


@pytest.fixture
def gpu_engines(tiny_models: dict[str, Path]) -> Iterator[list[Any]]:
    from clearml_umem.engines import create_engine
    from clearml_umem.engines.base import EngineContext
    from clearml_umem.spec import spec_from_mapping
    from clearml_umem.tiers import Tier

    engines = []
    for n in range(3):
        weights = tiny_models["tiny-llama"]
        spec = spec_from_mapping({"name": f"{weights.name}-{n}", "weights": str(weights)})
        engine = create_engine(spec, EngineContext(work_dir=weights.parent, device="cuda", options={}))
        asyncio.run(engine.move(Tier.COLD, Tier.GPU))
        engines.append(engine)
    yield engines
    for engine in engines:
        asyncio.run(engine.close())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_several_models_sample_and_capture_graphs_on_one_gpu_at_once(gpu_engines: list[Any]) -> None:
    """What the first GPU proof with batching hit: one model captured a graph while another sampled, and
    every request of the sampling model failed. Prompts of many lengths make each model capture several
    shapes while the others step."""
    from clearml_umem.engines.base import GenerationRequest

    async def one(engine: Any, n: int) -> int:
        request = GenerationRequest(prompt="word " * (1 + 37 * n % 300), max_tokens=8, temperature=1.0)
        tokens = 0
        async for delta in engine.generate(request):
            tokens = delta.completion_tokens or tokens
        return tokens

    async def everyone() -> list[int]:
        return await asyncio.gather(*[one(engine, n) for n in range(24) for engine in gpu_engines])

    answers = asyncio.run(everyone())
    assert all(tokens > 0 for tokens in answers)
    for engine in gpu_engines:
        assert engine.batcher is not None and engine.batcher.steps > 0 and not engine.batcher.broken
    assert gate_for(str(gpu_engines[0].model.device)).captures > 0
