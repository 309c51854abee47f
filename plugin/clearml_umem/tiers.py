"""The four places a model can live, ordered from fastest to serve to slowest."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Footprint:
    """Bytes a model holds on the compute device and in host RAM while in one tier.

    Components may be negative only as differences between two footprints (what a move frees).
    """

    device_bytes: int = 0
    host_bytes: int = 0

    def __add__(self, other: Footprint) -> Footprint:
        return Footprint(self.device_bytes + other.device_bytes, self.host_bytes + other.host_bytes)

    def __sub__(self, other: Footprint) -> Footprint:
        return Footprint(self.device_bytes - other.device_bytes, self.host_bytes - other.host_bytes)

    def max(self, other: Footprint) -> Footprint:
        """Each component the larger of the two: what a move holds at once between two tiers."""
        return Footprint(max(self.device_bytes, other.device_bytes), max(self.host_bytes, other.host_bytes))

    def clipped(self) -> Footprint:
        """Negative components as zero: memory to find, not memory freed."""
        return Footprint(max(0, self.device_bytes), max(0, self.host_bytes))
