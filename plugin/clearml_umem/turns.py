"""A model's turn on the GPU, and dispatching the queued requests of hot models within it.

A model that came to the GPU serves the requests waiting for it when it arrived and those
arriving within the fairness window after, even when it is chosen to make room (it drains):
each swap is paid for by the requests it serves. A request of the turn that is younger than
the oldest request waiting for another model passes that request over; the turn allows this
for a bounded time only (about a swap, or two of the model's requests, see SERVICE_MULTIPLE),
and requests older than every other waiting one go first in any case (arrival order): so
swaps fall without lengthening the tail of the waits past strict arrival order's
(benchmarks/load_bench.py). Pure logic over the scheduler's model records.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from clearml_umem.commands import Command, Dispatch
from clearml_umem.events import Event, RequestDispatched
from clearml_umem.model_state import ModelRecord, Turn, Waiting
from clearml_umem.tiers import Tier

FAIRNESS_MULTIPLE = 2.0
FAIRNESS_MIN_S = 0.05
"""The fairness window: max(FAIRNESS_MIN_S, FAIRNESS_MULTIPLE x the swap-in a turn saves, see
`saved_swap_s`). Requests for the model that arrive within the window after it reached the GPU
belong to its turn."""
SERVICE_MULTIPLE = 2.0
"""A turn passes a request for another model over for at most the larger of the window and
SERVICE_MULTIPLE x how long the model's requests run: a swap saved is worth a wait about its
size, and requests already running hold the other model up that long in any order."""


def start_turn(m: ModelRecord, now: float) -> Turn:
    """The turn of a model that reached the GPU `now`."""
    window = max(FAIRNESS_MIN_S, FAIRNESS_MULTIPLE * saved_swap_s(m))
    return Turn(start=now, until=now + window, pass_over_s=window)


def saved_swap_s(m: ModelRecord) -> float:
    """The swap a turn saves: the model's measured swap-in from the first tier below the GPU it has
    (where it goes when it leaves), 0 before one was measured. Not the swap it just took: a cold
    start (an engine starting, seconds) is paid once, and must not hold the other models up that long."""
    for tier in (Tier.RAM, Tier.DISK, Tier.COLD):
        if tier in m.tiers:
            return m.swap_in_seconds.get(tier, 0.0)
    return 0.0


def oldest_passed_over(models: Collection[ModelRecord]) -> Waiting | None:
    """The oldest request waiting for a model that is not on the GPU and not on its way there:
    the one a draining model's turn holds up."""
    heads = [m.waiting[0] for m in models
             if m.waiting and m.tier is not Tier.GPU and m.moving_to is not Tier.GPU]
    return min(heads, key=lambda w: (w.arrived, w.seq), default=None)


def in_turn(turn: Turn, w: Waiting, oldest_other: Waiting | None, now: float, service_s: float | None) -> bool:
    """Whether a draining model serves `w` now: a request older than every other waiting one
    (arrival order says it goes first), or one of the turn while the oldest other request has
    waited less than the turn allows."""
    if oldest_other is None:
        return w.arrived <= turn.until
    if (w.arrived, w.seq) < (oldest_other.arrived, oldest_other.seq):
        return True
    cap = max(turn.pass_over_s, SERVICE_MULTIPLE * (service_s or 0.0))
    return w.arrived <= turn.until and now - max(oldest_other.arrived, turn.start) < cap


def dispatch_hot(models: Collection[ModelRecord], draining: frozenset[str], now: float,
                 emit: Callable[[Event], None]) -> list[Command]:
    """Dispatch the queued requests of hot models, up to each one's `max_in_flight`; a draining model
    takes only the requests of its turn (none without one)."""
    cmds: list[Command] = []
    oldest_other = oldest_passed_over(models) if draining else None
    for m in models:
        if m.tier is not Tier.GPU or m.moving_to is not None:
            continue
        # a draining model takes no new requests, but serves the ones of its turn
        turn = m.turn if m.name in draining else None
        if m.name in draining and turn is None:
            continue
        while m.waiting and (m.max_in_flight is None or len(m.in_flight) < m.max_in_flight):
            if turn is not None and not in_turn(turn, m.waiting[0], oldest_other, now, m.service_seconds):
                break
            w = m.waiting.popleft()
            m.in_flight.add(w.request_id)
            m.dispatched_at[w.request_id] = now
            m.last_used = now
            m.uses += 1
            emit(RequestDispatched(model=m.name, t=now, request_id=w.request_id,
                                   served_from=w.served_from, waited_s=now - w.arrived))
            cmds.append(Dispatch(m.name, w.request_id, w.served_from))
    return cmds
