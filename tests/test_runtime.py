"""The asyncio Runtime against gated fake engines, in the style of Ollama's server/sched_test.go.

Every engine move blocks on a gate the test opens (or fails) itself, so the test decides
when a load ends and can put a cancellation, a failure or a shutdown exactly between two
steps. The scheduler is the real one. Nothing sleeps: the tests wait on events, and every
wait is bounded by `asyncio.wait_for`, so a hang fails in about a second instead of
stalling the suite.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from clearml_umem.engines.base import (
    Delta,
    EngineContext,
    EngineError,
    EngineOutOfMemory,
    Footprint,
    GenerationRequest,
    MoveResult,
)
from clearml_umem.engines.prompt_check import PromptBound
from clearml_umem.events import Event, RequestDispatched
from clearml_umem.runtime import Rejected, Runtime
from clearml_umem.spec import ModelSpec, spec_from_mapping
from clearml_umem.tiers import ALL_TIERS, Tier

T = TypeVar("T")

TIMEOUT = 2.0
SIZE = 600
"""Each fake model takes 600 bytes of device memory when hot: one fits the 1000-byte device, two do not."""
DEVICE_BUDGET = 1000
HOST_BUDGET = 10_000


class Gate:
    """One engine move, parked until the test opens it or fails it."""

    def __init__(self, src: Tier, dst: Tier) -> None:
        self.src, self.dst = src, dst
        self._event = asyncio.Event()
        self._error: BaseException | None = None

    def open(self) -> None:
        self._event.set()

    @property
    def is_open(self) -> bool:
        return self._event.is_set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        if self._error is not None:
            raise self._error


class GatedEngine:
    """Implements the Engine protocol; `move` waits for its gate; `close` counts, and fails a move
    still waiting as the real engines' closes do (a process start sees its process stopped)."""

    def __init__(self, spec: ModelSpec, log: list[str]) -> None:
        self.spec = spec
        self.tiers = frozenset(ALL_TIERS)
        self.transits: dict[tuple[Tier, Tier], Tier] = {}
        self.tier = Tier.COLD
        self.moves: list[tuple[Tier, Tier]] = []
        """Every move asked for, in order."""
        self.gates: asyncio.Queue[Gate] = asyncio.Queue()
        """Moves started and not yet taken by the test."""
        self.closes = 0
        self.gate: Gate | None = None
        """The move under way, if any."""
        self.moving = False
        self.closed_while_moving = False
        self._log = log

    def footprint(self, tier: Tier) -> Footprint:
        return {Tier.GPU: Footprint(SIZE, 0), Tier.RAM: Footprint(0, SIZE)}.get(tier, Footprint())

    async def move(self, src: Tier, dst: Tier) -> MoveResult:
        assert src is self.tier, f"{self.spec.name}: asked to move from {src} while in {self.tier}"
        self.moves.append((src, dst))
        gate = Gate(src, dst)
        self.moving = True
        self._log.append(f"{self.spec.name}: start {src.value}->{dst.value}")
        self.gates.put_nowait(gate)
        self.gate = gate
        try:
            await gate.wait()
        except Exception:
            self._log.append(f"{self.spec.name}: failed {src.value}->{dst.value}")
            raise
        finally:
            self.moving = False
            self.gate = None
        self.tier = dst
        self._log.append(f"{self.spec.name}: done {src.value}->{dst.value}")
        return MoveResult(bytes_moved=SIZE)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        yield Delta("ok", finish_reason="stop", prompt_tokens=1, completion_tokens=1)

    def describe(self) -> dict[str, Any]:
        return {"fake": True}

    async def close(self) -> None:
        self.closes += 1
        self.closed_while_moving |= self.moving
        if self.gate is not None and not self.gate.is_open:
            self.gate.fail(EngineError(f"{self.spec.name}: closed"))
        self.tier = Tier.COLD
        self._log.append(f"{self.spec.name}: close")

    async def next_gate(self, src: Tier, dst: Tier) -> Gate:
        """The next move this engine starts; it must be src -> dst."""
        gate = await within(self.gates.get())
        assert (gate.src, gate.dst) == (src, dst), \
            f"{self.spec.name}: expected {src}->{dst}, got {gate.src}->{gate.dst}"
        return gate


