"""Three real routers on loopback (the CPU as each one's device) and a real front, for the fleet's
tests and benchmark. Each router serves the same tiny models with room for one on its "device",
so every switch of model on one router is a swap; ports are fixed so a killed router can come back
where the fleet expects it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from clearml_umem.catalog import write_manifest
from clearml_umem.demo import room_for_one
from clearml_umem.engines import EngineContext
from clearml_umem.spec import spec_from_mapping
from tests.routerproc import RouterProcess, launch, start_router

FRONT_READY = "umem: front on "


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Fleet3:
    manifest: Path
    budgets: tuple[int, int]
    work: Path
    ports: list[int]
    routers: list[RouterProcess] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def start(self, index: int) -> RouterProcess:
        router = start_router(self.manifest, self.work / f"r{index}", "--device", "cpu", "--device-budget",
                              str(self.budgets[0]), "--host-budget", str(self.budgets[1]), "--port",
                              str(self.ports[index]), "--log-level", "warning")
        if index < len(self.routers):
            self.routers[index] = router
        return router

    def stop(self) -> None:
        for router in self.routers:
            router.kill()


def start_fleet3(models: dict[str, Path], work: Path, count: int = 3) -> Fleet3:
    specs = [spec_from_mapping({"name": n, "weights": str(p)}) for n, p in models.items()]
    manifest = work / "models.yaml"
    write_manifest(manifest, specs)
    device_budget, host_budget, _ = room_for_one(specs, EngineContext(work_dir=work, device="cpu"))
    fleet = Fleet3(manifest, (device_budget, host_budget), work, [free_port() for _ in range(count)])
    with ThreadPoolExecutor(count) as pool:
        fleet.routers = list(pool.map(fleet.start, range(count)))
    return fleet


@dataclass
class FrontProcess:
    proc: subprocess.Popen[str]
    url: str
    log: list[str]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_front(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> FrontProcess:
    cmd = [sys.executable, "-m", "clearml_umem", "front", "--port", "0", *args]
    proc, url, lines = launch(cmd, FRONT_READY, "the front", env=env, timeout=timeout)
    return FrontProcess(proc, url, lines)


def wait_for(check, timeout: float = 20, period: float = 0.1):  # type: ignore[no-untyped-def]
    """check()'s first true value within `timeout` seconds, else AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {check.__doc__ or check}")
        time.sleep(period)
