"""Making room: which models move down, and where, so that one more fits.

`plan_room` is a pure function of the models, the ledger and the policy: it returns a
`RoomPlan` and changes nothing (the way llama-swap's `EvictionFor` decides without acting).
The scheduler issues the plan; a plan that cannot free enough comes back with its
shortfall and no moves, so no model is ever moved for nothing.

The decision tree:
1. Device. Candidates are the models holding device memory and not moving, in policy
   order, idle ones before busy ones (busy ones drain: they take no new requests and move
   when their last one ends). Each goes to the hottest tier that frees device memory and
   fits the host budget (RAM first). Take them until the shortfall is covered.
   1a. Not enough: send victims further down (a sleeping engine keeps device memory), then
       drop the ones the deeper moves made unnecessary, from the last.
2. Host. If the device victims, plus the incoming model, need more host memory than is
   free (counting what moves under way give back):
   2a. models nobody waits for go down to disk (or cold), first;
   2b. device victims planned for RAM skip it and go to disk or cold;
   2c. models that are waiting their turn for the GPU give their host memory back;
   2d. victims whose tier still holds host memory (an engine process) go cold.
3. Still short on either budget: return the shortfall, move nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from clearml_umem.ledger import Holding, Ledger, footprint, frees
from clearml_umem.policy import Candidate, Policy
from clearml_umem.tiers import ALL_TIERS, Footprint, Tier


class Model(Holding, Protocol):
    """What the planner reads of a model, besides its memory."""

    @property
    def name(self) -> str: ...

    @property
    def tiers(self) -> frozenset[Tier]: ...

    @property
    def in_flight(self) -> Collection[str]: ...

    @property
    def waiting(self) -> Collection[object]: ...

    @property
    def placement(self) -> Tier | None: ...

    @property
    def removing(self) -> bool: ...

    @property
    def last_used(self) -> float: ...

    @property
    def uses(self) -> int: ...

    @property
    def swap_in_seconds(self) -> Mapping[Tier, float]: ...


@dataclass(frozen=True)
class Demotion:
    """One model to move down, in a plan."""

    model: str
    dst: Tier


@dataclass(frozen=True)
class RoomPlan:
    moves: tuple[Demotion, ...] = ()
    """In the order to issue them; a model in `drains` waits for its requests, then moves."""
    drains: frozenset[str] = field(default_factory=frozenset)
    shortfall: Footprint = Footprint()
    """What no plan could find; when not zero, `moves` is empty."""

    @property
    def enough(self) -> bool:
        return self.shortfall == Footprint()


def plan_room(models: Sequence[Model], ledger: Ledger, incoming: str, need: Footprint, policy: Policy,
              now: float) -> RoomPlan:
    """Moves that make `need` more bytes fit for `incoming`, counting the moves under way."""
    by_name = {m.name: m for m in models}
    short_device = need.device_bytes - ledger.free.device_bytes - ledger.pending.device_bytes
    host_room = ledger.free.host_bytes + ledger.pending.host_bytes - need.host_bytes

    # 1. device
    plan: tuple[Demotion, ...] = ()
    if short_device > 0:
        pool = ranked([m for m in models if _holds(m, incoming, host=False)], policy, now, ledger, host=False)
        plan = _device_victims([m for m in pool if _idle(m)] + [m for m in pool if not _idle(m)],
                               short_device, ledger)
        if _gained(plan, by_name) < short_device:
            plan = _deepened(plan, short_device, by_name)  # 1a
        if _gained(plan, by_name) < short_device:
            return RoomPlan(shortfall=Footprint(short_device - _gained(plan, by_name), 0))  # 3

    # 2. host
    room = host_room - _host_cost(plan, by_name)
    if room < 0:
        planned = {d.model for d in plan}
        pool = [m for m in ranked([m for m in models if _holds(m, incoming, host=True)], policy, now, ledger,
                                  host=True) if m.name not in planned]
        unwanted = [m for m in pool if not m.waiting and m.placement is None]
        queued = [m for m in pool if m.waiting or m.placement is not None]
        first, room = _host_victims(unwanted, room)  # 2a
        plan, room = _skip_ram(plan, room, by_name)  # 2b
        more_first, room = _host_victims(queued, room)  # 2c
        plan, room = _to_cold((*more_first, *first, *plan), room, by_name)  # 2d
        if room < 0:
            return RoomPlan(shortfall=Footprint(0, -room))  # 3
    return RoomPlan(moves=plan, drains=frozenset(d.model for d in plan if by_name[d.model].in_flight))


# -- where a model goes ---------------------------------------------------------------------


def demotion_target(m: Model, ledger: Ledger) -> Tier:
    """The hottest tier below the current one that frees device memory and fits the host budget.

    A model being removed goes straight to cold: parking it in RAM would only copy it for nothing.
    """
    if m.removing:
        return Tier.COLD
    for tier in ALL_TIERS:
        if not m.tier.hotter_than(tier) or tier not in m.tiers:
            continue
        frees_device = tier is Tier.COLD or footprint(m, tier).device_bytes < footprint(m, m.tier).device_bytes
        if frees_device and footprint(m, tier).host_bytes <= ledger.budget.host_bytes:
            return tier
    return Tier.COLD


def colder_for_host(m: Model, start: Tier | None = None) -> Tier:
    """Where a model goes to give host RAM back: disk if its engine has that tier, else cold."""
    if m.removing:
        return Tier.COLD
    current = footprint(m, start or m.tier).host_bytes
    if Tier.DISK in m.tiers and footprint(m, Tier.DISK).host_bytes < current:
        return Tier.DISK
    return Tier.COLD


def emptiest_tier(m: Model) -> Tier:
    """The hottest tier below the current one that holds the least device memory."""
    colder = [t for t in ALL_TIERS if m.tier.hotter_than(t) and t in m.tiers]
    return min(colder, key=lambda t: (footprint(m, t).device_bytes, t.rank))


def ranked(models: Sequence[Model], policy: Policy, now: float, ledger: Ledger, *, host: bool) -> list[Model]:
    """`models` in the policy's eviction order, each weighed by the tier it would go to."""
    by_name = {m.name: m for m in models}
    candidates = []
    for m in models:
        dst = colder_for_host(m) if host else demotion_target(m, ledger)
        here = footprint(m, m.tier)
        candidates.append(Candidate(m.name, m.tier, here.device_bytes, here.host_bytes, m.last_used, m.uses,
                                    m.swap_in_seconds.get(dst)))
    return [by_name[c.name] for c in policy.rank(candidates, now)]


