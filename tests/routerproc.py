"""Start the real router CLI as a child process on loopback, as a user would."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from clearml_umem.catalog import write_manifest
from clearml_umem.demo import room_for_one
from clearml_umem.engines import EngineContext
from clearml_umem.spec import spec_from_mapping

READY_PREFIX = "umem: serving on "


@dataclass
class RouterProcess:
    proc: subprocess.Popen[str]
    url: str
    log: list[str] = field(default_factory=list)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def end_leaving(self, how: str) -> list[int]:
        """End the router by SIGTERM ("terminate", which must exit 0) or SIGKILL ("kill"); the PIDs
        of its process tree still alive afterwards (engines included: none may outlive it)."""
        pids = [self.proc.pid] + [p.pid for p in self.descendants()]
        if how == "terminate":
            assert self.stop() == 0
        else:
            self.kill()
        return wait_gone(pids)


def launch(cmd: list[str], ready_prefix: str, what: str, env: dict[str, str] | None = None, timeout: float = 300,
           preexec_fn: Callable[[], None] | None = None) -> tuple[subprocess.Popen[str], str, list[str]]:
    """Start `cmd` with its output collected line by line; the process, the URL it printed after
    `ready_prefix`, and its lines so far (the list keeps growing). A process that exits or stays
    silent for `timeout` s raises with its last lines."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)
    lines: list[str] = []
    url: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith(ready_prefix):
                url.append(line[len(ready_prefix):].strip())
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.2):
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"{what} did not become ready:\n" + "\n".join(lines[-40:]))
    if not url:
        proc.wait(timeout=10)
        raise RuntimeError(f"{what} exited with {proc.returncode}:\n" + "\n".join(lines[-40:]))
    return proc, url[0], lines


def start_router(manifest: Path, work_dir: Path, *extra: str, env: dict[str, str] | None = None,
                 timeout: float = 300, max_descriptors: int | None = None) -> RouterProcess:
    """`max_descriptors`: the router's RLIMIT_NOFILE, as a small `ulimit -n` would set it."""
    cmd = [sys.executable, "-m", "clearml_umem", "serve", "--manifest", str(manifest), "--port", "0",
           "--work-dir", str(work_dir), *extra]

    def limit() -> None:
        if max_descriptors is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_descriptors, max_descriptors))

    proc, url, lines = launch(cmd, READY_PREFIX, "router", env=env, timeout=timeout, preexec_fn=limit)
    return RouterProcess(proc, url, lines)


def start_fake_vllm_router(tmp_path: Path, behaviour: dict | None = None,
                           env: dict[str, str] | None = None) -> RouterProcess:
    """A router with one model, `fake-vllm`, served by the vLLM stand-in
    (tests/fixtures/fake_vllm_server.py) run as vLLM is: through a `--vllm-python` that runs it.
    `behaviour` is the stand-in's behaviour.json (delays, failures)."""
    import json
    import stat

    from tests.test_vllm_engine_control import CONFIG, FAKE, WEIGHTS

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(CONFIG))
    (model / "model.safetensors").write_bytes(b"\0" * WEIGHTS)
    state = tmp_path / "state"
    state.mkdir()
    if behaviour is not None:
        (state / "behaviour.json").write_text(json.dumps(behaviour))
    python = tmp_path / "vllm-python"  # stands in for the vLLM venv's python: `-m <module>` runs the fake
    python.write_text(f"#!/bin/sh\nshift 2\nexec {sys.executable} {FAKE} \"$@\"\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    manifest = tmp_path / "models.yaml"
    manifest.write_text(f"models:\n  - name: fake-vllm\n    weights: {model}\n    engine: vllm\n    dtype: bfloat16\n")
    return start_router(manifest, tmp_path / "work", "--device", "cpu", "--device-budget", "4GB",
                        "--vllm-python", str(python), env={"FAKE_VLLM_STATE": str(state), **(env or {})})


def start_room_for_one(models: dict[str, Path], work_dir: Path, *extra: str,
                       env: dict[str, str] | None = None) -> tuple[RouterProcess, list[str]]:
    """These models behind a router on the CPU whose budgets hold only one of them hot: every
    switch between models is a swap."""
    specs = [spec_from_mapping({"name": n, "weights": str(p)}) for n, p in models.items()]
    manifest = work_dir / "models.yaml"
    write_manifest(manifest, specs)
    device_budget, host_budget, _ = room_for_one(specs, EngineContext(work_dir=work_dir, device="cpu"))
    router = start_router(manifest, work_dir, "--device", "cpu", "--device-budget", str(device_budget),
                          "--host-budget", str(host_budget), *extra, env=env)
    return router, [s.name for s in specs]


def big_bodies_counted(url: str) -> dict[str, float]:
    """The router's `umem_big_request_bodies_total`, by outcome."""
    counts: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("umem_big_request_bodies_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = float(line.rsplit(" ", 1)[1])
    return counts


def loop_lag_ticks(url: str) -> dict[str, float]:
    """The router's `umem_event_loop_lag_seconds` histogram: ticks late by at most each bound (`le`)."""
    ticks: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("umem_event_loop_lag_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            ticks[bound] = float(line.rsplit(" ", 1)[1])
    return ticks


def wait_gone(pids: list[int], timeout: float = 30) -> list[int]:
    """PIDs still alive (and not zombies) after `timeout`."""
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.2)
    return alive


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
