"""How much device memory a process tree really holds, read from the driver (NVML).

Engines that run in their own processes (vLLM) hold device memory that no allocator counter
in the router can see: the CUDA context, captured graphs, NCCL buffers. NVML reports it per
process without creating a CUDA context of its own (which would itself cost hundreds of MB
in the router). Where NVML is missing, or cannot see the processes (a container whose PID
namespace hides them from the driver, which then reports host PIDs), the answer is None
and the engine keeps counting its defaults.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Collection
from typing import Any, Protocol

import psutil

log = logging.getLogger(__name__)


class DeviceUsageProbe(Protocol):
    def used_by(self, pids: Collection[int]) -> int | None:
        """Device bytes held by these processes on all devices; None when it cannot be known."""
        ...


def process_tree(pid: int) -> set[int]:
    """The process and its descendants: vLLM's API server holds little, its engine core the rest."""
    try:
        root = psutil.Process(pid)
        return {pid, *(child.pid for child in root.children(recursive=True))}
    except psutil.Error:
        return {pid}


class NvmlProbe:
    """Per-process device memory from NVML (`nvidia-ml-py`, imported as `pynvml`)."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._lock = threading.Lock()

    @classmethod
    def create(cls) -> NvmlProbe | None:
        """A probe when NVML loads and sees a device, else None (no driver, no package)."""
        try:
            import pynvml
        except ImportError:
            log.info("nvidia-ml-py is not installed: device memory of engine processes is not measured")
            return None
        try:
            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() < 1:
                return None
        except Exception as exc:  # noqa: BLE001 - pynvml raises its own NVMLError family
            log.info("NVML unavailable (%s): device memory of engine processes is not measured", exc)
            return None
        return cls(pynvml)

    def used_by(self, pids: Collection[int]) -> int | None:
        wanted = set(pids)
        total = 0
        seen = False
        nvml = self._nvml
        with self._lock:
            try:
                for index in range(nvml.nvmlDeviceGetCount()):
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                        if proc.pid in wanted and proc.usedGpuMemory is not None:
                            total += int(proc.usedGpuMemory)
                            seen = True
            except Exception as exc:  # noqa: BLE001 - a failed read only means "not measured"
                log.debug("NVML read failed: %s", exc)
                return None
        return total if seen else None


@functools.cache
def default_probe() -> NvmlProbe | None:
    """One NVML probe per process, made on first use."""
    return NvmlProbe.create()
