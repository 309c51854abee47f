"""An engine's moves, declared once as a table of direct steps.

The scheduler needs to know which moves pass through a third tier (to reserve its memory
while they run); the engine needs to know which steps to run. Both come from the same
table here, so what is declared and what runs cannot drift apart: a move with no direct
step is the shortest chain of steps, and its intermediate tier is its transit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from clearml_umem.tiers import Tier

Step = TypeVar("Step")


class NoRoute(ValueError):
    """The table has no chain of steps between two tiers."""


@dataclass(frozen=True)
class MoveTable(Generic[Step]):
    """`steps[(src, dst)]` is what runs for one direct step (a method, a name...)."""

    steps: Mapping[tuple[Tier, Tier], Step]

    def __post_init__(self) -> None:
        for src, dst in self.steps:
            if src is dst:
                raise ValueError(f"a step from {src} to itself")
        for pair, via in self._routes().items():
            if len(via) > 1:
                raise ValueError(f"{pair[0]} -> {pair[1]} needs {len(via)} intermediate tiers; "
                                 "the scheduler reserves at most one: declare a shorter step")

    @property
    def tiers(self) -> frozenset[Tier]:
        return frozenset(t for pair in self.steps for t in pair)

    def route(self, src: Tier, dst: Tier) -> list[tuple[Tier, Step]]:
        """The steps from `src` to `dst`, each as (the tier it ends in, what runs)."""
        if src is dst:
            return []
        via = self._routes().get((src, dst))
        if via is None:
            raise NoRoute(f"no move from {src} to {dst}")
        stops = [*via, dst]
        out, here = [], src
        for stop in stops:
            out.append((stop, self.steps[(here, stop)]))
            here = stop
        return out

    @property
    def transits(self) -> dict[tuple[Tier, Tier], Tier]:
        """Moves with no direct step -> the tier they pass through (what `Engine.transits` reports)."""
        return {pair: via[0] for pair, via in self._routes().items() if via}

    def _routes(self) -> dict[tuple[Tier, Tier], tuple[Tier, ...]]:
        """Shortest chain of steps for every reachable pair, as its intermediate tiers (BFS in rank order)."""
        nexts: dict[Tier, list[Tier]] = {}
        for src, dst in self.steps:
            nexts.setdefault(src, []).append(dst)
        for targets in nexts.values():
            targets.sort(key=lambda t: t.rank)
        routes: dict[tuple[Tier, Tier], tuple[Tier, ...]] = {}
        for start in sorted(nexts, key=lambda t: t.rank):
            seen = {start: ()}
            queue = deque([start])
            while queue:
                here = queue.popleft()
                for nxt in nexts.get(here, []):
                    if nxt not in seen:
                        seen[nxt] = (*seen[here], here) if here is not start else ()
                        queue.append(nxt)
            for end, via in seen.items():
                if end is not start:
                    routes[(start, end)] = via
        return routes
