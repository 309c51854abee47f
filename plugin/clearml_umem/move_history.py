"""The last moves the server made, for the status page and `clearml-umem place`.

Listens to the event bus like the metrics do. Each move gets a sequence number, so a
caller can ask for the moves after one it saw (`since`): what one placement caused.
Bounded: the oldest fall off.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from datetime import datetime, timezone
from typing import Any

from clearml_umem.events import Event, EventBus, MoveFailed, MoveFinished

MOVES_KEPT = 50


class MoveHistory:
    def __init__(self, bus: EventBus, kept: int = MOVES_KEPT) -> None:
        self._moves: deque[dict[str, Any]] = deque(maxlen=kept)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        bus.subscribe(self.on_event)

    def on_event(self, event: Event) -> None:
        if isinstance(event, MoveFinished):
            row: dict[str, Any] = {"model": event.model, "src": event.src.value, "dst": event.dst.value,
                                   "direction": event.direction, "ok": True, "seconds": round(event.seconds, 4),
                                   "bytes": event.bytes_moved, "gbps": round(event.gbps, 3),
                                   "host_copy": event.host_copy, "error": None}
        elif isinstance(event, MoveFailed):
            row = {"model": event.model, "src": event.src.value, "dst": event.dst.value,
                   "direction": "in" if event.dst.hotter_than(event.src) else "out", "ok": False, "seconds": None,
                   "bytes": 0, "gbps": None, "host_copy": None, "error": event.error}
        else:
            return
        with self._lock:
            row["seq"] = next(self._seq)
            row["at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self._moves.append(row)

    def since(self, seq: int = 0) -> list[dict[str, Any]]:
        """The kept moves with a sequence number above `seq`, oldest first."""
        with self._lock:
            return [dict(m) for m in self._moves if m["seq"] > seq]

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._moves[-1]["seq"] if self._moves else 0
