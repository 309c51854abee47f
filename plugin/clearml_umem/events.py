"""Everything that happens to a model or a request, as plain data.

The scheduler and the router emit these; the metrics layer (Prometheus, ClearML scalars,
the benchmark) only ever listens. Listeners run on the caller's thread and must not block:
anything slow (a ClearML upload) buffers and works elsewhere.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from clearml_umem.tiers import Tier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    model: str
    t: float


@dataclass(frozen=True)
class RequestArrived(Event):
    """`tier` is where the model was when the request arrived: GPU is a hit, anything else a miss."""

    request_id: str
    tier: Tier

    @property
    def hit(self) -> bool:
        return self.tier is Tier.GPU


@dataclass(frozen=True)
class RequestDispatched(Event):
    """`served_from` is the tier the request waited for its model to come out of: where the model
    was on arrival, or, when it left the GPU before the request's turn came (it was draining
    for another model), the tier it was loaded back from."""

    request_id: str
    served_from: Tier
    waited_s: float


@dataclass(frozen=True)
class FirstToken(Event):
    """Measured at the router: request arrival to the first token sent to the client; `served_from`
    as in RequestDispatched."""

    request_id: str
    served_from: Tier
    ttft_s: float


@dataclass(frozen=True)
class RequestFinished(Event):
    request_id: str
    served_from: Tier
    ok: bool
    completion_tokens: int
    duration_s: float


@dataclass(frozen=True)
class RequestRejected(Event):
    request_id: str
    reason: str


@dataclass(frozen=True)
class MoveStarted(Event):
    src: Tier
    dst: Tier


@dataclass(frozen=True)
class MoveFinished(Event):
    src: Tier
    dst: Tier
    seconds: float
    bytes_moved: int
    host_copy: str | None = None
    """Swap-outs of engines that keep a host copy while hot: 'kept' (only device memory was
    freed, nothing crossed the link) or 'copied' (the weights were copied off the device)."""

    @property
    def direction(self) -> str:
        """'in' for a move toward the GPU (a swap-in), 'out' for a move away from it."""
        return "in" if self.dst.hotter_than(self.src) else "out"

    @property
    def gbps(self) -> float:
        return self.bytes_moved / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class MoveFailed(Event):
    src: Tier
    dst: Tier
    error: str


@dataclass(frozen=True)
class EngineLost(Event):
    """A model's engine died outside any move (its process was killed): the model is cold now."""

    tier: Tier
    reason: str


@dataclass(frozen=True)
class MemorySnapshot(Event):
    """Budgeted occupancy after a change; `model` is empty because it is about the whole server."""

    device_used: int
    device_budget: int
    host_used: int
    host_budget: int


Listener = Callable[[Event], None]


class EventBus:
    """Fan-out of events to listeners; a failing listener is logged, never breaks serving."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def emit(self, event: Event) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a metrics bug must not fail a request
                log.exception("event listener %r failed on %r", listener, event)
