"""A model's turn on the GPU, and dispatching the queued requests of hot models within it.

A model that came to the GPU serves the requests waiting for it when it arrived and those
arriving within the fairness window after, even when it is chosen to make room (it drains):
each swap is paid for by the requests it serves, and a request for another model waits a
bounded time. Pure logic over the scheduler's model records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from clearml_umem.commands import Command, Dispatch
from clearml_umem.events import Event, RequestDispatched
from clearml_umem.model_state import ModelRecord
from clearml_umem.tiers import Tier

FAIRNESS_MULTIPLE = 2.0
FAIRNESS_MIN_S = 0.05
"""A model's turn on the GPU: the requests waiting for it when it arrives, and those that
arrive within max(FAIRNESS_MIN_S, FAIRNESS_MULTIPLE x the swap-in it just took) after, are
served before it leaves, even when it is draining for an older request: each swap is paid
for by the requests it serves, and a request for another model waits a bounded time."""


def turn_end(now: float, swap_in_seconds: float) -> float:
    """When the turn of a model that reached the GPU `now`, after a swap-in of that long, ends."""
    return now + max(FAIRNESS_MIN_S, FAIRNESS_MULTIPLE * swap_in_seconds)


def dispatch_hot(models: Iterable[ModelRecord], draining: frozenset[str], now: float,
                 emit: Callable[[Event], None]) -> list[Command]:
    """Dispatch the queued requests of hot models, up to each one's `max_in_flight`; a draining model
    takes only the requests of its turn (none without one)."""
    cmds: list[Command] = []
    for m in models:
        if m.tier is not Tier.GPU or m.moving_to is not None:
            continue
        # a draining model takes no new requests, but serves the ones of its turn
        turn_until = m.turn_until if m.name in draining else None
        if m.name in draining and turn_until is None:
            continue
        while m.waiting and (m.max_in_flight is None or len(m.in_flight) < m.max_in_flight):
            if turn_until is not None and m.waiting[0].arrived > turn_until:
                break
            w = m.waiting.popleft()
            m.in_flight.add(w.request_id)
            m.last_used = now
            m.uses += 1
            emit(RequestDispatched(model=m.name, t=now, request_id=w.request_id,
                                   served_from=w.served_from, waited_s=now - w.arrived))
            cmds.append(Dispatch(m.name, w.request_id, w.served_from))
    return cmds
