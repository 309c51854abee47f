"""The room planner as a table: models and budgets in, a plan out (as llama-swap tests `EvictionFor`).

Each case names the branch of the decision tree in `planner.py` it exercises. Models are
plain frozen values: the planner reads them and must leave them as they were.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from clearml_umem.ledger import Ledger, need
from clearml_umem.planner import Demotion, RoomPlan, plan_room
from clearml_umem.policy import LRUPolicy
from clearml_umem.tiers import Footprint, Tier

GB = 10**9
GPU, RAM, DISK, COLD = Tier.GPU, Tier.RAM, Tier.DISK, Tier.COLD


def fps(size: int, process: int = 0, context: int = 0, kept: bool = False) -> dict[Tier, Footprint]:
    """Weights of `size`; `process` host bytes in every tier but cold; `context` device bytes while asleep."""
    return {GPU: Footprint(size + context, process + (size if kept else 0)), RAM: Footprint(context, size + process),
            DISK: Footprint(context, process), COLD: Footprint()}


@dataclass(frozen=True)
class M:
    name: str
    tier: Tier
    size: int = 4 * GB
    last_used: float = 0.0
    in_flight: frozenset[str] = frozenset()
    waiting: tuple[str, ...] = ()
    placement: Tier | None = None
    moving_to: Tier | None = None
    removing: bool = False
    uses: int = 1
    process: int = 0
    context: int = 0
    kept: bool = False
    tiers: frozenset[Tier] = frozenset(Tier)
    transits: Mapping[tuple[Tier, Tier], Tier] = field(default_factory=dict)
    swap_in_seconds: Mapping[Tier, float] = field(default_factory=dict)

    @property
    def footprints(self) -> dict[Tier, Footprint]:
        return {t: f for t, f in fps(self.size, self.process, self.context, self.kept).items() if t in self.tiers}


def plan(models: list[M], incoming: str, device: int, host: int) -> RoomPlan:
    before = copy.deepcopy(models)
    ledger = Ledger.of(Footprint(device, host), models)
    target = next(m for m in models if m.name == incoming)
    result = plan_room(models, ledger, incoming, need(target, GPU), LRUPolicy(), now=100.0)
    assert models == before, "the planner mutates nothing"
    return result


CASES = [
    pytest.param(  # 1: the least recently used idle model goes to RAM
        [M("a", GPU, last_used=1), M("b", GPU, last_used=2), M("c", RAM)], "c", 8 * GB, 100 * GB,
        RoomPlan(moves=(Demotion("a", RAM),)), id="1-lru-idle-to-ram"),
    pytest.param(  # 1: idle models before busy ones, whatever their age
        [M("a", GPU, last_used=1, in_flight=frozenset({"r"})), M("b", GPU, last_used=2), M("c", COLD)], "c",
        8 * GB, 100 * GB, RoomPlan(moves=(Demotion("b", RAM),)), id="1-idle-before-busy"),
    pytest.param(  # 1: a busy victim drains
        [M("a", GPU, in_flight=frozenset({"r"})), M("c", COLD)], "c", 4 * GB, 100 * GB,
        RoomPlan(moves=(Demotion("a", RAM),), drains=frozenset({"a"})), id="1-busy-drains"),
    pytest.param(  # 1: several victims until the room is covered
        [M("a", GPU, 2 * GB, 1), M("b", GPU, 2 * GB, 2), M("x", GPU, 2 * GB, 3), M("c", COLD)], "c", 6 * GB, 100 * GB,
        RoomPlan(moves=(Demotion("a", RAM), Demotion("b", RAM))), id="1-several"),
    pytest.param(  # 1: RAM would not fit the host budget: disk
        [M("a", GPU, 8 * GB), M("c", COLD, 8 * GB)], "c", 8 * GB, 4 * GB,
        RoomPlan(moves=(Demotion("a", DISK),)), id="1-ram-over-host-budget"),
    pytest.param(  # 1a: a sleeping engine keeps device memory: RAM is not enough, cold frees it all
        [M("a", GPU, 4 * GB, context=2 * GB, tiers=frozenset({GPU, RAM, COLD})), M("c", COLD, 5 * GB)], "c",
        6 * GB, 100 * GB, RoomPlan(moves=(Demotion("a", COLD),)), id="1a-deepen"),
    pytest.param(  # 1a: after deepening the first victim, the last is no longer needed
        [M("a", GPU, 4 * GB, 1, context=GB), M("b", GPU, GB // 2, 2), M("c", COLD, 19 * GB // 4)], "c",
        11 * GB // 2, 100 * GB, RoomPlan(moves=(Demotion("a", COLD),)), id="1a-trim"),
    pytest.param(  # 2a: host full of a model nobody waits for: it goes to disk first
        [M("a", GPU, 4 * GB, 2), M("r", RAM, 4 * GB, 1), M("c", COLD)], "c", 4 * GB, 4 * GB,
        RoomPlan(moves=(Demotion("r", DISK), Demotion("a", RAM))), id="2a-ram-model-to-disk"),
    pytest.param(  # 2b: nobody else holds host memory: the device victim skips RAM
        [M("a", GPU, 4 * GB), M("c", COLD)], "c", 4 * GB, 2 * GB,
        RoomPlan(moves=(Demotion("a", DISK),)), id="2b-skip-ram"),
    pytest.param(  # 2c: a model waiting its turn gives its host memory back, after the others
        [M("w", RAM, 4 * GB, waiting=("r1",)), M("c", COLD, 4 * GB, kept=True)], "c", 100 * GB, 4 * GB,
        RoomPlan(moves=(Demotion("w", DISK),)), id="2c-queued-last"),
    pytest.param(  # 2d: disk keeps an engine process in host memory: cold instead
        [M("a", GPU, GB, process=GB // 4, kept=True), M("c", COLD, 4 * GB, tiers=frozenset({GPU, RAM, COLD}),
                                                         kept=True)], "c", 8 * GB, 4 * GB,
        RoomPlan(moves=(Demotion("a", COLD),)), id="2d-cold"),
    pytest.param(  # 3: busy models hold the host memory: nothing moves, the shortfall is said
        [M("a", GPU, 2 * GB, in_flight=frozenset({"r"}), kept=True), M("c", COLD, 3 * GB, kept=True)], "c",
        100 * GB, 4 * GB, RoomPlan(shortfall=Footprint(0, GB)), id="3-host-shortfall"),
    pytest.param(  # 3: a model mid-move is no candidate (a waking engine keeps its context): short on device
        [M("x", DISK, 4 * GB, context=3 * GB, moving_to=RAM), M("c", COLD, 8 * GB)], "c", 10 * GB, 100 * GB,
        RoomPlan(shortfall=Footprint(GB, 0)), id="3-device-shortfall"),
    pytest.param(  # moves under way count: nothing more to move
        [M("a", GPU, 4 * GB, moving_to=RAM), M("c", COLD, 4 * GB)], "c", 4 * GB, 100 * GB, RoomPlan(),
        id="pending-frees-count"),
    pytest.param(  # a model being removed goes straight to cold
        [M("a", GPU, removing=True), M("c", COLD)], "c", 4 * GB, 100 * GB,
        RoomPlan(moves=(Demotion("a", COLD),)), id="removed-to-cold"),
]


@pytest.mark.parametrize(("models", "incoming", "device", "host", "expected"), CASES)
def test_plan_room(models: list[M], incoming: str, device: int, host: int, expected: RoomPlan) -> None:
    assert plan(models, incoming, device, host) == expected


def test_a_short_plan_moves_nothing() -> None:
    result = plan([M("a", GPU, 2 * GB, in_flight=frozenset({"r"}), kept=True), M("c", COLD, 3 * GB, kept=True)],
                  "c", 100 * GB, 4 * GB)
    assert not result.enough and result.moves == () and result.drains == frozenset()
