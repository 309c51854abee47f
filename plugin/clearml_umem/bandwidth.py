"""Host-to-device copy bandwidth, measured in the same run as the swaps it is compared with.

A swap from RAM cannot beat bytes / this bandwidth, so swap speed is reported as a ratio
to it. The probe copies from the same kind of buffer the transformers engine swaps from
(an exact-size page-locked `HostBuffer`) into one device allocation, ideally of the same
size as the model, so the ratio compares like with like. On a machine without CUDA it
measures a host-to-host tensor copy, which is what a RAM-tier swap costs there.
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


def probe_bandwidth(device: str = "auto", size_bytes: int = 256 * 2**20, repeats: int = 3) -> BandwidthProbe:
    """Best of a few copies of `size_bytes` after a warm-up: the best one is closest to what the link can do."""
    import torch

    from clearml_umem.engines.weight_store import HostBuffer

    use_cuda = torch.cuda.is_available() and device != "cpu"
    target = torch.device(device if use_cuda and device.startswith("cuda") else "cuda") if use_cuda else None
    src = HostBuffer(size_bytes, pin=use_cuda)
    pinned = src.pinned
    try:
        src.tensor.fill_(1)
        dst = torch.empty(size_bytes, dtype=torch.uint8, device=target) if use_cuda else torch.empty_like(src.tensor)
        best = float("inf")
        for _ in range(repeats + 1):
            if use_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            dst.copy_(src.tensor, non_blocking=pinned)
            if use_cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        del dst
    finally:
        src.close()
    if use_cuda:
        torch.cuda.empty_cache()
    path = f"{'pinned' if pinned else 'pageable'} host -> cuda" if use_cuda else "host -> host (cpu)"
    return BandwidthProbe(gbps=size_bytes / best / 1e9, bytes=size_bytes, path=path)
