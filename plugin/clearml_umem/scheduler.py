"""The tier manager: which model lives where, and what happens next.

Pure logic with no I/O and no threads: every input (a request arrives, a request
finishes, a move completes, an operator places a model) returns the commands the runtime
must carry out, and the runtime reports their outcome back as further inputs. Time
comes from an injected clock, so tests drive it with fake engines and a fake clock.

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
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from clearml_umem.engines.base import Footprint
from clearml_umem.events import (
    Event,
    MemorySnapshot,
    RequestArrived,
    RequestDispatched,
    RequestRejected,
    TransitionFailed,
    TransitionFinished,
    TransitionStarted,
)
from clearml_umem.policy import Candidate, LRUPolicy, Policy
from clearml_umem.tiers import ALL_TIERS, Tier


class SchedulerError(ValueError):
    """A call the scheduler cannot accept (unknown model, tier the engine lacks...)."""


@dataclass(frozen=True)
class Move:
    model: str
    src: Tier
    dst: Tier


@dataclass(frozen=True)
class Dispatch:
    model: str
    request_id: str
    served_from: Tier


@dataclass(frozen=True)
class Reject:
    model: str
    request_id: str
    reason: str
    status: int = 503


@dataclass(frozen=True)
class Release:
    """The model left the catalog and is cold: the runtime may drop its engine."""

    model: str


Command = Move | Dispatch | Reject | Release


@dataclass
class _Waiting:
    request_id: str
    arrived: float
    served_from: Tier
    seq: int


@dataclass
class _Model:
    name: str
    footprints: dict[Tier, Footprint]
    tiers: frozenset[Tier]
    transits: dict[tuple[Tier, Tier], Tier] = field(default_factory=dict)
    tier: Tier = Tier.COLD
    moving_to: Tier | None = None
    in_flight: set[str] = field(default_factory=set)
    waiting: deque[_Waiting] = field(default_factory=deque)
    last_used: float = 0.0
    uses: int = 0
    draining: bool = False
    placement: Tier | None = None
    placement_since: tuple[float, int] = (0.0, 0)
    removing: bool = False
    oom_retried: bool = False
    retry_after: set[str] = field(default_factory=set)
    swap_in_seconds: dict[Tier, float] = field(default_factory=dict)

    def fp(self, tier: Tier) -> Footprint:
        return self.footprints.get(tier, Footprint())

    def move_peak(self, dst: Tier) -> Footprint:
        """The most a move to `dst` holds at once: the larger of both ends, and of the tier it
        passes through when its engine has no direct path (vLLM starts, then sleeps, for cold -> ram)."""
        ends = [self.fp(self.tier), self.fp(dst)]
        via = self.transits.get((self.tier, dst))
        if via is not None:
            ends.append(self.fp(via))
        return Footprint(max(f.device_bytes for f in ends), max(f.host_bytes for f in ends))

    @property
    def reserved(self) -> Footprint:
        """Memory held now; mid-move, the move's peak so a budget is never overrun."""
        if self.moving_to is None:
            return self.fp(self.tier)
        return self.move_peak(self.moving_to)

    @property
    def idle(self) -> bool:
        return not self.in_flight and not self.waiting and self.moving_to is None

    @property
    def wants_gpu_since(self) -> tuple[float, int] | None:
        """(time, arrival sequence) of the oldest wish for GPU: the sequence breaks clock ties."""
        times = [(w.arrived, w.seq) for w in self.waiting]
        if self.placement is Tier.GPU:
            times.append(self.placement_since)
        return min(times) if times else None


@dataclass(frozen=True)
class ModelState:
    """A read-only view for the admin page and the tests."""

    name: str
    tier: Tier
    moving_to: Tier | None
    in_flight: int
    waiting: int
    last_used: float
    uses: int
    draining: bool
    device_bytes: int
    host_bytes: int
    tiers: frozenset[Tier]


