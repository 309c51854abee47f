"""An operator's placement of a model (`POST /admin/models/{name}/place`): the wish, who waits for
it, how it ends (done, overtaken, failed), and the idle models it moves to colder tiers.

Pure logic over the scheduler's model records; the scheduler calls these and owns the moves.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

from clearml_umem import ledger
from clearml_umem.commands import Command, Move, PlacementEnded
from clearml_umem.errors import InvalidInput, SchedulerError
from clearml_umem.ledger import Ledger, footprint
from clearml_umem.model_state import ModelRecord, Wish
from clearml_umem.tiers import ALL_TIERS, Footprint, Tier
from clearml_umem.units import fmt_bytes


class PlacementRefused(SchedulerError, InvalidInput):
    """A placement that can never be done: a tier the engine lacks, or a footprint over the budgets."""

    param = "tier"
    code = "invalid_placement"


def refuse_impossible(model: ModelRecord, tier: Tier, ledger_now: Ledger, never_fits: str | None) -> None:
    """Raise PlacementRefused for a tier the engine lacks, a model being removed, or a footprint
    over the budgets (`never_fits`: why the model can never be hot, when it cannot)."""
    name = model.name
    if tier not in model.tiers:
        supported = ", ".join(t.value for t in ALL_TIERS if t in model.tiers)
        raise PlacementRefused(f"model {name!r} cannot be put in tier {tier.value!r}; its engine supports {supported}")
    if model.removing:
        raise PlacementRefused(f"model {name!r} is being removed")
    if tier is Tier.GPU and never_fits:
        raise PlacementRefused(never_fits)
    fp = ledger.peak(model, tier) if model.moving_to is None else footprint(model, tier)
    if not ledger_now.within_budget(fp):
        via = model.transits.get((model.tier, tier)) if model.moving_to is None else None
        way = f" on its way to tier {tier.value!r} (through {via.value})" if via else f" in tier {tier.value!r}"
        budget = ledger_now.budget
        raise PlacementRefused(
            f"model {name!r} needs {fmt_bytes(fp.device_bytes)} on the device and {fmt_bytes(fp.host_bytes)} of "
            f"host memory{way}, over the budgets ({fmt_bytes(budget.device_bytes)} device, "
            f"{fmt_bytes(budget.host_bytes)} host)")


def end_wish(m: ModelRecord, outcome: str, reason: str = "") -> list[Command]:
    """Clear the model's wish; its waiting callers learn how it ended."""
    wish, m.wish = m.wish, None
    if wish is None or not wish.ids:
        return []
    return [PlacementEnded(m.name, wish.ids, outcome, reason)]


def make_wish(model: ModelRecord, tier: Tier, placement_id: str | None, now: float,
              seq: itertools.count[int]) -> tuple[list[Command], bool]:
    """Record the wish (a later one to the same tier joins it, one to another tier overtakes it);
    the commands ending earlier wishes, and whether it is done already (the model is there)."""
    ids = (placement_id,) if placement_id else ()
    cmds: list[Command] = []
    if model.wish is not None and model.wish.tier is tier:
        ids = model.wish.ids + ids
    elif model.wish is not None:
        cmds += end_wish(model, "overtaken", f"a later placement of model {model.name!r} to tier "
                                             f"{tier.value!r} overtook this one to {model.wish.tier.value!r}")
    model.wish = Wish(tier, (now, next(seq)), ids)
    if model.tier is tier and model.moving_to is None:
        return cmds + end_wish(model, "done"), True
    return cmds, False


def withdraw(model: ModelRecord | None, placement_id: str) -> bool:
    """A caller gave up: the wish goes when nobody else waits for it. False when there was nothing to withdraw."""
    if model is None or model.wish is None or placement_id not in model.wish.ids:
        return False
    left = tuple(i for i in model.wish.ids if i != placement_id)
    model.wish = Wish(model.wish.tier, model.wish.since, left) if left else None
    return True


def colder_moves(models: Iterable[ModelRecord], ledger_now: Callable[[], Ledger],
                 start_move: Callable[[ModelRecord, Tier], Move],
                 make_room: Callable[[ModelRecord, Footprint], tuple[list[Command], frozenset[str]]],
                 ) -> tuple[list[Command], frozenset[str]]:
    """Operator-requested moves to a colder (or non-GPU) tier, once the model is idle; the models
    that drain to make room for them."""
    cmds: list[Command] = []
    drains: frozenset[str] = frozenset()
    for m in list(models):
        target = m.placement
        if target is None or target is Tier.GPU or m.moving_to is not None:
            continue
        if m.tier is target:
            cmds += end_wish(m, "done")
            continue
        if m.in_flight or m.waiting:
            continue
        need = ledger.need(m, target)
        if ledger_now().fits(need):
            cmds.append(start_move(m, target))
        else:
            started, drained = make_room(m, need)
            cmds += started
            drains |= drained
    return cmds, drains
