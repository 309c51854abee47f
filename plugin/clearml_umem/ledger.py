"""The memory ledger: what each model holds, what moves under way will give back, what fits.

One implementation of the arithmetic the scheduler and the planner both need, so that
"how much does this move need" has one answer everywhere:

- a model at rest holds its footprint in its tier;
- a model mid-move holds the move's *peak*: the larger of both ends, component by
  component, and of the tier the move passes through when its engine has no direct step
  (vLLM starts, then sleeps, for cold -> ram), so a budget is never overrun mid-move;
- a move *needs* its peak minus what the model holds now (never negative: memory to find);
- a move *frees*, when it ends, what it reserves minus its destination's footprint.

Pure: no I/O, no clock, nothing mutated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from clearml_umem.tiers import Footprint, Tier


class Holding(Protocol):
    """The memory side of one model, as the ledger reads it."""

    @property
    def footprints(self) -> Mapping[Tier, Footprint]: ...

    @property
    def transits(self) -> Mapping[tuple[Tier, Tier], Tier]: ...

    @property
    def tier(self) -> Tier: ...

    @property
    def moving_to(self) -> Tier | None: ...


def footprint(h: Holding, tier: Tier) -> Footprint:
    return h.footprints.get(tier, Footprint())


def peak(h: Holding, dst: Tier, src: Tier | None = None) -> Footprint:
    """The most a move from `src` (default: where the model is) to `dst` holds at once."""
    src = h.tier if src is None else src
    held = footprint(h, src).max(footprint(h, dst))
    via = h.transits.get((src, dst))
    return held.max(footprint(h, via)) if via is not None else held


def reserved(h: Holding) -> Footprint:
    """Memory held now; mid-move, the move's peak."""
    return footprint(h, h.tier) if h.moving_to is None else peak(h, h.moving_to)


def need(h: Holding, dst: Tier) -> Footprint:
    """Memory a move to `dst` takes on top of what the model holds now."""
    return (peak(h, dst) - footprint(h, h.tier)).clipped()


def frees(h: Holding, dst: Tier) -> Footprint:
    """What the model gives back by going from its tier to `dst` (negative: what it takes)."""
    return footprint(h, h.tier) - footprint(h, dst)


@dataclass(frozen=True)
class Ledger:
    """Budgets against what every model holds; built fresh from the models for each decision."""

    budget: Footprint
    used: Footprint
    pending: Footprint
    """What the moves under way give back when they end."""

    @classmethod
    def of(cls, budget: Footprint, holdings: Iterable[Holding]) -> Ledger:
        used = pending = Footprint()
        for h in holdings:
            held = reserved(h)
            used += held
            if h.moving_to is not None:
                pending += held - footprint(h, h.moving_to)
        return cls(budget, used, pending)

    @property
    def free(self) -> Footprint:
        return self.budget - self.used

    def fits(self, extra: Footprint) -> bool:
        """Whether `extra` more bytes fit now, on both budgets."""
        after = self.used + extra
        return after.device_bytes <= self.budget.device_bytes and after.host_bytes <= self.budget.host_bytes

    def within_budget(self, fp: Footprint) -> bool:
        """Whether `fp` alone fits the budgets at all (with every other model gone)."""
        return fp.device_bytes <= self.budget.device_bytes and fp.host_bytes <= self.budget.host_bytes
