"""The tier manager: which model lives where, and what happens next.

Pure logic with no I/O and no threads, in the style of a sans-IO state machine: every
input (`on_request`, `on_cancel`, `on_finished`, `on_move_done`, `on_move_failed`,
`place`, catalog changes) returns the commands (`commands.py`) the runtime must carry
out, and the runtime reports their outcome back as further inputs. Time comes from an
injected clock, so tests drive it with fake engines and a fake clock. Memory arithmetic
lives in the ledger (`ledger.py`), room-making in the planner (`planner.py`), a model's
turn on the GPU and dispatching within it in `turns.py`, operators' placements in
`placements.py`.

Rules it keeps:
- a model with in-flight requests is never moved;
- budgets (device bytes, host bytes) are never exceeded, counting a model mid-move at
  the larger of its two footprints;
- a model that can never fit is refused at once, with the numbers;
- requests wait in arrival order instead of evicting a busy model: a model chosen to
  make room stops taking new requests (it drains), so each swap serves everything queued
  for the incoming model and swaps never outnumber what the arrival order implies; a
  younger model may load ahead only into room the oldest one will not need;
- no request is dropped: each one is dispatched, or rejected with a reason.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from clearml_umem import ledger
from clearml_umem.commands import Command, Dispatch, Move, PlacementEnded, Reject, Release
from clearml_umem.errors import NotFound, SchedulerError
from clearml_umem.events import (
    EngineLost,
    Event,
    MemorySnapshot,
    MoveFailed,
    MoveFinished,
    MoveStarted,
    RequestArrived,
    RequestRejected,
)
from clearml_umem.ledger import Ledger, footprint
from clearml_umem.model_state import ModelRecord, ModelState, OomRetry, Waiting
from clearml_umem.placements import PlacementRefused, colder_moves, end_wish, make_wish, refuse_impossible, withdraw
from clearml_umem.planner import colder_for_host, demotion_target, plan_room
from clearml_umem.policy import LRUPolicy, Policy
from clearml_umem.tiers import Footprint, Tier
from clearml_umem.turns import FAIRNESS_MIN_S, FAIRNESS_MULTIPLE, dispatch_hot, start_turn
from clearml_umem.units import fmt_bytes

__all__ = ["FAIRNESS_MIN_S", "FAIRNESS_MULTIPLE", "Command", "Dispatch", "ModelState", "Move", "PlacementEnded",
           "PlacementRefused", "Reject", "Release", "Scheduler", "SchedulerError", "UnknownModel"]


class UnknownModel(SchedulerError, NotFound):
    """A model the scheduler does not know."""


class Scheduler:
    def __init__(
        self,
        device_budget: int,
        host_budget: int,
        policy: Policy | None = None,
        clock: Callable[[], float] | None = None,
        emit: Callable[[Event], None] | None = None,
        backfill: bool = True,
        max_waiting: int | None = None,
        fairness: bool = True,
    ) -> None:
        """`backfill=False` keeps strict arrival order (nothing loads while an older request's
        model waits for room): the old behaviour, kept for comparison in benchmarks.
        `max_waiting` bounds each model's queue: a request beyond it is refused with a 429.
        `fairness=False` strands a draining model's queued requests until it comes back (strict order)."""
        if device_budget <= 0 or host_budget <= 0:
            raise SchedulerError(f"budgets must be positive (device {device_budget}, host {host_budget})")
        self.device_budget = device_budget
        self.host_budget = host_budget
        self.policy: Policy = policy or LRUPolicy()
        self._clock = clock or _monotonic
        self._emit = emit or (lambda event: None)
        self._models: dict[str, ModelRecord] = {}
        self._draining: frozenset[str] = frozenset()
        self._seq = itertools.count()
        self.backfill = backfill
        self.fairness = fairness
        if max_waiting is not None and max_waiting < 1:
            raise SchedulerError(f"max_waiting must be at least 1, got {max_waiting}")
        self.max_waiting = max_waiting

    # -- inputs ---------------------------------------------------------------------------

    def add_model(self, name: str, footprints: dict[Tier, Footprint], tiers: Iterable[Tier],
                  transits: Mapping[tuple[Tier, Tier], Tier] | None = None,
                  max_in_flight: int | None = None, keep_alive: float = math.inf) -> None:
        """Register a cold model; `footprints` gives its memory per tier, as its engine reports it,
        `transits` the moves that pass through a third tier (src, dst) -> via, `max_in_flight`
        how many requests its engine may run at once (the others wait in its queue), `keep_alive`
        the seconds it may stay unused before it moves down a tier (inf: never)."""
        if max_in_flight is not None and max_in_flight < 1:
            raise SchedulerError(f"model {name!r}: max_in_flight must be at least 1, got {max_in_flight}")
        if not keep_alive >= 0:
            raise SchedulerError(f"model {name!r}: keep_alive must be >= 0, got {keep_alive}")
        tier_set = frozenset(tiers)
        if not {Tier.GPU, Tier.COLD} <= tier_set:
            raise SchedulerError(f"model {name!r}: an engine must support at least the gpu and cold tiers")
        if name in self._models and not self._models[name].removing:
            raise SchedulerError(f"model {name!r} is already registered")
        if name in self._models:
            model = self._models[name]
            model.removing = False
            model.footprints, model.tiers, model.transits = dict(footprints), tier_set, dict(transits or {})
            model.max_in_flight = max_in_flight
            model.keep_alive = model.keep_alive_now = keep_alive
            return
        self._models[name] = ModelRecord(name=name, footprints=dict(footprints), tiers=tier_set,
                                         transits=dict(transits or {}), max_in_flight=max_in_flight,
                                         keep_alive=keep_alive, keep_alive_now=keep_alive)

    def remove_model(self, name: str) -> list[Command]:
        """Take a model out of service: new requests are refused, the ones already waiting and in
        flight are served first (their clients asked while it was in the catalog)."""
        model = self._get(name)
        model.removing = True
        cmds: list[Command] = end_wish(model, "failed", f"model {name!r} was removed from the catalog")
        return cmds + self._pump()

    def on_request(self, name: str, request_id: str, keep_alive: float | None = None) -> list[Command]:
        """A request arrives; `keep_alive` (seconds, inf: never), when it gives one, is how long the
        model may stay unused after it (Ollama's per-request keep_alive); without one the model's own."""
        model = self._get(name)
        now = self._clock()
        if keep_alive is not None and not keep_alive >= 0:
            raise SchedulerError(f"keep_alive must be >= 0, got {keep_alive}")
        model.keep_alive_now = model.keep_alive if keep_alive is None else keep_alive
        arrival_tier = model.tier
        if model.moving_to is not None and not model.moving_to.hotter_than(model.tier):
            arrival_tier = model.moving_to
        self._emit(RequestArrived(model=name, t=now, request_id=request_id, tier=arrival_tier))
        if model.removing:
            return [self._reject(model, request_id, f"model {name!r} was removed from the catalog", 404)]
        reason = self._never_fits(model)
        if reason:
            return [self._reject(model, request_id, reason, 503)]
        if self.max_waiting is not None and len(model.waiting) >= self.max_waiting:
            return [self._reject(model, request_id, f"model {name!r} has {len(model.waiting)} requests waiting, "
                                 "the most this server queues; retry later", 429)]
        model.waiting.append(Waiting(request_id, now, arrival_tier, next(self._seq)))
        return self._pump()

    def on_cancel(self, name: str, request_id: str) -> list[Command]:
        """A waiting request whose client went away; a dispatched one ends with `on_finished`."""
        model = self._get(name)
        model.waiting = deque(w for w in model.waiting if w.request_id != request_id)
        return self._pump()

    def on_finished(self, name: str, request_id: str) -> list[Command]:
        model = self._get(name)
        model.in_flight.discard(request_id)
        model.last_used = self._clock()
        started = model.dispatched_at.pop(request_id, None)
        if started is not None:
            ran = model.last_used - started
            prev = model.service_seconds
            model.service_seconds = ran if prev is None else 0.8 * prev + 0.2 * ran
        return self._pump()

    def place(self, name: str, tier: Tier, placement_id: str | None = None) -> list[Command]:
        """Ask for a model to be moved to `tier` as soon as it is idle (admin, benchmark, pre-warm).

        Raises PlacementRefused for a tier its engine lacks or whose footprint exceeds a budget.
        With a `placement_id`, a `PlacementEnded` command says when it is done, failed, or
        overtaken by a later placement of the same model to another tier: every caller gets
        an answer. A later placement to the same tier joins the earlier one.
        """
        model = self._get(name)
        refuse_impossible(model, tier, self._ledger(), self._never_fits(model) if tier is Tier.GPU else None)
        cmds, done = make_wish(model, tier, placement_id, self._clock(), self._seq)
        return cmds if done else cmds + self._pump()

    def withdraw(self, name: str, placement_id: str) -> list[Command]:
        """A placement's caller gave up (hung up, timed out): the wish goes when nobody else waits for it."""
        if not withdraw(self._models.get(name), placement_id):
            return []
        return self._pump()

    def on_tick(self) -> list[Command]:
        """Time passed: the runtime's timer calls this so that keep-alives expire without other input."""
        return self._pump()

    def on_move_done(self, name: str, src: Tier, dst: Tier, seconds: float, bytes_moved: int,
                     footprints: Mapping[Tier, Footprint] | None = None,
                     host_copy: str | None = None, landing: bool = False) -> list[Command]:
        """A move ended well; `footprints`, when given, replace the model's (its engine measured them);
        `host_copy` says how a swap-out got its host copy ('kept' or 'copied'), for the metrics.
        `landing`: a swap-in whose weights still arrive while the model serves (pipelined); the
        swap's own time and bytes come with `on_move_landed` once its copy ended.

        Larger measured footprints can leave a budget overcommitted for a moment; the next
        load that needs room then evicts by the true numbers.
        """
        model = self._get(name)
        self._check_move(model, src, dst)
        model.tier, model.moving_to = dst, None
        model.settled_at = self._clock()
        if footprints:
            model.footprints = {**model.footprints, **footprints}
        if dst is Tier.GPU:
            model.oom_retry = None
            if not landing:
                self._count_swap_in(model, src, seconds)
            if self.fairness:
                model.turn = start_turn(model, self._clock())
        ended: list[Command] = []
        if model.placement is dst:
            ended = end_wish(model, "done")
            if dst is Tier.GPU:
                model.last_used = self._clock()
        if not landing:
            self._emit(MoveFinished(model=name, t=self._clock(), src=src, dst=dst, seconds=seconds,
                                          bytes_moved=bytes_moved, host_copy=host_copy))
        self._emit_memory()
        return ended + self._pump()

    def on_move_landed(self, name: str, src: Tier, seconds: float, bytes_moved: int) -> list[Command]:
        """A pipelined swap-in's copy ended `seconds` after its move began: that is the swap's time
        (its miss cost, the turn it earns, the metrics' swap-in), though the model served meanwhile."""
        model = self._models.get(name)
        if model is None:
            return []
        self._count_swap_in(model, src, seconds)
        if self.fairness and model.tier is Tier.GPU and model.turn is not None:
            # the turn began with the swap-in measured before; now the one just taken counts too
            fresh = start_turn(model, model.turn.start)
            if fresh.until > model.turn.until:
                model.turn = fresh
        self._emit(MoveFinished(model=name, t=self._clock(), src=src, dst=Tier.GPU, seconds=seconds,
                                      bytes_moved=bytes_moved))
        return self._pump()

    @staticmethod
    def _count_swap_in(model: ModelRecord, src: Tier, seconds: float) -> None:
        prev = model.swap_in_seconds.get(src)
        model.swap_in_seconds[src] = seconds if prev is None else 0.7 * prev + 0.3 * seconds

    def on_move_failed(self, name: str, src: Tier, dst: Tier, error: str, now_in: Tier,
                       out_of_memory: bool = False) -> list[Command]:
        """A move failed; `now_in` is where the runtime left the engine (COLD after it gave up on it).

        A load to the GPU that ran out of device memory retries once, after every idle model
        has left the device: the device held more than was counted.
        """
        model = self._get(name)
        self._check_move(model, src, dst)
        model.tier, model.moving_to = now_in, None
        self._emit(MoveFailed(model=name, t=self._clock(), src=src, dst=dst, error=error))
        self._emit_memory()
        cmds: list[Command] = []
        if dst is Tier.GPU and out_of_memory and model.oom_retry is None:
            cmds += self._evict_all_idle(except_for=name)
            model.oom_retry = OomRetry(frozenset(c.model for c in cmds if isinstance(c, Move)))
            return cmds + self._pump()
        if model.placement is dst:
            cmds += end_wish(model, "failed", f"could not move model {name!r} to {dst.value}: {error}")
        if dst is Tier.GPU:
            model.oom_retry = None
            reason = f"model {name!r} could not be loaded to {dst.value}: {error}"
            while model.waiting:
                cmds.append(self._reject(model, model.waiting.popleft().request_id, reason, 503))
        return cmds + self._pump()

    def on_engine_lost(self, name: str, reason: str) -> list[Command]:
        """The model's engine died on its own (a killed process): it holds nothing any more, so
        it is cold; requests still running on it fail by themselves. A move under way reports
        its own failure instead."""
        model = self._get(name)
        if model.moving_to is not None or model.tier is Tier.COLD:
            return []
        lost = model.tier
        model.tier = Tier.COLD
        model.turn = None
        self._emit(EngineLost(model=name, t=self._clock(), tier=lost, reason=reason))
        self._emit_memory()
        return self._pump()

    # -- views ----------------------------------------------------------------------------

    def state(self, name: str) -> ModelState:
        """Memory is what the ledger counts for it: mid-move, the move's peak, so that the rows of an
        admin view add up to the totals while a move runs."""
        m = self._get(name)
        fp = ledger.reserved(m)
        return ModelState(m.name, m.tier, m.moving_to, len(m.in_flight), len(m.waiting), m.last_used, m.uses,
                          m.name in self._draining, fp.device_bytes, fp.host_bytes, m.tiers,
                          expires_at=self.expires_at(name), keep_alive=m.keep_alive_now)

    def expires_at(self, name: str) -> float | None:
        """When the model, unused until then, moves down a tier by its keep-alive; None when it will not
        (busy, moving, placed by hand, already on disk or cold, or kept forever)."""
        m = self._get(name)
        if (m.tier not in (Tier.GPU, Tier.RAM) or not m.idle or m.removing or m.wish is not None
                or math.isinf(m.keep_alive_now) or self._expiry_target(m) is None):
            return None
        return max(m.last_used, m.settled_at) + m.keep_alive_now

    def states(self) -> list[ModelState]:
        return [self.state(n) for n in self._models]

    def __contains__(self, name: str) -> bool:
        return name in self._models

    @property
    def device_used(self) -> int:
        return self._ledger().used.device_bytes

    @property
    def host_used(self) -> int:
        return self._ledger().used.host_bytes

    # -- the decision loop ----------------------------------------------------------------

    def _pump(self) -> list[Command]:
        """After every input, in this order:

        1. dispatch the queued requests of hot models, with last round's drain marks (a hot
           model's queued requests go before it can be chosen to make room again);
        2. bring waiting models to the GPU in arrival order, making room (this round's marks);
        3. dispatch again, for models no longer needed to make room;
        4. carry out placements to colder tiers of idle models;
        5. retire models that left the catalog.
        """
        cmds: list[Command] = self._dispatch_hot()
        swap_ins, self._draining = self._swap_in()
        cmds += swap_ins + self._dispatch_hot()
        placed, drains = self._placements()
        self._draining |= drains
        return cmds + placed + self._retire_removed() + self._expire()

    def _dispatch_hot(self) -> list[Command]:
        return dispatch_hot(list(self._models.values()), self._draining, self._clock(), self._emit)

    def _swap_in(self) -> tuple[list[Command], frozenset[str]]:
        """Bring waiting models to GPU in the order their oldest request arrived.

        The first model that cannot get room yet has room made for it; the ones behind it
        may only load, from RAM or disk, into room it will not need once the moves under way
        have ended (backfill), so a stream of small requests cannot starve a big model, yet
        small models do not queue behind a swap that leaves them room. A model retrying after
        running out of device memory waits until the evictions made for it have ended.
        Returns the moves started and the models that drain to make room.
        """
        wanting = [m for m in self._models.values()
                   if m.tier is not Tier.GPU and m.moving_to is None and (not m.removing or m.waiting)
                   and m.wants_gpu_since is not None]
        wanting.sort(key=lambda m: m.wants_gpu_since or (0.0, 0))
        cmds: list[Command] = []
        drains: frozenset[str] = frozenset()
        reserved: Footprint | None = None
        for m in wanting:
            if m.oom_retry is not None:
                m.oom_retry = OomRetry(frozenset(n for n in m.oom_retry.waiting_for
                                                  if n in self._models and self._models[n].moving_to is not None))
                if m.oom_retry.waiting_for:
                    break
            need = ledger.need(m, Tier.GPU)
            if reserved is None:
                if self._ledger().fits(need):
                    cmds.append(self._start_move(m, Tier.GPU))
                    continue
                started, drains = self._make_room(m, need)
                cmds += started
                # what the first model still needs beyond what the moves under way will free
                reserved = (need - self._ledger().pending).clipped()
                continue
            if not self.backfill:
                break
            # Not from cold: starting an engine is long and takes what the oldest model's own
            # load may need (vLLM starts one engine at a time, the disk). A victim of the room
            # just planned may be in this list: it is moving now.
            if m.moving_to is None and m.tier is not Tier.COLD and self._ledger().fits(need + reserved):
                cmds.append(self._start_move(m, Tier.GPU))
        return cmds, drains

    def _placements(self) -> tuple[list[Command], frozenset[str]]:
        return colder_moves(self._models.values(), self._ledger, self._start_move, self._make_room)

    def _retire_removed(self) -> list[Command]:
        cmds: list[Command] = []
        for m in list(self._models.values()):
            if not m.removing or m.moving_to is not None or m.in_flight or m.waiting:
                continue
            if m.tier is Tier.COLD:
                del self._models[m.name]
                cmds.append(Release(m.name))
            else:
                cmds.append(self._start_move(m, Tier.COLD))
        return cmds

    def _expire(self) -> list[Command]:
        """Models unused for their keep-alive move down one tier: gpu -> ram (disk when the host
        budget has no room), ram -> disk; each step waits a keep-alive again. Never a model with
        a request in flight or waiting, one that moves, or one an operator placed."""
        now = self._clock()
        cmds: list[Command] = []
        for m in self._models.values():
            due = self.expires_at(m.name)
            if due is None or due > now or m.name in self._draining:
                continue
            dst = self._expiry_target(m)
            if dst is not None and self._ledger().fits(ledger.need(m, dst)):
                cmds.append(self._start_move(m, dst, reason=f"unused for {now - max(m.last_used, m.settled_at):.0f} s "
                                                             f"(keep_alive {m.keep_alive_now:g} s)"))
        return cmds

    def _expiry_target(self, m: ModelRecord) -> Tier | None:
        """The next tier down that frees memory: ram from the GPU when it fits the host budget, else disk,
        else cold (an engine without those tiers); None from disk or cold."""
        if m.tier is Tier.GPU:
            if Tier.RAM in m.tiers and self._ledger().fits(ledger.need(m, Tier.RAM)):
                return Tier.RAM
            return Tier.DISK if Tier.DISK in m.tiers else Tier.COLD
        if m.tier is Tier.RAM:
            return Tier.DISK if Tier.DISK in m.tiers else Tier.COLD
        return None

    # -- making room ----------------------------------------------------------------------

    def _make_room(self, incoming: ModelRecord, need: Footprint) -> tuple[list[Command], frozenset[str]]:
        """Plan the demotions that let `incoming` fit and start the ones that can start now.

        Busy victims drain. A demotion to RAM needs host room at once, which a move to disk
        planned beside it may not have released yet: such a move waits (the next input
        re-plans it).
        """
        plan = plan_room(list(self._models.values()), self._ledger(), incoming.name, need, self.policy,
                         self._clock())
        cmds: list[Command] = []
        for d in plan.moves:
            m = self._models[d.model]
            if d.model not in plan.drains and self._ledger().fits(ledger.need(m, d.dst)):
                cmds.append(self._start_move(m, d.dst))
        return cmds, plan.drains

    def _evict_all_idle(self, except_for: str) -> list[Command]:
        """After an out-of-memory on wake, the device holds more than we counted: clear what we can."""
        cmds: list[Command] = []
        for m in self._models.values():
            if m.name == except_for or not m.idle or footprint(m, m.tier).device_bytes <= 0:
                continue
            dst = demotion_target(m, self._ledger())
            if dst is Tier.RAM and self.host_used + footprint(m, Tier.RAM).host_bytes > self.host_budget:
                dst = colder_for_host(m, start=Tier.RAM)
            cmds.append(self._start_move(m, dst))
        return cmds

    def _never_fits(self, model: ModelRecord) -> str | None:
        fp = footprint(model, Tier.GPU)
        if fp.device_bytes > self.device_budget:
            return (f"model {model.name!r} needs {fmt_bytes(fp.device_bytes)} on the device but the device budget is "
                    f"{fmt_bytes(self.device_budget)}: it can never be loaded")
        if fp.host_bytes > self.host_budget:
            return (f"model {model.name!r} needs {fmt_bytes(fp.host_bytes)} of host memory but the host budget is "
                    f"{fmt_bytes(self.host_budget)}: it can never be loaded")
        return None

    # -- helpers --------------------------------------------------------------------------

    def _ledger(self) -> Ledger:
        return Ledger.of(Footprint(self.device_budget, self.host_budget), self._models.values())

    def _start_move(self, m: ModelRecord, dst: Tier, reason: str = "") -> Move:
        src = m.tier
        m.moving_to = dst
        if src is Tier.GPU:
            m.turn = None
        if dst is Tier.GPU:
            # Requests that arrived while the model was hotter (a draining model about to make
            # room) waited for this load: their first token counts against `src`, not the GPU.
            for w in m.waiting:
                if w.served_from.hotter_than(src):
                    w.served_from = src
        self._emit(MoveStarted(model=m.name, t=self._clock(), src=src, dst=dst))
        self._emit_memory()
        return Move(m.name, src, dst, reason)

    def _reject(self, m: ModelRecord, request_id: str, reason: str, status: int) -> Reject:
        self._emit(RequestRejected(model=m.name, t=self._clock(), request_id=request_id, reason=reason))
        return Reject(m.name, request_id, reason, status)

    def _emit_memory(self) -> None:
        used = self._ledger().used
        self._emit(MemorySnapshot(model="", t=self._clock(), device_used=used.device_bytes,
                                  device_budget=self.device_budget, host_used=used.host_bytes,
                                  host_budget=self.host_budget))

    def _check_move(self, m: ModelRecord, src: Tier, dst: Tier) -> None:
        if m.tier is not src or m.moving_to is not dst:
            raise SchedulerError(f"model {m.name!r}: no move {src.value}->{dst.value} in progress "
                                 f"(state {m.tier.value}->{m.moving_to.value if m.moving_to else '-'})")

    def _get(self, name: str) -> ModelRecord:
        try:
            return self._models[name]
        except KeyError:
            raise UnknownModel(f"unknown model {name!r}") from None


def _monotonic() -> float:
    import time

    return time.monotonic()
