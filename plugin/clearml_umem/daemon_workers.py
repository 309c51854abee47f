"""Daemon threads that are reused, for work nobody may have to wait for (a tokenization whose client left).

Starting a thread blocks its starter until the new thread has run: `Thread.start()` waits for it
to signal that it began, which needs the OS to schedule it and the GIL to come its way. On the
event loop that wait was 4-6 ms of a request's first step whenever other threads held the GIL
(a body thread reading a big body, the generation thread): another client's first token paid it
(`benchmarks/big_bodies.py`, a watchdog sampling the loop's stack during its slow steps). An idle
worker is woken through a queue instead, which costs the loop a lock and a futex.

Not an executor: `concurrent.futures` joins its workers at exit, so a tokenization that cannot be
interrupted would hold up shutdown (SIGTERM with two abandoned 8 MB prompts took 45 s). These
threads are daemons, and a worker idle for `idle_s` ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

IDLE_S = 30.0
"""How long an idle worker waits for work before it ends."""


Job = Callable[[], "Callable[[], None] | None"]
"""A call for a worker, which may return what tells its caller it is over. That is called once the worker
counts as idle: told first, a caller that submits its next call at once (a task awaiting one prompt check
after another) found no idle worker and started a thread, on the event loop (seen in CI under load)."""


class DaemonWorkers:
    """Runs each submitted call in an idle worker, or in a new daemon thread when none is idle
    (so a call stuck in a tokenization never delays another: there is no fixed number of workers)."""

    def __init__(self, name: str, idle_s: float = IDLE_S) -> None:
        self.name = name
        self.idle_s = idle_s
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        """Workers waiting for a job, less the jobs already promised to them: each queued job has a waiting worker."""
        self._started = 0
        self._busy = 0

    @property
    def busy(self) -> int:
        """Workers running a call now."""
        return self._busy

    def submit(self, job: Job) -> None:
        """Run `job` in a worker; what it returns, if anything, is called once that worker counts as idle
        again (`Job`)."""
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1
            else:
                self._started += 1
                number = self._started
        self._jobs.put(job)
        if start:
            threading.Thread(target=self._work, name=f"{self.name}-{number}", daemon=True).start()

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # a waiting worker no job was promised to: this one may end
                        self._idle -= 1
                        return
                continue  # every waiting worker was promised a job: one is on its way to this one
            with self._lock:
                self._busy += 1
            after: Callable[[], None] | None = None
            with contextlib.suppress(BaseException):  # a job reports its own outcome (`run_abandonable`)
                after = job()
            del job  # an idle worker holds nothing of its last job (a generation's model, say)
            with self._lock:
                self._busy -= 1
                self._idle += 1
            if after is not None:
                with contextlib.suppress(BaseException):
                    after()
                del after

    def start(self, fn: Callable[..., object], *args: Any) -> Running:
        """`fn(*args)` in a worker, followed through the handle (`Thread`'s `is_alive` and `join`)."""
        running = Running()

        def job() -> Callable[[], None]:
            with contextlib.suppress(BaseException):  # as a thread's target: its end is what the caller follows
                fn(*args)
            return running.ended.set

        self.submit(job)
        return running


class Running:
    """A call running in a worker: over once `fn` returned (the worker then holds nothing of it)."""

    def __init__(self) -> None:
        self.ended = threading.Event()

    def is_alive(self) -> bool:
        return not self.ended.is_set()

    def join(self, timeout: float | None = None) -> None:
        self.ended.wait(timeout)


CHECKS = DaemonWorkers("umem-check")
"""The workers of prompt checks (`Runtime.check_request`)."""


async def run_abandonable(workers: DaemonWorkers, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in one of `workers`, awaited; a caller cancelled (its client left) stops waiting
    at once, and the result is dropped when the call ends."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    def run() -> Callable[[], None]:
        try:
            outcome = (True, fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            outcome = (False, exc)

        def tell() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(settle, *outcome)

        return tell

    workers.submit(run)
    return await fut
