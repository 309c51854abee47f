"""Device memory per process tree: NVML's answers summed by pid (fake NVML), real process
trees, and on a GPU the real driver."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from clearml_umem.engines.device_usage import NvmlProbe, process_tree


class FakeNvml:
    """The few pynvml calls the probe makes, over a table {device index: [(pid, bytes)]}."""

    def __init__(self, table: dict[int, list[tuple[int, int | None]]], fail: bool = False) -> None:
        self.table = table
        self.fail = fail

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802 - pynvml's names
        return len(self.table)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:  # noqa: N802
        if self.fail:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.table[handle]]


def test_sums_the_wanted_pids_over_every_device() -> None:
    probe = NvmlProbe(FakeNvml({0: [(10, 100), (11, 5), (99, 1000)], 1: [(11, 7), (12, None)]}))
    assert probe.used_by({10, 11}) == 112
    assert probe.used_by({12}) is None, "a process NVML reports without a size is not measured"
    assert probe.used_by({500}) is None, "pids NVML does not list (another PID namespace): unknown, not 0"


def test_a_failing_driver_read_is_unknown() -> None:
    assert NvmlProbe(FakeNvml({0: [(10, 100)]}, fail=True)).used_by({10}) is None


def test_process_tree_includes_grandchildren() -> None:
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']);"
            "print(c.pid, flush=True); time.sleep(30)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert process_tree(parent.pid) == {parent.pid, child}
    finally:
        for proc in psutil.Process(parent.pid).children(recursive=True):
            proc.kill()
        parent.kill()
        parent.wait()
    assert process_tree(parent.pid) == {parent.pid}, "a gone process is itself and nothing else"


@pytest.mark.gpu
def test_real_nvml_sees_a_process_holding_device_memory() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    probe = NvmlProbe.create()
    if probe is None:
        pytest.skip("nvidia-ml-py or NVML is not available")
    code = ("import sys, torch; x = torch.empty(256 * 2**20, dtype=torch.uint8, device='cuda'); "
            "torch.cuda.synchronize(); print('ready', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        used = probe.used_by(process_tree(proc.pid))
        if used is None:
            pytest.skip("NVML lists no process of this PID namespace (a container)")
        assert used >= 256 * 2**20
    finally:
        proc.kill()
        proc.wait()