class Scheduler:
    def __init__(
        self,
        device_budget: int,
        host_budget: int,
        policy: Policy | None = None,
        clock: Callable[[], float] | None = None,
        emit: Callable[[Event], None] | None = None,
        backfill: bool = True,
    ) -> None:
        """`backfill=False` keeps strict arrival order (nothing loads while an older request's
        model waits for room): the old behaviour, kept for comparison in benchmarks."""
        if device_budget <= 0 or host_budget <= 0:
            raise SchedulerError(f"budgets must be positive (device {device_budget}, host {host_budget})")
        self.device_budget = device_budget
        self.host_budget = host_budget
        self.policy: Policy = policy or LRUPolicy()
        self._clock = clock or _monotonic
        self._emit = emit or (lambda event: None)
        self._models: dict[str, _Model] = {}
        self._seq = itertools.count()
        self.backfill = backfill

    # -- inputs ---------------------------------------------------------------------------

    def add_model(self, name: str, footprints: dict[Tier, Footprint], tiers: Iterable[Tier],
                  transits: Mapping[tuple[Tier, Tier], Tier] | None = None) -> None:
        """Register a cold model; `footprints` gives its memory per tier, as its engine reports it,
        `transits` the moves that pass through a third tier (src, dst) -> via."""
        tier_set = frozenset(tiers)
        if not {Tier.GPU, Tier.COLD} <= tier_set:
            raise SchedulerError(f"model {name!r}: an engine must support at least the gpu and cold tiers")
        if name in self._models and not self._models[name].removing:
            raise SchedulerError(f"model {name!r} is already registered")
        if name in self._models:
            model = self._models[name]
            model.removing = False
            model.footprints, model.tiers, model.transits = dict(footprints), tier_set, dict(transits or {})
            return
        self._models[name] = _Model(name=name, footprints=dict(footprints), tiers=tier_set,
                                    transits=dict(transits or {}))

    def remove_model(self, name: str) -> list[Command]:
        """Take a model out of service: waiting requests are refused, in-flight ones finish first."""
        model = self._get(name)
        model.removing = True
        model.placement = None
        cmds: list[Command] = []
        while model.waiting:
            w = model.waiting.popleft()
            cmds.append(self._reject(model, w.request_id, f"model {name!r} was removed from the catalog", 404))
        return cmds + self._pump()

    def request(self, name: str, request_id: str) -> list[Command]:
        model = self._get(name)
        now = self._clock()
        arrival_tier = model.tier
        if model.moving_to is not None and not model.moving_to.hotter_than(model.tier):
            arrival_tier = model.moving_to
        self._emit(RequestArrived(model=name, t=now, request_id=request_id, tier=arrival_tier))
        if model.removing:
            return [self._reject(model, request_id, f"model {name!r} was removed from the catalog", 404)]
        reason = self._never_fits(model)
        if reason:
            return [self._reject(model, request_id, reason, 503)]
        model.waiting.append(_Waiting(request_id, now, arrival_tier, next(self._seq)))
        return self._pump()

    def cancel(self, name: str, request_id: str) -> list[Command]:
        """A waiting request whose client went away; a dispatched one ends with `finished`."""
        model = self._get(name)
        model.waiting = deque(w for w in model.waiting if w.request_id != request_id)
        return self._pump()

    def finished(self, name: str, request_id: str) -> list[Command]:
        model = self._get(name)
        model.in_flight.discard(request_id)
        model.last_used = self._clock()
        return self._pump()

    def place(self, name: str, tier: Tier) -> list[Command]:
        """Ask for a model to be moved to `tier` as soon as it is idle (admin, benchmark, pre-warm).

        Raises SchedulerError for a tier its engine lacks or whose footprint exceeds a budget.
        """
        model = self._get(name)
        if tier not in model.tiers:
            supported = ", ".join(t.value for t in ALL_TIERS if t in model.tiers)
            raise SchedulerError(
                f"model {name!r} cannot be put in tier {tier.value!r}; its engine supports {supported}")
        if model.removing:
            raise SchedulerError(f"model {name!r} is being removed")
        if tier is Tier.GPU:
            reason = self._never_fits(model)
            if reason:
                raise SchedulerError(reason)
        fp = model.move_peak(tier) if model.moving_to is None else model.fp(tier)
        if fp.device_bytes > self.device_budget or fp.host_bytes > self.host_budget:
            via = model.transits.get((model.tier, tier)) if model.moving_to is None else None
            way = f" on its way to tier {tier.value!r} (through {via.value})" if via else f" in tier {tier.value!r}"
            raise SchedulerError(
                f"model {name!r} needs {_gb(fp.device_bytes)} on the device and {_gb(fp.host_bytes)} of host "
                f"memory{way}, over the budgets ({_gb(self.device_budget)} device, {_gb(self.host_budget)} host)")
        if model.tier is tier and model.moving_to is None:
            model.placement = None
            return []
        model.placement = tier
        model.placement_since = (self._clock(), next(self._seq))
        return self._pump()

    def transition_done(self, name: str, src: Tier, dst: Tier, seconds: float, bytes_moved: int,
                        footprints: Mapping[Tier, Footprint] | None = None,
                        host_copy: str | None = None) -> list[Command]:
        """A move ended well; `footprints`, when given, replace the model's (its engine measured them);
        `host_copy` says how a swap-out got its host copy ('kept' or 'copied'), for the metrics.

        Larger measured footprints can leave a budget overcommitted for a moment; the next
        load that needs room then evicts by the true numbers.
        """
        model = self._get(name)
        self._check_move(model, src, dst)
        model.tier, model.moving_to = dst, None
        if footprints:
            model.footprints = {**model.footprints, **footprints}
        if dst is Tier.GPU:
            model.oom_retried = False
            prev = model.swap_in_seconds.get(src)
            model.swap_in_seconds[src] = seconds if prev is None else 0.7 * prev + 0.3 * seconds
        if model.placement is dst:
            model.placement = None
            if dst is Tier.GPU:
                model.last_used = self._clock()
        self._emit(TransitionFinished(model=name, t=self._clock(), src=src, dst=dst, seconds=seconds,
                                      bytes_moved=bytes_moved, host_copy=host_copy))
        self._emit_memory()
        return self._pump()

    def transition_failed(self, name: str, src: Tier, dst: Tier, error: str, now_in: Tier,
                          out_of_memory: bool = False) -> list[Command]:
        """A move failed; `now_in` is where the runtime left the engine (COLD after it gave up on it)."""
        model = self._get(name)
        self._check_move(model, src, dst)
        model.tier, model.moving_to = now_in, None
        self._emit(TransitionFailed(model=name, t=self._clock(), src=src, dst=dst, error=error))
        self._emit_memory()
        cmds: list[Command] = []
        if dst is Tier.GPU and out_of_memory and not model.oom_retried:
            model.oom_retried = True
            cmds += self._evict_all_idle(except_for=name)
            model.retry_after = {c.model for c in cmds if isinstance(c, Move)}
            return cmds + self._pump()
        if model.placement is dst:
            model.placement = None
        if dst is Tier.GPU:
            model.oom_retried = False
            reason = f"model {name!r} could not be loaded to {dst.value}: {error}"
            while model.waiting:
                cmds.append(self._reject(model, model.waiting.popleft().request_id, reason, 503))
        return cmds + self._pump()

    # -- views ----------------------------------------------------------------------------

    def state(self, name: str) -> ModelState:
        m = self._get(name)
        fp = m.fp(m.tier)
        return ModelState(m.name, m.tier, m.moving_to, len(m.in_flight), len(m.waiting), m.last_used, m.uses,
                          m.draining, fp.device_bytes, fp.host_bytes, m.tiers)

    def states(self) -> list[ModelState]:
        return [self.state(n) for n in self._models]

    def __contains__(self, name: str) -> bool:
        return name in self._models

    @property
    def device_used(self) -> int:
        return sum(m.reserved.device_bytes for m in self._models.values())

    @property
    def host_used(self) -> int:
        return sum(m.reserved.host_bytes for m in self._models.values())

    # -- the decision loop ----------------------------------------------------------------

    def _pump(self) -> list[Command]:
        # Dispatch first with the drain marks of the last round (a hot model's queued
        # requests go before it can be chosen as a victim), then re-plan the marks and
        # dispatch again for models no longer needed as victims.
        cmds: list[Command] = self._dispatch_hot()
        for m in self._models.values():
            m.draining = False
        cmds += self._swap_in()
        cmds += self._dispatch_hot()
        cmds += self._placements()
        cmds += self._retire_removed()
        return cmds

    def _dispatch_hot(self) -> list[Command]:
        cmds: list[Command] = []
        now = self._clock()
        for m in self._models.values():
            if m.tier is not Tier.GPU or m.moving_to is not None or m.draining:
                continue
            while m.waiting:
                w = m.waiting.popleft()
                m.in_flight.add(w.request_id)
                m.last_used = now
                m.uses += 1
                self._emit(RequestDispatched(model=m.name, t=now, request_id=w.request_id,
                                             served_from=w.served_from, waited_s=now - w.arrived))
                cmds.append(Dispatch(m.name, w.request_id, w.served_from))
        return cmds

    def _swap_in(self) -> list[Command]:
        """Bring waiting models to GPU in the order their oldest request arrived.

        The first model that cannot get room yet has room made for it; the ones behind it
        may only load, from RAM or disk, into room it will not need once the moves under way
        have ended (backfill), so a stream of small requests cannot starve a big model, yet
        small models do not queue behind a swap that leaves them room. A model retrying after
        running out of device memory waits until the evictions made for it have ended.
        """
        wanting = [m for m in self._models.values()
                   if m.tier is not Tier.GPU and m.moving_to is None and not m.removing
                   and m.wants_gpu_since is not None]
        wanting.sort(key=lambda m: m.wants_gpu_since or (0.0, 0))
        cmds: list[Command] = []
        reserved: tuple[int, int] | None = None
        for m in wanting:
            m.retry_after = {n for n in m.retry_after if n in self._models and self._models[n].moving_to is not None}
            if m.retry_after:
                break
            need_device = m.fp(Tier.GPU).device_bytes - m.fp(m.tier).device_bytes
            need_host = m.fp(Tier.GPU).host_bytes - m.fp(m.tier).host_bytes
            if reserved is None:
                if self._fits(need_device, need_host):
                    cmds.append(self._start_move(m, Tier.GPU))
                    continue
                cmds += self._make_room(m, need_device, need_host)
                # what the first model still needs beyond what the moves under way will free
                pending_device, pending_host = self._pending_frees()
                reserved = (max(0, need_device - pending_device), max(0, need_host - pending_host))
                continue
            if not self.backfill:
                break
            # Not from cold: starting an engine is long and takes what the oldest model's own
            # load may need (vLLM starts one engine at a time, the disk). A victim of the room
            # just planned may be in this list: it is moving now.
            if (m.moving_to is None and m.tier is not Tier.COLD
                    and self._fits(need_device + reserved[0], max(need_host, 0) + reserved[1])):
                cmds.append(self._start_move(m, Tier.GPU))
        return cmds

    def _placements(self) -> list[Command]:
        """Operator-requested moves to a colder (or non-GPU) tier, once the model is idle."""
        cmds: list[Command] = []
        for m in list(self._models.values()):
            target = m.placement
            if target is None or target is Tier.GPU or m.moving_to is not None:
                continue
            if m.tier is target:
                m.placement = None
                continue
            if m.in_flight or m.waiting:
                continue
            peak, now = m.move_peak(target), m.fp(m.tier)
            need_device = peak.device_bytes - now.device_bytes
            need_host = peak.host_bytes - now.host_bytes
            if self._fits(need_device, need_host):
                cmds.append(self._start_move(m, target))
            else:
                cmds += self._make_room(m, need_device, need_host)
        return cmds

    def _retire_removed(self) -> list[Command]:
        cmds: list[Command] = []
        for m in list(self._models.values()):
            if not m.removing or m.moving_to is not None or m.in_flight:
                continue
            if m.tier is Tier.COLD:
                del self._models[m.name]
                cmds.append(Release(m.name))
            else:
                cmds.append(self._start_move(m, Tier.COLD))
        return cmds

    # -- making room ----------------------------------------------------------------------

    def _fits(self, need_device: int, need_host: int) -> bool:
        return (self.device_used + need_device <= self.device_budget
                and self.host_used + need_host <= self.host_budget)

    def _never_fits(self, model: _Model) -> str | None:
        fp = model.fp(Tier.GPU)
        if fp.device_bytes > self.device_budget:
            return (f"model {model.name!r} needs {_gb(fp.device_bytes)} on the device but the device budget is "
                    f"{_gb(self.device_budget)}: it can never be loaded")
        if fp.host_bytes > self.host_budget:
            return (f"model {model.name!r} needs {_gb(fp.host_bytes)} of host memory but the host budget is "
                    f"{_gb(self.host_budget)}: it can never be loaded")
        return None

    def _demotion_target(self, m: _Model) -> Tier:
        """The hottest tier below the current one that frees device memory; host room is fixed after.

        A model being removed goes straight to cold: parking it in RAM would only copy it for nothing.
        """
        if m.removing:
            return Tier.COLD
        for tier in ALL_TIERS:
            if not m.tier.hotter_than(tier) or tier not in m.tiers:
                continue
            frees_device = tier is Tier.COLD or m.fp(tier).device_bytes < m.fp(m.tier).device_bytes
            if frees_device and m.fp(tier).host_bytes <= self.host_budget:
                return tier
        return Tier.COLD

    def _candidates(self, exclude: str, *, for_host: bool) -> list[_Model]:
        out = []
        for m in self._models.values():
            if m.name == exclude or m.moving_to is not None or m.tier is Tier.COLD:
                continue
            fp = m.fp(m.tier)
            if (fp.host_bytes if for_host else fp.device_bytes) <= 0:
                continue
            if for_host and m.in_flight:
                continue
            out.append(m)
        return out

    def _ranked(self, models: list[_Model], *, for_host: bool) -> list[_Model]:
        by_name = {m.name: m for m in models}
        cands = []
        for m in models:
            dst = self._colder_for_host(m) if for_host else self._demotion_target(m)
            cands.append(Candidate(m.name, m.tier, m.fp(m.tier).device_bytes, m.fp(m.tier).host_bytes,
                                   m.last_used, m.uses, m.swap_in_seconds.get(dst)))
        return [by_name[c.name] for c in self.policy.rank(cands, self._clock())]

    def _make_room(self, incoming: _Model, need_device: int, need_host: int) -> list[Command]:
        """Plan demotions so that `incoming` fits; issue the ones that can start now.

        Idle models go first, in policy order; if that is not enough, busy models are
        marked draining (no new requests) and demoted when their last request finishes.
        Device victims go to the hottest tier that frees device memory (RAM first), or
        further down when that is not enough (a sleeping engine may keep some device
        memory). If host RAM cannot take them, the least valuable models already in RAM go
        down to disk, then victims skip RAM, and last, models waiting their turn for the
        GPU give their host memory back (the oldest request must not be stuck behind
        them). Nothing is issued unless the whole plan frees enough, so no model is
        evicted for nothing.
        """
        # Moves already under way give their memory back when they end: count it, or a second
        # input during a swap would pick a second victim for the same room. The incoming
        # model's own host memory is freed only once it is loaded, after the victims moved.
        pending_device, pending_host = self._pending_frees()
        short_device = need_device - (self.device_budget - self.device_used) - pending_device
        host_after = self.host_budget - self.host_used + pending_host - max(need_host, 0)

        plan: list[tuple[_Model, Tier]] = []
        if short_device > 0:
            pool = self._ranked(self._candidates(incoming.name, for_host=False), for_host=False)
            gained = 0
            for m in [m for m in pool if m.idle] + [m for m in pool if not m.idle]:
                if gained >= short_device:
                    break
                dst = self._demotion_target(m)
                gained += m.fp(m.tier).device_bytes - m.fp(dst).device_bytes
                host_after -= m.fp(dst).host_bytes - m.fp(m.tier).host_bytes
                plan.append((m, dst))
            if gained < short_device:
                gained, host_after = self._deepen(plan, short_device, gained, host_after)
            if gained < short_device:
                return []

        if host_after < 0:
            planned = {m.name for m, _ in plan}
            pool = [m for m in self._ranked(self._candidates(incoming.name, for_host=True), for_host=True)
                    if m.name not in planned]
            unwanted = [m for m in pool if not m.waiting and m.placement is None]
            queued = [m for m in pool if m.waiting or m.placement is not None]
            for m in unwanted:
                if host_after >= 0:
                    break
                host_after = self._plan_host_victim(plan, m, host_after)
            for i, (m, dst) in enumerate(plan):
                if host_after >= 0:
                    break
                if dst is Tier.RAM:
                    alt = self._colder_for_host(m, start=Tier.RAM)
                    host_after += m.fp(Tier.RAM).host_bytes - m.fp(alt).host_bytes
                    plan[i] = (m, alt)
            for m in queued:
                if host_after >= 0:
                    break
                host_after = self._plan_host_victim(plan, m, host_after)
            # Last, victims whose colder tier still holds host memory (an engine process, the
            # skeleton of a model on disk) go cold: without this, a model whose footprint fits
            # only with every other one cold would wait forever.
            for i, (m, dst) in enumerate(plan):
                if host_after >= 0:
                    break
                if dst is not Tier.COLD and m.fp(dst).host_bytes > 0:
                    host_after += m.fp(dst).host_bytes
                    plan[i] = (m, Tier.COLD)
            if host_after < 0:
                return []
        return self._issue(plan)

    def _deepen(self, plan: list[tuple[_Model, Tier]], short_device: int, gained: int,
                host_after: int) -> tuple[int, int]:
        """Send victims further down when the plan falls short, then drop those no longer needed.

        A victim's first choice may keep device memory (a sleeping engine's context).
        Returns the device bytes the plan frees and the host room left after it.
        """
        for i, (m, dst) in enumerate(plan):
            if gained >= short_device:
                break
            deeper = self._emptiest_tier(m)
            if m.fp(deeper).device_bytes < m.fp(dst).device_bytes:
                gained += m.fp(dst).device_bytes - m.fp(deeper).device_bytes
                host_after -= m.fp(deeper).host_bytes - m.fp(dst).host_bytes
                plan[i] = (m, deeper)
        for m, dst in reversed(list(plan)):
            frees = m.fp(m.tier).device_bytes - m.fp(dst).device_bytes
            if gained - frees < short_device:
                break
            gained -= frees
            host_after += m.fp(dst).host_bytes - m.fp(m.tier).host_bytes
            plan.pop()
        return gained, host_after

    def _emptiest_tier(self, m: _Model) -> Tier:
        """The hottest tier below the current one that holds the least device memory."""
        colder = [t for t in ALL_TIERS if m.tier.hotter_than(t) and t in m.tiers]
        return min(colder, key=lambda t: (m.fp(t).device_bytes, t.rank))

    def _plan_host_victim(self, plan: list[tuple[_Model, Tier]], m: _Model, host_after: int) -> int:
        """Put `m` first in the plan, going where it gives host RAM back; the host room left after."""
        dst = self._colder_for_host(m)
        plan.insert(0, (m, dst))
        return host_after + m.fp(m.tier).host_bytes - m.fp(dst).host_bytes

    def _pending_frees(self) -> tuple[int, int]:
        """Device and host bytes the moves under way will release when they end."""
        device = host = 0
        for m in self._models.values():
            if m.moving_to is not None:
                reserved, after = m.reserved, m.fp(m.moving_to)
                device += reserved.device_bytes - after.device_bytes
                host += reserved.host_bytes - after.host_bytes
        return device, host

    def _colder_for_host(self, m: _Model, start: Tier | None = None) -> Tier:
        """Where a model goes to give host RAM back: disk if its engine has that tier, else cold."""
        if m.removing:
            return Tier.COLD
        current = m.fp(start or m.tier).host_bytes
        if Tier.DISK in m.tiers and m.fp(Tier.DISK).host_bytes < current:
            return Tier.DISK
        return Tier.COLD

    def _issue(self, plan: list[tuple[_Model, Tier]]) -> list[Command]:
        """Start the planned demotions that can start now; busy victims drain.

        A demotion to RAM needs host room at once, which a move to disk planned beside it
        may not have released yet: such a move waits (the next input re-plans it).
        """
        cmds: list[Command] = []
        for m, dst in plan:
            if m.in_flight or m.moving_to is not None:
                m.draining = True
            elif self._move_fits(m, dst):
                cmds.append(self._start_move(m, dst))
        return cmds

    def _move_fits(self, m: _Model, dst: Tier) -> bool:
        """Whether the memory a move reserves on top of what the model holds now is free now."""
        now, end = m.fp(m.tier), m.fp(dst)
        return self._fits(max(0, end.device_bytes - now.device_bytes), max(0, end.host_bytes - now.host_bytes))

    def _evict_all_idle(self, except_for: str) -> list[Command]:
        """After an out-of-memory on wake, the device holds more than we counted: clear what we can."""
        cmds: list[Command] = []
        for m in self._models.values():
            if m.name == except_for or not m.idle or m.fp(m.tier).device_bytes <= 0:
                continue
            dst = self._demotion_target(m)
            if dst is Tier.RAM and self.host_used + m.fp(Tier.RAM).host_bytes > self.host_budget:
                dst = self._colder_for_host(m, start=Tier.RAM)
            cmds.append(self._start_move(m, dst))
        return cmds

    # -- helpers --------------------------------------------------------------------------

    def _start_move(self, m: _Model, dst: Tier) -> Move:
        src = m.tier
        m.moving_to = dst
        if dst is Tier.GPU:
            # Requests that arrived while the model was hotter (a draining model about to make
            # room) waited for this load: their first token counts against `src`, not the GPU.
            for w in m.waiting:
                if w.served_from.hotter_than(src):
                    w.served_from = src
        self._emit(TransitionStarted(model=m.name, t=self._clock(), src=src, dst=dst))
        self._emit_memory()
        return Move(m.name, src, dst)

    def _reject(self, m: _Model, request_id: str, reason: str, status: int) -> Reject:
        self._emit(RequestRejected(model=m.name, t=self._clock(), request_id=request_id, reason=reason))
        return Reject(m.name, request_id, reason, status)

    def _emit_memory(self) -> None:
        self._emit(MemorySnapshot(model="", t=self._clock(), device_used=self.device_used,
                                  device_budget=self.device_budget, host_used=self.host_used,
                                  host_budget=self.host_budget))

    def _check_move(self, m: _Model, src: Tier, dst: Tier) -> None:
        if m.tier is not src or m.moving_to is not dst:
            raise SchedulerError(f"model {m.name!r}: no move {src.value}->{dst.value} in progress "
                                 f"(state {m.tier.value}->{m.moving_to.value if m.moving_to else '-'})")

    def _get(self, name: str) -> _Model:
        try:
            return self._models[name]
        except KeyError:
            raise SchedulerError(f"unknown model {name!r}") from None


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _monotonic() -> float:
    import time

    return time.monotonic()
