"""Host-to-device copy bandwidth, measured in the same run as the swaps it is compared with.

A swap from RAM cannot beat bytes / this bandwidth, so swap speed is reported as a ratio
to it. On a machine without CUDA it measures a host-to-host tensor copy, which is what a
RAM-tier swap costs there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class BandwidthProbe:
    gbps: float
    bytes: int
    path: str
    """'pinned host -> cuda' or 'host -> host (cpu)'."""


def probe_bandwidth(device: str = "auto", size_bytes: int = 256 * 2**20, repeats: int = 5) -> BandwidthProbe:
    """Best of a few copies of `size_bytes`: the best one is closest to what the link can do."""
    import torch

    use_cuda = torch.cuda.is_available() and device != "cpu"
    target = torch.device(device if use_cuda and device.startswith("cuda") else "cuda") if use_cuda else None
    src = torch.empty(size_bytes, dtype=torch.uint8, pin_memory=use_cuda)
    src.fill_(1)
    dst = torch.empty(size_bytes, dtype=torch.uint8, device=target) if use_cuda else torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        if use_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=use_cuda)
        if use_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del src, dst
    if use_cuda:
        torch.cuda.empty_cache()
    path = "pinned host -> cuda" if use_cuda else "host -> host (cpu)"
    return BandwidthProbe(gbps=size_bytes / best / 1e9, bytes=size_bytes, path=path)
