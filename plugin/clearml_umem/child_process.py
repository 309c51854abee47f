"""What the router's helper processes (parser processes, the body reader) share: they die with the
router and yield cores to it. Light on purpose: what a helper imports is paid at the first big body,
which waits for its start (the router's app and FastAPI doubled a parser process's)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1

NICENESS = 10
"""Added to this process's nice value: where cores are short, the router's event loop and the
engines run first, and a big body waits for its check instead (it is refused or passed a little later)."""


def yield_cores() -> None:
    """Run below the router: `NICENESS` lower, and as a batch task (SCHED_BATCH, same weight), which
    Linux never lets preempt the task that woke it. The router's event loop wakes a helper with each
    body it hands over (a descriptor on a Unix socket: a sync wakeup, which puts the helper on the
    loop's core); as an ordinary task, even niced, the helper often took that core from the loop
    at once (`perf sched`, 2 cores, six long bodies a second: the loop preempted by the body reader
    1.8-1.9 times a second, 1.5-2.4 ms each; never by the control's processes, which the loop does
    not wake). Call it first thing in the process: threads started later inherit both."""
    os.nice(NICENESS)
    with contextlib.suppress(AttributeError, OSError):  # not Linux: the niceness alone
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def die_with(parent: int) -> None:
    """Ask Linux to kill this process when its parent ends; exit at once if it already has."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the end of stdin still ends it
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        raise SystemExit(0)