class World:
    """A Runtime whose factory builds gated engines, and what it did."""

    def __init__(self, tmp_path: Path, *names: str) -> None:
        self.log: list[str] = []
        self.built: list[GatedEngine] = []
        self.events: list[Event] = []
        self.runtime = Runtime(DEVICE_BUDGET, HOST_BUDGET, EngineContext(work_dir=tmp_path, device="cpu"),
                               engine_factory=self._build)
        self.runtime.bus.subscribe(self.events.append)
        self.engines: dict[str, GatedEngine] = {}
        for name in names:
            spec = spec_from_mapping({"name": name, "weights": str(tmp_path), "size_bytes": SIZE})
            self.runtime.add_model(spec)

    def _build(self, spec: ModelSpec, ctx: EngineContext) -> GatedEngine:
        engine = GatedEngine(spec, self.log)
        self.built.append(engine)
        self.engines[spec.name] = engine
        return engine

    def hold(self, model: str, request_id: str, release: asyncio.Event | None = None,
             on_enter: Callable[[], object] | None = None) -> HeldLease:
        """A client that takes a lease and keeps it until `release` is set (or at once without one);
        `on_enter` runs as soon as it holds the lease, before anything else gets to run."""
        return HeldLease(self.runtime, model, request_id, release, on_enter)

    def dispatched(self) -> list[str]:
        return [e.request_id for e in self.events if isinstance(e, RequestDispatched)]

    async def hot(self, model: str) -> None:
        """Load `model` through a request and let the request end."""
        client = self.hold(model, f"warm-{model}")
        gate = await self.engines[model].next_gate(Tier.COLD, Tier.GPU)
        gate.open()
        await within(client.task)
        assert self.runtime.state(model).tier is Tier.GPU


    async def placing_behind_an_eviction(self, hot: str, placed: str) -> tuple[asyncio.Task[Any], Gate]:
        """`hot` on the GPU, then a placement of `placed` there that must evict it first: the
        placement's task, and the gate that holds the eviction."""
        await self.hot(hot)
        placing = asyncio.create_task(self.runtime.place(placed, Tier.GPU))
        return placing, await self.engines[hot].next_gate(Tier.GPU, Tier.RAM)


class HeldLease:
    def __init__(self, runtime: Runtime, model: str, request_id: str, release: asyncio.Event | None,
                 on_enter: Callable[[], object] | None) -> None:
        self.served_from: Tier | None = None
        self.engine: Any = None
        self.entered = asyncio.Event()
        self._on_enter = on_enter
        self.task = asyncio.get_running_loop().create_task(self._run(runtime, model, request_id, release))

    async def _run(self, runtime: Runtime, model: str, request_id: str, release: asyncio.Event | None) -> None:
        async with runtime.lease(model, request_id) as lease:
            self.served_from, self.engine = lease.served_from, lease.engine
            self.entered.set()
            if self._on_enter is not None:
                self._on_enter()
            if release is not None:
                await release.wait()


