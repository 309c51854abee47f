"""Budgets: how many bytes the tier manager may place on the compute device and in host RAM.

Detected at start unless given. On a CPU-only machine the "device" is host memory too,
so the two budgets split the RAM that is free.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import psutil

from clearml_umem.units import fmt_bytes

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")

DEVICE_FRACTION = 0.9
"""Share of free GPU memory the plugin plans with; the rest absorbs allocator fragmentation."""
HOST_FRACTION = 0.5
CPU_DEVICE_FRACTION = 0.25


def parse_size(value: str | int | float) -> int:
    """'8GB', '512MiB', '1.5g' or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return int(value)
    match = _SIZE.match(value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r} (use bytes or a unit: 512MB, 8GB, 2GiB)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


@dataclass(frozen=True)
class Budgets:
    device_bytes: int
    host_bytes: int
    device_kind: str
    """'cuda' or 'cpu': what the device budget is made of."""
    device_how: str = "given"
    host_how: str = "given"
    """How each budget was chosen, in words for the start banner ("given", or the rule and what it was applied to)."""


def cuda_free_bytes() -> tuple[int, int] | None:
    """(free, total) on the current CUDA device as the driver sees it, or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return int(free), int(total)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if cuda_free_bytes() is not None else "cpu"


def detect_budgets(device: str = "auto", device_bytes: int | None = None, host_bytes: int | None = None) -> Budgets:
    kind = "cuda" if resolve_device(device).startswith("cuda") else "cpu"
    available = psutil.virtual_memory().available
    device_how = host_how = "given"
    if device_bytes is None:
        if kind == "cuda":
            free = cuda_free_bytes()
            device_bytes = int(free[0] * DEVICE_FRACTION) if free else 0
            free_bytes = free[0] if free else 0
            device_how = f"detected: {DEVICE_FRACTION:.0%} of the {fmt_bytes(free_bytes)} of free GPU memory"
        else:
            device_bytes = int(available * CPU_DEVICE_FRACTION)
            device_how = f"detected: {CPU_DEVICE_FRACTION:.0%} of the {fmt_bytes(available)} of available RAM"
    if host_bytes is None:
        host_bytes = int(available * HOST_FRACTION)
        host_how = f"detected: {HOST_FRACTION:.0%} of the {fmt_bytes(available)} of available RAM"
    if device_bytes <= 0:
        raise ValueError(f"no device memory to plan with on {kind}; give a device budget")
    log.info("budgets: device (%s) %s, host RAM %s", kind, fmt_bytes(device_bytes), fmt_bytes(host_bytes))
    return Budgets(device_bytes, host_bytes, kind, device_how, host_how)
