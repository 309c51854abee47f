"""Which router should serve a request for a model: pure, no I/O (tests/test_fleet_choose.py is a table).

Preference, in order: a router where the model is hot, then in RAM, then on disk, then anywhere
it is served (cold); among equals the least loaded router (requests in flight and waiting, its own
count plus what this front has sent and not yet seen answered), then the URL, so ties are stable.
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
        """A model on its way to a warmer tier counts as there: requests sent now wait for that move only."""
        here = TIER_ORDER.get(self.tier, len(TIER_ORDER))
        return min(here, TIER_ORDER.get(self.moving_to, here)) if self.moving_to else here


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
        return self.pending + sum(m.in_flight + m.waiting for m in self.models.values())


def serving(routers: Iterable[RouterView], model: str) -> list[RouterView]:
    return [r for r in routers if r.alive and model in r.models]


def rank(routers: Iterable[RouterView], model: str) -> list[RouterView]:
    """The routers that serve `model`, best first; [] when no live router serves it."""
    return sorted(serving(routers, model), key=lambda r: (r.models[model].rank, r.load, r.url))


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