async def within(aw: Awaitable[T] | Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
    return await asyncio.wait_for(aw, timeout)


async def settle(rounds: int = 20) -> None:
    """Let every ready callback run (no wall time passes): used only to show that something did NOT happen."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def raises(exc: type[BaseException], aw: Awaitable[Any]) -> BaseException:
    with pytest.raises(exc) as info:
        await within(aw)
    return info.value


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(within(scenario(), timeout=10))


# -- requests that go away ----------------------------------------------------------------


def test_request_cancelled_while_waiting_is_forgotten_and_others_are_served(tmp_path: Path) -> None:
    async def scenario() -> None:
        w = World(tmp_path, "a")
        rt, engine = w.runtime, w.engines["a"]
        gone, stays = w.hold("a", "gone"), w.hold("a", "stays")
        gate = await engine.next_gate(Tier.COLD, Tier.GPU)
        await settle()
        assert rt.state("a").waiting == 2

        gone.task.cancel()
        await raises(asyncio.CancelledError, gone.task)
        assert rt.state("a").waiting == 1, "the scheduler still counts the request that left"
        assert "gone" not in rt._waiters

        gate.open()
        await within(stays.task)
        assert stays.served_from is Tier.COLD and stays.engine is engine
        assert w.dispatched() == ["stays"] and not gone.entered.is_set()
        st = rt.state("a")
        assert (st.tier, st.moving_to, st.in_flight, st.waiting, st.uses) == (Tier.GPU, None, 0, 0, 1)
        assert engine.moves == [(Tier.COLD, Tier.GPU)] and engine.closes == 0
        assert rt._waiters == {} and not rt._moves
    run(scenario)


def test_only_waiter_cancelled_leaves_a_hot_idle_model(tmp_path: Path) -> None:
    """The load for a request that left still ends well; the next request is served without a move."""
    async def scenario() -> None:
        w = World(tmp_path, "a")
        rt, engine = w.runtime, w.engines["a"]
        gone = w.hold("a", "gone")
        gate = await engine.next_gate(Tier.COLD, Tier.GPU)
        gone.task.cancel()
        await raises(asyncio.CancelledError, gone.task)
        gate.open()
        await settle()
        st = rt.state("a")
        assert (st.tier, st.moving_to, st.in_flight, st.waiting, st.uses) == (Tier.GPU, None, 0, 0, 0)

        later = w.hold("a", "later")
        await within(later.task)
        assert later.served_from is Tier.GPU and w.dispatched() == ["later"]
        assert engine.moves == [(Tier.COLD, Tier.GPU)] and rt.state("a").in_flight == 0
    run(scenario)


def test_request_cancelled_just_after_dispatch_releases_the_model(tmp_path: Path) -> None:
    """The lease was granted, but the caller was cancelled before it could resume: the model is given back."""
    async def scenario() -> None:
        w = World(tmp_path, "a")
        rt, engine = w.runtime, w.engines["a"]
        seen: dict[str, object] = {}

        def cancel_gone() -> None:
            seen["in_flight"], seen["gone_done"] = rt.state("a").in_flight, gone.task.done()
            gone.task.cancel()

        # One scheduler step dispatches both, in arrival order, so `first` resumes before `gone`:
        # cancelling `gone` from there lands after its dispatch and before it runs.
        release_first = asyncio.Event()
        first = w.hold("a", "first", release_first, on_enter=cancel_gone)
        gone = w.hold("a", "gone")
        gate = await engine.next_gate(Tier.COLD, Tier.GPU)
        await settle()
        gate.open()
        await raises(asyncio.CancelledError, gone.task)
        assert seen == {"in_flight": 2, "gone_done": False} and w.dispatched() == ["first", "gone"]
        assert not gone.entered.is_set(), "the cancelled caller must not run with the lease"
        assert rt.state("a").in_flight == 1, "the cancelled caller's lease is still counted"

        release_first.set()
        await within(first.task)
        assert rt.state("a").in_flight == 0

        placing = asyncio.create_task(rt.place("a", Tier.RAM))
        (await engine.next_gate(Tier.GPU, Tier.RAM)).open()
        st = await within(placing)
        assert (st.tier, st.moving_to, st.in_flight, st.waiting) == (Tier.RAM, None, 0, 0)
        assert engine.moves == [(Tier.COLD, Tier.GPU), (Tier.GPU, Tier.RAM)]
    run(scenario)


def test_request_cancelled_inside_its_lease_gives_the_model_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        w = World(tmp_path, "a")
        rt, engine = w.runtime, w.engines["a"]
        client = w.hold("a", "busy", asyncio.Event())
        (await engine.next_gate(Tier.COLD, Tier.GPU)).open()
        await within(client.entered.wait())
        placing = asyncio.create_task(rt.place("a", Tier.RAM))
        await settle()
        assert rt.state("a").in_flight == 1 and engine.moves == [(Tier.COLD, Tier.GPU)], "moved under a request"

        client.task.cancel()
        await raises(asyncio.CancelledError, client.task)
        (await engine.next_gate(Tier.GPU, Tier.RAM)).open()
        st = await within(placing)
        assert (st.tier, st.in_flight) == (Tier.RAM, 0)
    run(scenario)


def test_dispatch_to_a_waiter_that_already_left(tmp_path: Path) -> None:
    """The caller was cancelled (its future too) but had not run yet when the load ended and
    the scheduler dispatched to it: the runtime finishes that request itself."""
    async def scenario() -> None:
        w = World(tmp_path, "a")
        rt, engine = w.runtime, w.engines["a"]
        gone, stays = w.hold("a", "gone"), w.hold("a", "stays")
        gate = await engine.next_gate(Tier.COLD, Tier.GPU)
        await settle()
        # Open the gate first, cancel second: the move's wake-up runs before the caller's,
        # so the scheduler dispatches to a waiter whose future is already cancelled.
        gate.open()
        gone.task.cancel()
        await raises(asyncio.CancelledError, gone.task)
        await within(stays.task)

        assert w.dispatched() == ["gone", "stays"], "the scheduler did dispatch to the one that left"
        assert not gone.entered.is_set() and stays.served_from is Tier.COLD
        st = rt.state("a")
        assert (st.tier, st.in_flight, st.waiting) == (Tier.GPU, 0, 0)
        assert rt._waiters == {}

        placing = asyncio.create_task(rt.place("a", Tier.RAM))
        (await engine.next_gate(Tier.GPU, Tier.RAM)).open()
        assert (await within(placing)).tier is Tier.RAM
    run(scenario)


# -- moves that fail ----------------------------------------------------------------------


def test_failed_load_closes_the_engine_and_rejects_the_waiters(tmp_path: Path) -> None:
    async def scenario() -> None:
        w = World(tmp_path, "a")
        rt, engine = w.runtime, w.engines["a"]
        clients = [w.hold("a", f"r{i}") for i in range(3)]
        gate = await engine.next_gate(Tier.COLD, Tier.GPU)
        await settle()
        gate.fail(EngineError("weights are corrupt"))
        for client in clients:
            err = await raises(Rejected, client.task)
            assert isinstance(err, Rejected) and err.status == 503
            assert "could not be loaded" in err.reason and "weights are corrupt" in err.reason
        assert w.dispatched() == [] and not any(c.entered.is_set() for c in clients)
        assert engine.closes == 1 and not engine.closed_while_moving
        st = rt.state("a")
        assert (st.tier, st.moving_to, st.in_flight, st.waiting) == (Tier.COLD, None, 0, 0)
        assert rt.memory()["device_used"] == 0
        assert "weights are corrupt" in rt.admin_view()[0]["last_error"]
        assert rt._waiters == {}

        # the model is not stuck: the next request loads it again
        again = w.hold("a", "again")
        (await engine.next_gate(Tier.COLD, Tier.GPU)).open()
        await within(again.task)
        assert again.served_from is Tier.COLD and rt.state("a").tier is Tier.GPU
    run(scenario)


def test_out_of_memory_load_evicts_and_retries_without_closing(tmp_path: Path) -> None:
    async def scenario() -> None:
        w = World(tmp_path, "a", "b")
        rt, a, b = w.runtime, w.engines["a"], w.engines["b"]
        await w.hot("b")
        # by the scheduler's numbers a fits beside b, but the device says otherwise
        rt.scheduler.device_budget = 2 * SIZE
        client = w.hold("a", "r")
        (await a.next_gate(Tier.COLD, Tier.GPU)).fail(EngineOutOfMemory("CUDA out of memory"))
        (await b.next_gate(Tier.GPU, Tier.RAM)).open()
        (await a.next_gate(Tier.COLD, Tier.GPU)).open()
        await within(client.task)
        assert client.served_from is Tier.COLD
        assert a.closes == 0 and b.closes == 0
        assert rt.state("a").tier is Tier.GPU and rt.state("b").tier is Tier.RAM
    run(scenario)


def test_place_waiting_on_a_failing_move_answers(tmp_path: Path) -> None:
    async def scenario() -> None:
        w = World(tmp_path, "a")
        rt, engine = w.runtime, w.engines["a"]
        placing = asyncio.create_task(rt.place("a", Tier.GPU))
        (await engine.next_gate(Tier.COLD, Tier.GPU)).fail(EngineError("driver gone"))
        err = await raises(Rejected, placing)
        assert isinstance(err, Rejected) and err.status == 503
        assert "to gpu" in err.reason and "driver gone" in err.reason
        assert engine.closes == 1
        assert (rt.state("a").tier, rt.state("a").moving_to) == (Tier.COLD, None)

        # a demotion that fails answers too, and leaves the model cold
        placing = asyncio.create_task(rt.place("a", Tier.GPU))
        (await engine.next_gate(Tier.COLD, Tier.GPU)).open()
        assert (await within(placing)).tier is Tier.GPU
        placing = asyncio.create_task(rt.place("a", Tier.RAM))
        (await engine.next_gate(Tier.GPU, Tier.RAM)).fail(RuntimeError("copy failed"))
        err = await raises(Rejected, placing)
        assert isinstance(err, Rejected) and "to ram" in err.reason and "copy failed" in err.reason
        assert engine.closes == 2 and rt.state("a").tier is Tier.COLD
        assert rt.memory()["device_used"] == 0 and rt.memory()["host_used"] == 0
    run(scenario)


def test_place_behind_a_waiting_load_that_fails_answers(tmp_path: Path) -> None:
    """Two callers wait on the same failing load: a request and a place() to GPU; both get an answer."""
    async def scenario() -> None:
        w = World(tmp_path, "a")
        rt, engine = w.runtime, w.engines["a"]
        client = w.hold("a", "r")
        gate = await engine.next_gate(Tier.COLD, Tier.GPU)
        placing = asyncio.create_task(rt.place("a", Tier.GPU))
        await settle()
        assert not placing.done()
        gate.fail(EngineError("boom"))
        await raises(Rejected, placing)
        await raises(Rejected, client.task)
        assert engine.moves == [(Tier.COLD, Tier.GPU)] and engine.closes == 1
    run(scenario)


# -- shutting down ------------------------------------------------------------------------


def test_close_does_not_wait_for_moves_it_closes_every_engine_at_once_and_their_moves_end(
        tmp_path: Path) -> None:
    """A move under way at shutdown is of no use to anyone: close() closes its engine at once (which
    makes the move fail, as a stopped vLLM start does) instead of waiting minutes for it, answers the
    placement, and returns once the moves have ended, each engine closed exactly once."""
    async def scenario() -> None:
        w = World(tmp_path, "a", "b", "c")
        rt = w.runtime
        await w.hot("b")
        waiting = w.hold("a", "waiting")  # a needs b's room: b is evicted first
        await w.engines["b"].next_gate(Tier.GPU, Tier.RAM)
        placing = asyncio.create_task(rt.place("c", Tier.RAM))
        await w.engines["c"].next_gate(Tier.COLD, Tier.RAM)

        await within(rt.close())  # no gate is opened: the moves end only through the closes
        err = await raises(Rejected, waiting.task)
        assert isinstance(err, Rejected) and err.status == 503 and "shutting down" in err.reason
        refused = await raises(Rejected, w.hold("a", "late").task)
        assert isinstance(refused, Rejected) and refused.status == 503
        ended = await raises(Rejected, placing)
        assert isinstance(ended, Rejected) and ended.status == 503 and "shutting down" in ended.reason

        assert [e.closes for e in w.built] == [1, 1, 1], "every engine closed exactly once"
        assert w.engines["b"].closed_while_moving and w.engines["c"].closed_while_moving, w.log
        assert "b: failed gpu->ram" in w.log and "c: failed cold->ram" in w.log
        assert w.engines["a"].moves == [], "no load starts for a request refused at shutdown"
        assert not rt._moves, "close() returned before the moves it stopped had ended"
    run(scenario)


def test_no_move_starts_once_close_has_begun(tmp_path: Path) -> None:
    """A place() to GPU needs b evicted first: the eviction ends after close() began, and the load
    it would have led to never starts (it would start an engine close() has already closed)."""
    async def scenario() -> None:
        w = World(tmp_path, "b", "c")
        rt = w.runtime
        placing, eviction = await w.placing_behind_an_eviction("b", "c")
        closing = asyncio.create_task(rt.close())
        await asyncio.sleep(0)  # close() has begun: it is closing the engines
        eviction.open()  # b's move succeeds after all, and would lead to c's load
        await within(closing)
        await settle()
        assert w.engines["c"].moves == [], w.log
        assert "shutting down" in str(await raises(Rejected, placing))
        assert [e.closes for e in w.built] == [1, 1]
        assert not rt._moves
    run(scenario)


def test_close_with_nothing_running_closes_every_engine_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        w = World(tmp_path, "a", "b")
        await w.hot("a")
        await within(w.runtime.close())
        assert [e.closes for e in w.built] == [1, 1]
        with pytest.raises(Rejected) as refused:
            async with w.runtime.lease("a", "after"):
                pass
        assert refused.value.status == 503
        with pytest.raises(Rejected):
            await within(w.runtime.place("b", Tier.RAM))
        assert w.dispatched() == ["warm-a"] and w.engines["b"].moves == []
        assert [e.closes for e in w.built] == [1, 1]
    run(scenario)


# -- placements that conflict --------------------------------------------------------------


def test_conflicting_placements_of_one_model_all_answer(tmp_path: Path) -> None:
    """gpu, then cold, then ram for the same model at once: the first two are overtaken (409 naming the
    later tier), the last is done; nobody waits forever."""
    async def scenario() -> None:
        w = World(tmp_path, "a")
        rt = w.runtime
        to_gpu = asyncio.create_task(rt.place("a", Tier.GPU))
        load = await w.engines["a"].next_gate(Tier.COLD, Tier.GPU)
        to_cold = asyncio.create_task(rt.place("a", Tier.COLD))
        to_ram = asyncio.create_task(rt.place("a", Tier.RAM))
        for task, later in ((to_gpu, "cold"), (to_cold, "ram")):
            err = await raises(Rejected, task)
            assert isinstance(err, Rejected) and err.status == 409 and err.code == "placement_overtaken"
            assert f"to tier '{later}'" in err.reason
        load.open()
        (await w.engines["a"].next_gate(Tier.GPU, Tier.RAM)).open()
        assert (await within(to_ram)).tier is Tier.RAM
    run(scenario)


def test_placements_of_several_models_with_room_for_one_all_answer(tmp_path: Path) -> None:
    """Each model reaches the GPU in turn; each placement answers when its model got there, even though
    the next one evicts it right after."""
    async def scenario() -> None:
        w = World(tmp_path, "a", "b", "c")
        rt = w.runtime
        tasks = {n: asyncio.create_task(rt.place(n, Tier.GPU)) for n in ("a", "b", "c")}
        (await w.engines["a"].next_gate(Tier.COLD, Tier.GPU)).open()
        assert (await within(tasks["a"])).name == "a"
        (await w.engines["a"].next_gate(Tier.GPU, Tier.RAM)).open()
        (await w.engines["b"].next_gate(Tier.COLD, Tier.GPU)).open()
        assert (await within(tasks["b"])).name == "b"
        (await w.engines["b"].next_gate(Tier.GPU, Tier.RAM)).open()
        (await w.engines["c"].next_gate(Tier.COLD, Tier.GPU)).open()
        assert (await within(tasks["c"])).tier is Tier.GPU
    run(scenario)


def test_a_placement_that_cannot_finish_in_time_answers_and_is_withdrawn(tmp_path: Path) -> None:
    async def scenario() -> None:
        w = World(tmp_path, "a")
        rt = w.runtime
        rt.placement_timeout_s = 0.05
        placing = asyncio.create_task(rt.place("a", Tier.GPU))
        load = await w.engines["a"].next_gate(Tier.COLD, Tier.GPU)
        err = await raises(Rejected, placing)
        assert isinstance(err, Rejected) and err.status == 503 and err.code == "placement_timeout"
        assert rt.scheduler._models["a"].wish is None, "nobody waits for it any more"
        load.open()
        await settle()
        assert rt.scheduler.state("a").tier is Tier.GPU, "the move under way still ends cleanly"
    run(scenario)


# -- engines that die on their own ----------------------------------------------------------


def test_an_engine_that_died_is_noticed_counted_cold_and_shown(tmp_path: Path) -> None:
    async def scenario() -> None:
        w = World(tmp_path, "a")
        rt = w.runtime
        await w.hot("a")
        engine = w.engines["a"]
        assert await rt.check_engines() == [], "alive: nothing to do"
        engine.died = lambda: "vLLM process exited with code -9"  # type: ignore[attr-defined]
        assert await rt.check_engines() == ["a"]
        st = rt.scheduler.state("a")
        assert st.tier is Tier.COLD and st.device_bytes == 0
        row = next(r for r in rt.admin_view() if r["name"] == "a")
        assert row["tier"] == "cold" and "exited with code -9" in row["last_error"]
        assert engine.closes == 1, "its state is reset before it is counted cold"
        assert await rt.check_engines() == [], "reported once"
        del engine.died  # type: ignore[attr-defined]
        waiting = w.hold("a", "after")
        (await engine.next_gate(Tier.COLD, Tier.GPU)).open()
        await within(waiting.task)
        assert waiting.served_from is Tier.COLD, "the next request starts it again"
    run(scenario)


# -- the check before a request waits --------------------------------------------------------


def test_a_small_request_is_checked_on_the_loop_only_by_an_engine_whose_check_is_quick(tmp_path: Path) -> None:
    """A thread per request cost a hot first token about a millisecond; a tokenizer still never runs on the loop."""
    async def scenario() -> None:
        world = World(tmp_path, "a")
        engine = world.engines["a"]
        threads: list[str] = []

        def check(request: GenerationRequest) -> None:
            threads.append(threading.current_thread().name)

        engine.check_request = check  # type: ignore[attr-defined]
        request = GenerationRequest(prompt="hi")
        await within(world.runtime.check_request("a", request, small=True))
        engine.quick_check = True  # type: ignore[attr-defined]
        await within(world.runtime.check_request("a", request, small=False))
        await within(world.runtime.check_request("a", request, small=True))
        main = threading.current_thread().name
        assert threads[0] != main and threads[1] != main, "without quick_check, or for a big request: a thread"
        assert threads[2] == main

    run(scenario)


def test_prompt_bounds_are_listed_under_each_name_a_request_may_use(tmp_path: Path) -> None:
    """The parser processes look a body's `model` up as sent: aliases map to their model's bound, a
    model's own name wins over another model's alias of it, and an engine that knows none is left out."""
    async def scenario() -> None:
        world = World(tmp_path)
        for name, aliases in (("a", ["short", "b"]), ("b", []), ("c", ["see"])):
            world.runtime.add_model(spec_from_mapping({"name": name, "weights": str(tmp_path), "size_bytes": SIZE,
                                                       "aliases": aliases}))
        world.engines["a"].prompt_bound = lambda: PromptBound(2048, 16)  # type: ignore[attr-defined]
        world.engines["b"].prompt_bound = lambda: PromptBound(4096, 13)  # type: ignore[attr-defined]
        world.engines["c"].prompt_bound = lambda: None  # type: ignore[attr-defined]
        assert world.runtime.prompt_bounds() == {"a": PromptBound(2048, 16), "short": PromptBound(2048, 16),
                                                 "b": PromptBound(4096, 13)}

    run(scenario)


def test_at_the_stop_loads_for_refused_requests_stop_while_running_requests_keep_their_models(
        tmp_path: Path) -> None:
    """SIGTERM (`stop_admitting`) answers the queue at once. A load that only those requests (or a
    placement) waited for is stopped then, its engine closed, rather than after the grace at
    `close()`: it would compete with the streams finishing. A model serving a request keeps its
    engine; an eviction under way runs on, and the load it made room for never starts. `close()`
    then closes each engine once."""
    async def scenario() -> None:
        w = World(tmp_path, "a", "b")
        rt = w.runtime
        await w.hot("a")
        release = asyncio.Event()
        running = w.hold("a", "running", release)
        await within(running.entered.wait())
        placing = asyncio.create_task(rt.place("b", Tier.RAM))
        await w.engines["b"].next_gate(Tier.COLD, Tier.RAM)
        queued = w.hold("b", "queued")
        await settle()

        rt.stop_admitting()
        refused = await raises(Rejected, queued.task)
        assert isinstance(refused, Rejected) and refused.status == 503
        await within(asyncio.wait(list(rt._moves)))
        assert w.engines["b"].closes == 1 and "b: failed cold->ram" in w.log, w.log
        assert rt.admin_view()[1]["last_error"] is None, "a stopped load is not a failure"
        assert w.engines["a"].closes == 0 and not running.task.done(), "the running request keeps its model"
        release.set()
        await within(running.task)

        await within(rt.close())
        assert [e.closes for e in w.built] == [1, 1], "each engine closed once"
        assert "shutting down" in str(await raises(Rejected, placing))

    run(scenario)


def test_at_the_stop_an_eviction_runs_on_and_the_load_it_made_room_for_never_starts(tmp_path: Path) -> None:
    async def scenario() -> None:
        w = World(tmp_path, "a", "b")
        rt = w.runtime
        placing, eviction = await w.placing_behind_an_eviction("a", "b")

        rt.stop_admitting()
        await settle()
        assert w.engines["a"].closes == 0, "an eviction is not stopped"
        eviction.open()
        await settle()
        assert rt.state("a").tier is Tier.RAM
        assert w.engines["b"].moves == [], "no load starts once the server is stopping"
        await within(rt.close())
        assert [e.closes for e in w.built] == [1, 1]
        assert "shutting down" in str(await raises(Rejected, placing))

    run(scenario)
