"""Which model to push down a tier when room is needed.

A policy only orders candidates; the scheduler decides how many to take and where they
go, so a policy can never break the scheduler's rules (in-flight protection, budgets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from clearml_umem.tiers import Tier


@dataclass(frozen=True)
class Candidate:
    """What a policy may weigh about a model that could be demoted."""

    name: str
    tier: Tier
    device_bytes: int
    host_bytes: int
    last_used: float
    uses: int
    swap_in_seconds: float | None
    """Mean observed time to bring the model back to GPU from the tier it would go to, if known."""


class Policy(Protocol):
    name: str

    def rank(self, candidates: Sequence[Candidate], now: float) -> list[Candidate]:
        """Candidates in eviction order: the first is demoted first."""
        ...


class LRUPolicy:
    """Least recently used first: the baseline every cache is measured against."""

    name = "lru"

    def rank(self, candidates: Sequence[Candidate], now: float) -> list[Candidate]:
        return sorted(candidates, key=lambda c: (c.last_used, c.name))


class CostAwarePolicy:
    """Evict what is cheap to bring back, rarely used and large, a GreedyDual-Size-Frequency flavour.

    A model's value is how often it is used (decayed by idle time) times what a miss
    costs (its observed swap-in time, or its size as a stand-in), per byte it occupies
    in its tier (device bytes when hot, host bytes when in RAM). With the stand-in, size
    cancels out and frequency alone decides. The lowest value goes first; equal values
    fall back to LRU order.
    """

    name = "cost"

    def __init__(self, half_life_s: float = 300.0) -> None:
        if half_life_s <= 0:
            raise ValueError("half_life_s must be positive")
        self.half_life_s = half_life_s

    def _value(self, c: Candidate, now: float) -> float:
        idle = max(0.0, now - c.last_used)
        frequency = (1 + c.uses) * 0.5 ** (idle / self.half_life_s)
        occupied = max(1, c.device_bytes, c.host_bytes)
        miss_cost = c.swap_in_seconds if c.swap_in_seconds is not None else occupied / 10e9
        return frequency * max(miss_cost, 1e-12) / occupied

    def rank(self, candidates: Sequence[Candidate], now: float) -> list[Candidate]:
        return sorted(candidates, key=lambda c: (self._value(c, now), c.last_used, c.name))


POLICIES = {"lru": LRUPolicy, "cost": CostAwarePolicy}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None
