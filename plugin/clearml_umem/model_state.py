"""What the scheduler knows about each model, grouped into small values.

`ModelRecord` is the scheduler's own, mutable record; `ModelState` the read-only view it
hands out. An operator's placement is a `Wish`, an out-of-memory retry an `OomRetry`:
values that are there or not, instead of flags whose meaning depends on each other; a model's
turn on the GPU a `Turn` (its rules are in `turns.py`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from clearml_umem.tiers import Footprint, Tier


@dataclass
class Waiting:
    request_id: str
    arrived: float
    served_from: Tier
    seq: int


@dataclass(frozen=True)
class Wish:
    """An operator's placement, when it was asked for (time, arrival sequence), and the ids of the
    callers waiting for it to end (several callers may ask for the same tier)."""

    tier: Tier
    since: tuple[float, int]
    ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class OomRetry:
    """A load to the GPU ran out of device memory once; it retries after these models' moves end."""

    waiting_for: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Turn:
    """A model's turn on the GPU, which began at `start`: requests that arrive up to `until` are
    served even when it drains, those younger than another model's oldest waiting request only
    while that one has been passed over (waited since the later of its arrival and `start`) for
    less than `pass_over_s` or turns.SERVICE_MULTIPLE x the model's service time."""

    start: float
    until: float
    pass_over_s: float


@dataclass
class ModelRecord:
    name: str
    footprints: dict[Tier, Footprint]
    tiers: frozenset[Tier]
    expires_at: float | None = None
    """Clock time at which, still unused, it moves down a tier (keep-alive); None: it will not."""
    keep_alive: float = math.inf
    transits: dict[tuple[Tier, Tier], Tier] = field(default_factory=dict)
    tier: Tier = Tier.COLD
    moving_to: Tier | None = None
    in_flight: set[str] = field(default_factory=set)
    waiting: deque[Waiting] = field(default_factory=deque)
    turn: Turn | None = None
    """While on the GPU (fairness window on): the requests it serves even if it drains."""
    max_in_flight: int | None = None
    """Requests its engine may run at once (memory for their activations and KV cache); None: no limit."""
    last_used: float = 0.0
    uses: int = 0
    wish: Wish | None = None
    removing: bool = False
    oom_retry: OomRetry | None = None
    swap_in_seconds: dict[Tier, float] = field(default_factory=dict)
    dispatched_at: dict[str, float] = field(default_factory=dict)
    """When each request in flight was dispatched: for `service_seconds`."""
    service_seconds: float | None = None
    """How long its requests run, a moving average of the finished ones (None before the first)."""
    keep_alive: float = math.inf
    """Seconds unused before the model moves down a tier, by default (its manifest's, or the router's)."""
    keep_alive_now: float = math.inf
    """The keep-alive in force: the last request's `keep_alive` when it gave one, else `keep_alive`."""
    settled_at: float = 0.0
    """When the model arrived in its tier: an unused model's keep-alive counts from here or its last use."""

    @property
    def placement(self) -> Tier | None:
        return self.wish.tier if self.wish is not None else None

    @property
    def idle(self) -> bool:
        return not self.in_flight and not self.waiting and self.moving_to is None

    @property
    def wants_gpu_since(self) -> tuple[float, int] | None:
        """(time, arrival sequence) of the oldest wish for GPU: the sequence breaks clock ties."""
        times = [(w.arrived, w.seq) for w in self.waiting]
        if self.wish is not None and self.wish.tier is Tier.GPU:
            times.append(self.wish.since)
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
    expires_at: float | None = None
    """Clock time at which, still unused, it moves down a tier (keep-alive); None: it will not."""
    keep_alive: float = math.inf
