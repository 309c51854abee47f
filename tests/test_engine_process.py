"""Engine process lifetime with plain python children: groups, stop escalation, parent death."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from clearml_umem.engines import process
from tests.waiting import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and prctl are Linux")

# A child that starts a grandchild in its group (like vLLM's engine core) and reports both pids.
PARENT_WITH_GRANDCHILD = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    if len(sys.argv) > 1 and sys.argv[1] == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time\\nwhile True: time.sleep(1)"])
    print(f"pids {os.getpid()} {child.pid}", flush=True)
    while True:
        time.sleep(1)
""")


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie waiting for a reaper."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def read_pids(log: Path, timeout: float = 10.0) -> tuple[int, int]:
    found: list[int] = []

    def ready() -> bool:
        for line in log.read_text().splitlines() if log.exists() else ():
            if line.startswith("pids "):
                found[:] = [int(x) for x in line.split()[1:]]
                return True
        return False

    assert wait_until(ready, timeout), log.read_text() if log.exists() else "no log"
    return found[0], found[1]


def test_launch_logs_and_stop_takes_the_whole_group(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "child.log"
    proc = process.launch([sys.executable, "-c", PARENT_WITH_GRANDCHILD], log_path=log)
    leader, grandchild = read_pids(log)
    assert leader == proc.pid
    assert os.getpgid(grandchild) == proc.pgid == proc.pid, "the grandchild must share the engine's group"
    assert os.getpgid(proc.pid) != os.getpgid(0), "the engine must not be in the router's group"
    assert proc in process.live_processes()
    proc.stop(grace_s=5)
    assert not pid_alive(leader)
    assert wait_until(lambda: not pid_alive(grandchild), 5)
    assert proc not in process.live_processes()
    assert "umem starting" in log.read_text()


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    proc = process.launch([sys.executable, "-c", PARENT_WITH_GRANDCHILD, "ignore-term"], log_path=log)
    leader, grandchild = read_pids(log)
    started = time.monotonic()
    code = proc.stop(grace_s=0.5)
    assert code == -signal.SIGKILL
    assert time.monotonic() - started < 5
    assert not pid_alive(leader)
    assert wait_until(lambda: not pid_alive(grandchild), 5)


def test_launch_from_a_short_lived_thread_survives_the_thread(tmp_path: Path) -> None:
    """PDEATHSIG fires when the forking *thread* exits; launches run on the spawner thread instead."""
    log = tmp_path / "child.log"
    box: list[process.ManagedProcess] = []
    thread = threading.Thread(target=lambda: box.append(
        process.launch([sys.executable, "-c", PARENT_WITH_GRANDCHILD], log_path=log)))
    thread.start()
    thread.join()
    proc = box[0]
    read_pids(log)
    time.sleep(0.5)
    assert proc.alive(), "the engine died with the thread that asked for it"
    proc.stop(grace_s=5)


ROUTER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from clearml_umem.engines import process
    proc = process.launch([sys.executable, "-c", sys.argv[1]], log_path=Path(sys.argv[2]))
    print(f"engine {proc.pid} watchdog {proc.watchdog.pid}", flush=True)
    time.sleep(600)
""")


def test_kill_9_of_the_router_kills_engine_and_its_children(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    router = subprocess.Popen([sys.executable, "-c", ROUTER, PARENT_WITH_GRANDCHILD, str(log)],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = router.stdout.readline() if router.stdout else ""
        watchdog = int(line.split()[3])
        leader, grandchild = read_pids(log)
        assert pid_alive(watchdog)
        router.kill()
        router.wait(timeout=5)
        # bounds for a loaded CI machine: the watchdog polls and then escalates from SIGTERM to SIGKILL
        assert wait_until(lambda: not pid_alive(leader), 30), "PDEATHSIG did not kill the engine"
        assert wait_until(lambda: not pid_alive(grandchild), 30), "the engine's child outlived the router"
        assert wait_until(lambda: not pid_alive(watchdog), 30), "the watchdog outlived its job"
    finally:
        if router.poll() is None:
            router.kill()


def test_free_port_is_on_loopback() -> None:
    port = process.free_port()
    assert 0 < port < 65536
