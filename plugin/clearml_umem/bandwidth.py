"""Host-to-device copy bandwidth and storage read speed, measured in the same run as the moves
they bound.

A swap from RAM cannot beat bytes / this bandwidth, so swap speed is reported as a ratio
to it. The probe copies from the same kind of buffer the transformers engine swaps from
(an exact-size page-locked `HostBuffer`) into one device allocation, ideally of the same
size as the model, so the ratio compares like with like. On a machine without CUDA it
measures a host-to-host tensor copy, which is what a RAM-tier swap costs there. A reload from
disk cannot beat the slower of this and `probe_storage` (the model's files read as fast as
plain reads go).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


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


@dataclass(frozen=True)
class StorageProbe:
    gbps: float
    bytes: int
    threads: int
    source: str
    """Where the bytes came from, as the caller knows it: 'page cache' or 'storage (dropped from the cache)'."""


def probe_storage(paths: list[Path], threads: int = 8, piece_bytes: int = 32 * 2**20, repeats: int = 2,
                  source: str = "page cache") -> StorageProbe:
    """Read whole files as fast as plain positional reads allow: the bound of a reload from disk.

    Each thread reads pieces into its own small buffer, reused, so the figure is what the storage
    (or the page cache) delivers, with no allocation of the destination counted. Best of
    `repeats` full passes (the first one also fills the page cache when the files were not in it).
    """
    pieces = [(path, offset, min(piece_bytes, size - offset))
              for path, size in ((p, p.stat().st_size) for p in paths) for offset in range(0, size, piece_bytes)]
    total = sum(n for _, _, n in pieces)
    buffers = [bytearray(b"\1" * piece_bytes) for _ in range(threads)]
    fds = {path: os.open(path, os.O_RDONLY) for path in paths}
    best = float("inf")
    try:
        for _ in range(max(1, repeats)):
            best = min(best, _read_all(pieces, fds, buffers))
    finally:
        for fd in fds.values():
            os.close(fd)
    return StorageProbe(gbps=total / best / 1e9 if best > 0 else 0.0, bytes=total, threads=threads, source=source)


def _read_all(pieces: list[tuple[Path, int, int]], fds: dict[Path, int], buffers: list[bytearray]) -> float:
    """Seconds to read every piece, one thread per buffer."""
    cursor = iter(pieces)
    lock = threading.Lock()

    def reader(buffer: bytearray) -> None:
        view = memoryview(buffer)
        while True:
            with lock:
                item = next(cursor, None)
            if item is None:
                return
            path, offset, n = item
            got = 0
            while got < n:
                step = os.preadv(fds[path], [view[got:n]], offset + got)
                if step <= 0:
                    raise OSError(f"{path}: ended early")
                got += step

    with ThreadPoolExecutor(max_workers=len(buffers)) as pool:
        start = time.perf_counter()
        list(pool.map(reader, buffers))
        return time.perf_counter() - start
