"""The four places a model can live, ordered from fastest to serve to slowest."""

from __future__ import annotations

from enum import Enum


class Tier(str, Enum):
    """Where a model's weights are.

    The order matters: a lower rank is hotter. The scheduler relies on it to tell a
    promotion from a demotion.
    """

    GPU = "gpu"
    RAM = "ram"
    DISK = "disk"
    COLD = "cold"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def hotter_than(self, other: Tier) -> bool:
        return self.rank < other.rank

    def __str__(self) -> str:
        return self.value


_RANK = {Tier.GPU: 0, Tier.RAM: 1, Tier.DISK: 2, Tier.COLD: 3}

ALL_TIERS: tuple[Tier, ...] = (Tier.GPU, Tier.RAM, Tier.DISK, Tier.COLD)
