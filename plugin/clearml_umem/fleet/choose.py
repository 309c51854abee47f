"""Which router should serve a request for a model: pure, no I/O (tests/test_fleet_choose.py is a table).

Preference, in order: a router where the model is hot, then in RAM, then on disk, then anywhere
it is served (cold); among equals the least loaded router (requests in flight and waiting, as it
said or as this front has open there, whichever is more), then the one with fewer other models on
its GPU (less to evict to make room), then the URL, so ties are stable.
Replicas spread by load where the model is hot, and a model is loaded on a second router only
when none holds it warmer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

TIER_ORDER = {"gpu": 0, "ram": 1, "disk": 2, "cold": 3}


@dataclass(frozen=True)
class ModelLoad:
    """One model on one router, as its status said."""

    tier: str
    in_flight: int = 0
    waiting: int = 0
    moving_to: str | None = None

    @property
    def rank(self) -> int:
        """A moving model counts as where it goes: on its way to the GPU, requests sent now wait for
        that move only; on its way out, it will not be there when they arrive."""
        where = self.moving_to or self.tier
        return TIER_ORDER.get(where, len(TIER_ORDER))


@dataclass(frozen=True)
class RouterView:
    url: str
    alive: bool
    models: Mapping[str, ModelLoad] = field(default_factory=dict)
    device: str = ""
    pending: int = 0
    """Requests this front sent there that the last status did not count yet."""
    error: str | None = None
    """Why the last probe failed (the router is then not alive)."""

    @property
    def load(self) -> int:
        """Requests on this router: its own count may lag what this front just sent, and the front's
        count leaves out other fronts', so the larger of the two."""
        return max(self.pending, sum(m.in_flight + m.waiting for m in self.models.values()))

    def hot_besides(self, model: str) -> int:
        """Other models on (or on their way to) this router's GPU: what loading `model` may evict."""
        return sum(1 for name, m in self.models.items() if name != model and m.rank == TIER_ORDER["gpu"])


def serving(routers: Iterable[RouterView], model: str) -> list[RouterView]:
    return [r for r in routers if r.alive and model in r.models]


def rank(routers: Iterable[RouterView], model: str) -> list[RouterView]:
    """The routers that serve `model`, best first; [] when no live router serves it."""
    return sorted(serving(routers, model), key=lambda r: (r.models[model].rank, r.load, r.hot_besides(model), r.url))


def round_robin(routers: Iterable[RouterView], model: str, turn: int) -> list[RouterView]:
    """The baseline the benchmark compares with: the next router in turn, whatever it holds."""
    live = sorted(serving(routers, model), key=lambda r: r.url)
    if not live:
        return []
    start = turn % len(live)
    return live[start:] + live[:start]


def models_served(routers: Iterable[RouterView]) -> dict[str, list[str]]:
    """Every model some live router serves, with those routers' URLs."""
    union: dict[str, list[str]] = {}
    for router in sorted((r for r in routers if r.alive), key=lambda r: r.url):
        for model in router.models:
            union.setdefault(model, []).append(router.url)
    return dict(sorted(union.items()))
