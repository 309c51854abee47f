"""What the router's helper processes (parser processes, the body reader) share: they die with the
router and yield cores to it. Light on purpose: a helper that imports the router's package pays
its start (0.7 s) at the first big body."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1

NICENESS = 10
"""Added to this process's nice value: where cores are short, the router's event loop and the
engines run first, and a big body waits for its check instead (it is refused or passed a little later)."""


def die_with(parent: int) -> None:
    """Ask Linux to kill this process when its parent ends; exit at once if it already has."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the end of stdin still ends it
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        raise SystemExit(0)
