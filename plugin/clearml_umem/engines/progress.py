"""How far a long move has got: the stage it is in and the bytes done of the bytes to do.

A cold start of a large model reads gigabytes of weights; without this the operator sees
one line when it ends, minutes later. An engine keeps one `MoveProgress`, its worker
threads add bytes as they land, and the runtime reads `snapshot()` from the event loop
(for `/admin/models` and the progress lines it logs at a steady rate). Counting is a lock
and an addition per piece of several MB, nothing on the per-token path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clearml_umem.units import fmt_bytes

TAIL_BYTES = 4096
"""How much of an engine's log file is read to find its last line: one read, bounded."""


class MoveProgress:
    """Thread-safe stage and byte counter of the move an engine is making, if any."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._active = False
        self._stage = ""
        self._done = 0
        self._total = 0
        self._stage_started = 0.0

    def begin(self) -> None:
        """A move starts: nothing done yet."""
        with self._lock:
            self._active = True
            self._stage, self._done, self._total = "", 0, 0
            self._stage_started = self._clock()

    def stage(self, name: str, total_bytes: int = 0) -> None:
        """A new stage of the move; `total_bytes` when it copies a known amount (0: it does not)."""
        with self._lock:
            self._stage, self._done, self._total = name, 0, max(0, total_bytes)
            self._stage_started = self._clock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes

    def end(self) -> None:
        with self._lock:
            self._active = False

    def snapshot(self) -> dict[str, Any] | None:
        """{stage, bytes_done, bytes_total, percent, stage_seconds} while a move runs, else None."""
        with self._lock:
            if not self._active:
                return None
            done, total = min(self._done, self._total) if self._total else self._done, self._total
            return {
                "stage": self._stage or None,
                "bytes_done": done,
                "bytes_total": total or None,
                "percent": round(100.0 * done / total, 1) if total else None,
                "stage_seconds": round(self._clock() - self._stage_started, 3),
            }


def last_log_line(path: str | Path | None) -> str | None:
    """The last non-empty line of a log file (an engine process's own stages), or None."""
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - TAIL_BYTES))
            tail = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:200] if lines else None


def describe_progress(src: str, dst: str, elapsed_s: float, progress: dict[str, Any] | None) -> str:
    """One progress line: 'cold -> gpu, 12.0 s: reading weights 3.20 GB of 16.0 GB (20%)' (the caller
    logs it as "model NAME: ..." so that the model's log keeps it)."""
    text = f"{src} -> {dst}, {elapsed_s:.1f} s"
    if not progress:
        return text + " so far"
    if progress.get("stage"):
        text += f": {progress['stage']}"
    total = progress.get("bytes_total")
    if total:
        text += f" {fmt_bytes(progress['bytes_done'])} of {fmt_bytes(total)} ({progress['percent']:.0f}%)"
    elif progress.get("bytes_done"):
        text += f" {fmt_bytes(progress['bytes_done'])}"
    return text
