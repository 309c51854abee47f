"""Move tables: routes and transits come from the same declared steps."""

from __future__ import annotations

import pytest

from clearml_umem.engines.moves import MoveTable, NoRoute
from clearml_umem.tiers import Tier

GPU, RAM, DISK, COLD = Tier.GPU, Tier.RAM, Tier.DISK, Tier.COLD

# vLLM's shape: sleeping needs an awake engine
SLEEPER = MoveTable({(COLD, GPU): "start", (GPU, RAM): "sleep1", (GPU, DISK): "sleep2", (RAM, GPU): "wake",
                     (DISK, GPU): "wake", (RAM, DISK): "sleep2", (GPU, COLD): "stop", (RAM, COLD): "stop",
                     (DISK, COLD): "stop"})


@pytest.mark.parametrize(("src", "dst", "steps"), [
    (GPU, RAM, [(RAM, "sleep1")]),
    (COLD, RAM, [(GPU, "start"), (RAM, "sleep1")]),
    (COLD, DISK, [(GPU, "start"), (DISK, "sleep2")]),
    (DISK, RAM, [(GPU, "wake"), (RAM, "sleep1")]),
    (RAM, COLD, [(COLD, "stop")]),
    (GPU, GPU, []),
])
def test_routes_are_the_shortest_chain_of_declared_steps(src: Tier, dst: Tier, steps: list) -> None:
    assert SLEEPER.route(src, dst) == steps


def test_transits_are_derived_from_the_routes() -> None:
    assert SLEEPER.transits == {(COLD, RAM): GPU, (COLD, DISK): GPU, (DISK, RAM): GPU}
    direct = MoveTable({(a, b): None for a in Tier for b in Tier if a is not b})
    assert direct.transits == {} and direct.tiers == frozenset(Tier)


def test_missing_and_too_long_routes_are_refused() -> None:
    only_up = MoveTable({(COLD, GPU): "start"})
    with pytest.raises(NoRoute, match="no move from gpu to cold"):
        only_up.route(GPU, COLD)
    with pytest.raises(ValueError, match="needs 2 intermediate tiers"):
        MoveTable({(COLD, DISK): "a", (DISK, RAM): "b", (RAM, GPU): "c"})
    with pytest.raises(ValueError, match="to itself"):
        MoveTable({(GPU, GPU): "noop"})
