"""Reused daemon workers: an idle one takes the next call (no thread start on the event loop), a
stuck call never delays another, an idle worker holds nothing of its last call and ends in time."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import pytest

from clearml_umem.daemon_workers import DaemonWorkers, run_abandonable


def wait_until(condition, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_an_idle_worker_takes_the_next_call_without_a_thread_start(monkeypatch: pytest.MonkeyPatch) -> None:
    workers = DaemonWorkers("test-reuse")

    async def calls() -> list[threading.Thread]:
        first = await run_abandonable(workers, threading.current_thread)
        assert wait_until(lambda: workers.busy == 0)
        starts: list[str] = []
        real_start = threading.Thread.start

        def counted(thread: threading.Thread) -> None:
            starts.append(thread.name)
            real_start(thread)

        monkeypatch.setattr(threading.Thread, "start", counted)
        later = [await run_abandonable(workers, threading.current_thread) for _ in range(5)]
        assert starts == [], "a call started a thread although a worker was idle"
        return [first, *later]

    ran_on = asyncio.run(calls())
    assert len({t.ident for t in ran_on}) == 1 and ran_on[0].daemon and ran_on[0].name == "test-reuse-1"


def test_a_caller_hears_of_its_result_only_once_the_worker_is_idle_again() -> None:
    """A task that awaits one call after another (prompt checks) submits the next as soon as it hears
    of the last: told before its worker counted itself idle, it found none and started a thread
    (seen in CI under load). Here the worker is held between its call's end and its counting itself
    idle (the workers' lock, taken by the test): the caller must not hear of its result meanwhile."""
    workers = DaemonWorkers("test-order")
    inside, go = threading.Event(), threading.Event()

    def call() -> int:
        inside.set()
        assert go.wait(5)
        return 7

    async def scenario() -> None:
        result = asyncio.ensure_future(run_abandonable(workers, call))
        assert await asyncio.to_thread(inside.wait, 5)
        with workers._lock:  # the worker cannot count itself idle now
            go.set()
            await asyncio.sleep(0.3)  # time for a result told too early to arrive
            assert not result.done(), "the caller heard of its result before the worker was idle"
        assert await asyncio.wait_for(result, 5) == 7
        assert workers._idle == 1 and workers.busy == 0

    asyncio.run(scenario())


def test_a_stuck_call_does_not_delay_another_and_errors_reach_the_caller() -> None:
    workers = DaemonWorkers("test-stuck")
    release = threading.Event()

    def fail() -> None:
        raise ValueError("the tokenizer said no")

    async def scenario() -> None:
        stuck = asyncio.ensure_future(run_abandonable(workers, release.wait, 30))
        await asyncio.sleep(0.05)
        assert await asyncio.wait_for(run_abandonable(workers, lambda: 7), 5) == 7
        with pytest.raises(ValueError, match="said no"):
            await run_abandonable(workers, fail)
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck

    try:
        asyncio.run(scenario())
        assert workers.busy == 1, "the abandoned call still runs in its worker"
    finally:
        release.set()
    assert wait_until(lambda: workers.busy == 0)


def test_an_idle_worker_holds_nothing_of_its_last_call_and_ends() -> None:
    workers = DaemonWorkers("test-idle", idle_s=0.2)

    class Weights:
        pass

    weights = Weights()
    gone = weakref.ref(weights)
    running = workers.start(lambda w: time.sleep(0.05), weights)
    assert running.is_alive()
    running.join(5)
    assert not running.is_alive()
    del weights
    assert wait_until(lambda: gc.collect() is not None and gone() is None), "an idle worker kept the model"
    assert wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("test-idle-")])
    assert workers.busy == 0
    # after its workers ended, a call starts one again
    assert workers.start(lambda: None).join(5) is None and wait_until(lambda: workers.busy == 0)


def test_many_calls_at_once_each_get_a_worker() -> None:
    workers = DaemonWorkers("test-many", idle_s=0.5)
    barrier = threading.Barrier(8, timeout=10)
    handles = [workers.start(barrier.wait) for _ in range(8)]
    for handle in handles:
        handle.join(15)
    assert not any(h.is_alive() for h in handles), "eight calls waiting for each other need eight workers"
    assert not barrier.broken
    again = [workers.start(time.sleep, 0.01) for _ in range(8)]
    for handle in again:
        handle.join(15)
    assert not any(h.is_alive() for h in again)
    assert len([t for t in threading.enumerate() if t.name.startswith("test-many-")]) <= 8
