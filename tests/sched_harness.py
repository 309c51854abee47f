"""A discrete-event simulation around the pure scheduler: a fake clock and fake engines.

The harness plays the runtime: it carries out the scheduler's commands against fake
engines that take a fake amount of time, feeds their outcome back, finishes dispatched
requests after their service time, and checks the scheduler's rules after every input.
Time only moves when the harness pops the next timed action, so no test ever sleeps.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from clearml_umem.commands import Command, Dispatch, Move, Reject, Release
from clearml_umem.events import Event
from clearml_umem.policy import Policy
from clearml_umem.scheduler import Scheduler
from clearml_umem.tiers import ALL_TIERS, Footprint, Tier

GB = 1_000_000_000


class FakeClock:
    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def footprints(size: int, tiers: Iterable[Tier] = ALL_TIERS, overhead: int = 0,
               device_overhead: int = 0, kept_copy: bool = False) -> dict[Tier, Footprint]:
    """A model of `size` bytes: weights on the device when hot, in host RAM when warm.

    `overhead` is host memory its engine holds in every tier but cold (a process);
    `device_overhead` is device memory a live engine keeps while asleep (a CUDA context);
    `kept_copy`: the host copy stays while hot (the transformers engine's default), so the
    GPU tier holds the weights in host RAM too.
    """
    table = {
        Tier.GPU: Footprint(size + device_overhead, overhead + (size if kept_copy else 0)),
        Tier.RAM: Footprint(device_overhead, size + overhead),
        Tier.DISK: Footprint(device_overhead, overhead),
        Tier.COLD: Footprint(0, 0),
    }
    return {t: table[t] for t in tiers}


DEFAULT_MOVE_SECONDS = {
    (Tier.COLD, Tier.GPU): 5.0,
    (Tier.DISK, Tier.GPU): 2.0,
    (Tier.RAM, Tier.GPU): 0.5,
}


def default_move_seconds(move: Move) -> float:
    return DEFAULT_MOVE_SECONDS.get((move.src, move.dst), 0.25)


@dataclass
class FakeEngine:
    """Where a model's weights really are, as the runtime would see it."""

    name: str
    fps: dict[Tier, Footprint]
    tiers: frozenset[Tier]
    transits: dict[tuple[Tier, Tier], Tier] = field(default_factory=dict)
    tier: Tier = Tier.COLD
    moving: Move | None = None
    in_flight: set[str] = field(default_factory=set)

    def held(self) -> Footprint:
        """Mid-move, the most it holds at once: both ends, and the tier it passes through."""
        if self.moving is None:
            return self.fps.get(self.tier, Footprint())
        passed = [self.moving.src, self.moving.dst]
        via = self.transits.get((self.moving.src, self.moving.dst))
        if via is not None:
            passed.append(via)
        held = [self.fps.get(t, Footprint()) for t in passed]
        return Footprint(max(f.device_bytes for f in held), max(f.host_bytes for f in held))


Failure = tuple[str, Tier, bool]
"""(error, tier the engine is left in, out_of_memory) for a move that fails."""


class Harness:
    def __init__(
        self,
        device_budget: int,
        host_budget: int,
        models: dict[str, dict[Tier, Footprint]] | None = None,
        *,
        transits: dict[str, dict[tuple[Tier, Tier], Tier]] | None = None,
        policy: Policy | None = None,
        move_seconds: Callable[[Move], float] = default_move_seconds,
        service_seconds: float | Callable[[str, str], float] = 1.0,
        fail: Callable[[Move], Failure | None] | None = None,
        auto_finish: bool = True,
        backfill: bool = True,
        fairness: bool = True,
        keep_alive: dict[str, float] | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        """`keep_alive`: per model, the seconds it may stay unused before it moves down a tier;
        `max_in_flight`: how many requests each model's engine runs at once."""
        self.clock = FakeClock()
        self.events: list[Event] = []
        self.sched = Scheduler(device_budget, host_budget, policy=policy, clock=self.clock, emit=self.events.append,
                               backfill=backfill, fairness=fairness)
        self.engines: dict[str, FakeEngine] = {}
        self.move_seconds = move_seconds
        self.service_seconds = service_seconds
        self.fail = fail
        self.auto_finish = auto_finish
        self.commands: list[Command] = []
        self.moves: list[Move] = []
        self.dispatched: dict[str, Dispatch] = {}
        self.dispatch_time: dict[str, float] = {}
        self.rejected: dict[str, Reject] = {}
        self.released: list[str] = []
        self.finished: set[str] = set()
        self.cancelled: set[str] = set()
        self.requests: dict[str, str] = {}
        self.max_device_used = 0
        self.max_host_used = 0
        self._queue: list[tuple[float, int, Callable[[], object]]] = []
        self._seq = itertools.count()
        self.max_in_flight = max_in_flight
        for name, fps in (models or {}).items():
            self.add_model(name, fps, transits=(transits or {}).get(name),
                           keep_alive=(keep_alive or {}).get(name, math.inf))

    # -- inputs, each followed by the invariant checks -----------------------------------

    def add_model(self, name: str, fps: dict[Tier, Footprint], tiers: Iterable[Tier] | None = None,
                  transits: dict[tuple[Tier, Tier], Tier] | None = None, keep_alive: float = math.inf) -> None:
        tier_set = frozenset(tiers if tiers is not None else fps)
        self.sched.add_model(name, fps, tier_set, transits, max_in_flight=self.max_in_flight, keep_alive=keep_alive)
        self.engines[name] = FakeEngine(name, dict(fps), tier_set, dict(transits or {}))
        self.check()

    def request(self, model: str, request_id: str, keep_alive: float | None = None) -> list[Command]:
        assert request_id not in self.requests, f"duplicate request id {request_id}"
        self.requests[request_id] = model
        return self._handle(self.sched.on_request(model, request_id, keep_alive=keep_alive))

    def tick(self) -> list[Command]:
        """The runtime's keep-alive timer firing at the current fake time."""
        return self._handle(self.sched.on_tick())

    def cancel(self, model: str, request_id: str) -> list[Command]:
        self.cancelled.add(request_id)
        return self._handle(self.sched.on_cancel(model, request_id))

    def finish(self, model: str, request_id: str) -> list[Command]:
        engine = self.engines[model]
        assert request_id in engine.in_flight, f"{request_id} is not running on {model}"
        engine.in_flight.discard(request_id)
        self.finished.add(request_id)
        return self._handle(self.sched.on_finished(model, request_id))

    def place(self, model: str, tier: Tier) -> list[Command]:
        return self._handle(self.sched.place(model, tier))

    def remove(self, model: str) -> list[Command]:
        return self._handle(self.sched.remove_model(model))

    def at(self, t: float, action: Callable[[], object]) -> None:
        """Schedule an input at absolute fake time `t`."""
        assert t >= self.clock.now, f"{t} is in the past ({self.clock.now})"
        heapq.heappush(self._queue, (t, next(self._seq), action))

    def run(self, until: float | None = None) -> None:
        """Carry out timed actions in time order until none is left (or the next is after `until`)."""
        while self._queue and (until is None or self._queue[0][0] <= until):
            t, _, action = heapq.heappop(self._queue)
            self.clock.advance(t - self.clock.now)
            action()
        if until is not None and until > self.clock.now:
            self.clock.advance(until - self.clock.now)

    @property
    def idle(self) -> bool:
        return not self._queue

    # -- executing commands ---------------------------------------------------------------

    def _handle(self, cmds: list[Command]) -> list[Command]:
        self.commands.extend(cmds)
        for cmd in cmds:
            if isinstance(cmd, Move):
                self._start_move(cmd)
            elif isinstance(cmd, Dispatch):
                self._dispatch(cmd)
            elif isinstance(cmd, Reject):
                assert cmd.request_id in self.requests, f"reject of unknown request {cmd.request_id}"
                assert cmd.request_id not in self.rejected and cmd.request_id not in self.dispatched, \
                    f"{cmd.request_id} answered twice"
                self.rejected[cmd.request_id] = cmd
            elif isinstance(cmd, Release):
                engine = self.engines[cmd.model]
                assert engine.tier is Tier.COLD and engine.moving is None and not engine.in_flight
                self.released.append(cmd.model)
        self.check()
        return cmds

    def _start_move(self, move: Move) -> None:
        engine = self.engines[move.model]
        assert engine.moving is None, f"{move} while {engine.moving} is running"
        assert engine.tier is move.src, f"{move} but the engine is in {engine.tier}"
        assert move.dst in engine.tiers and move.src is not move.dst, f"{move}: bad destination"
        assert not engine.in_flight, f"{move} while {sorted(engine.in_flight)} run on it"
        engine.moving = move
        self.moves.append(move)
        seconds = self.move_seconds(move)
        self._after(seconds, lambda: self._end_move(move, seconds))

    def _end_move(self, move: Move, seconds: float) -> list[Command]:
        engine = self.engines[move.model]
        assert engine.moving == move
        engine.moving = None
        failure = self.fail(move) if self.fail else None
        if failure is not None:
            error, now_in, oom = failure
            engine.tier = now_in
            return self._handle(self.sched.on_move_failed(move.model, move.src, move.dst, error, now_in,
                                                             out_of_memory=oom))
        engine.tier = move.dst
        src_fp, dst_fp = engine.fps.get(move.src, Footprint()), engine.fps.get(move.dst, Footprint())
        moved = max(src_fp.device_bytes, dst_fp.device_bytes)
        return self._handle(self.sched.on_move_done(move.model, move.src, move.dst, seconds, moved))

    def _dispatch(self, cmd: Dispatch) -> None:
        engine = self.engines[cmd.model]
        assert self.requests.get(cmd.request_id) == cmd.model, f"dispatch of unknown request {cmd}"
        assert cmd.request_id not in self.dispatched and cmd.request_id not in self.rejected, \
            f"{cmd.request_id} answered twice"
        assert engine.tier is Tier.GPU and engine.moving is None, f"{cmd} but {cmd.model} is not hot"
        engine.in_flight.add(cmd.request_id)
        self.dispatched[cmd.request_id] = cmd
        self.dispatch_time[cmd.request_id] = self.clock.now
        if self.auto_finish:
            s = self.service_seconds
            seconds = s(cmd.model, cmd.request_id) if callable(s) else s
            self._after(seconds, lambda: self.finish(cmd.model, cmd.request_id))

    def _after(self, seconds: float, action: Callable[[], object]) -> None:
        self.at(self.clock.now + seconds, action)

    # -- checks ---------------------------------------------------------------------------

    def check(self) -> None:
        s = self.sched
        assert s.device_used <= s.device_budget, f"device {s.device_used} > budget {s.device_budget}"
        assert s.host_used <= s.host_budget, f"host {s.host_used} > budget {s.host_budget}"
        held = [e.held() for e in self.engines.values()]
        real_device = sum(f.device_bytes for f in held)
        real_host = sum(f.host_bytes for f in held)
        assert real_device <= s.device_budget, f"engines hold {real_device} device bytes > {s.device_budget}"
        assert real_host <= s.host_budget, f"engines hold {real_host} host bytes > {s.host_budget}"
        self.max_device_used = max(self.max_device_used, real_device)
        self.max_host_used = max(self.max_host_used, real_host)
        for engine in self.engines.values():
            if engine.name not in s:
                continue
            st = s.state(engine.name)
            assert st.tier is engine.tier, f"{engine.name}: scheduler says {st.tier}, engine is in {engine.tier}"
            assert st.moving_to == (engine.moving.dst if engine.moving else None)
            assert st.in_flight == len(engine.in_flight)
            if st.in_flight:
                assert st.moving_to is None and st.tier is Tier.GPU, f"{engine.name} moves with requests in flight"

    # -- summaries ------------------------------------------------------------------------

    def loads(self, model: str | None = None) -> list[Move]:
        return [m for m in self.moves if m.dst is Tier.GPU and (model is None or m.model == model)]

    def evictions(self, model: str | None = None) -> list[Move]:
        return [m for m in self.moves if m.src is Tier.GPU and (model is None or m.model == model)]

    def unanswered(self) -> set[str]:
        return set(self.requests) - set(self.dispatched) - set(self.rejected)

    def events_of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]


def closed_loop(h: Harness, clients: int, plan: list[str]) -> dict[str, float]:
    """Play `clients` clients that each send their next request of `plan` (model names, in order)
    when their last one finishes, as load benchmarks do; returns each request's arrival time.
    Requests are named r0, r1, ... in plan order."""
    arrived: dict[str, float] = {}
    pending = iter(enumerate(plan))
    finish = h.finish

    def send() -> None:
        nxt = next(pending, None)
        if nxt is not None:
            rid = f"r{nxt[0]}"
            arrived[rid] = h.clock.now
            h.request(nxt[1], rid)

    def finish_and_send(model: str, request_id: str) -> list[Command]:
        cmds = finish(model, request_id)
        send()
        return cmds

    h.finish = finish_and_send  # type: ignore[method-assign]
    for _ in range(clients):
        h.at(h.clock.now, send)
    h.run()
    return arrived