# -- the steps --------------------------------------------------------------------------------


def _holds(m: Model, incoming: str, *, host: bool) -> bool:
    """A candidate: not the incoming model, not moving, not cold, holding the memory sought;
    for host memory also not serving (its memory is in use)."""
    if m.name == incoming or m.moving_to is not None or m.tier is Tier.COLD:
        return False
    here = footprint(m, m.tier)
    if (here.host_bytes if host else here.device_bytes) <= 0:
        return False
    return not (host and m.in_flight)


def _idle(m: Model) -> bool:
    return not m.in_flight and not m.waiting and m.moving_to is None


def _device_victims(pool: list[Model], short: int, ledger: Ledger) -> tuple[Demotion, ...]:
    plan: tuple[Demotion, ...] = ()
    gained = 0
    for m in pool:
        if gained >= short:
            break
        dst = demotion_target(m, ledger)
        gained += frees(m, dst).device_bytes
        plan = (*plan, Demotion(m.name, dst))
    return plan


def _deepened(plan: tuple[Demotion, ...], short: int, by_name: Mapping[str, Model]) -> tuple[Demotion, ...]:
    """Victims sent further down until the plan covers `short`, then the last ones no longer needed dropped."""
    gained = _gained(plan, by_name)
    deeper: list[Demotion] = []
    for d in plan:
        m = by_name[d.model]
        lower = emptiest_tier(m)
        if gained < short and footprint(m, lower).device_bytes < footprint(m, d.dst).device_bytes:
            gained += footprint(m, d.dst).device_bytes - footprint(m, lower).device_bytes
            d = Demotion(d.model, lower)
        deeper.append(d)
    keep = len(deeper)
    while keep:
        freed = frees(by_name[deeper[keep - 1].model], deeper[keep - 1].dst).device_bytes
        if gained - freed < short:
            break
        gained -= freed
        keep -= 1
    return tuple(deeper[:keep])


def _host_victims(pool: list[Model], room: int) -> tuple[tuple[Demotion, ...], int]:
    """Models giving their host memory back until `room` is not negative, the last chosen first."""
    chosen: tuple[Demotion, ...] = ()
    for m in pool:
        if room >= 0:
            break
        dst = colder_for_host(m)
        room += frees(m, dst).host_bytes
        chosen = (Demotion(m.name, dst), *chosen)
    return chosen, room


def _skip_ram(plan: tuple[Demotion, ...], room: int, by_name: Mapping[str, Model]) -> tuple[tuple[Demotion, ...], int]:
    out: list[Demotion] = []
    for d in plan:
        if room < 0 and d.dst is Tier.RAM:
            m = by_name[d.model]
            alt = colder_for_host(m, start=Tier.RAM)
            room += footprint(m, Tier.RAM).host_bytes - footprint(m, alt).host_bytes
            d = Demotion(d.model, alt)
        out.append(d)
    return tuple(out), room


def _to_cold(plan: tuple[Demotion, ...], room: int, by_name: Mapping[str, Model]) -> tuple[tuple[Demotion, ...], int]:
    """Without this, a model whose footprint fits only with every other one cold would wait forever."""
    out: list[Demotion] = []
    for d in plan:
        kept = footprint(by_name[d.model], d.dst).host_bytes
        if room < 0 and d.dst is not Tier.COLD and kept > 0:
            room += kept
            d = Demotion(d.model, Tier.COLD)
        out.append(d)
    return tuple(out), room


def _gained(plan: tuple[Demotion, ...], by_name: Mapping[str, Model]) -> int:
    return sum(frees(by_name[d.model], d.dst).device_bytes for d in plan)


def _host_cost(plan: tuple[Demotion, ...], by_name: Mapping[str, Model]) -> int:
    return sum(-frees(by_name[d.model], d.dst).host_bytes for d in plan)
