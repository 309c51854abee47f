"""A model's log, for `GET /admin/models/{name}/logs` and `clearml-umem logs`.

An engine with a process of its own (vLLM) writes a log file: that file is the model's log,
read from a byte offset. An in-process engine (transformers) has no log of its own, so the
router keeps the lines it logs about each model ("model NAME: ...") in a bounded buffer,
numbered per model (1, 2, 3...) so a follower can ask for the lines after the last it saw.

Offsets mean one thing per source and always add up: `next_offset - offset` is the number of
lines returned (router source) or the number of bytes of `text` (file source, which returns
whole lines only, so a line being written is never split between two reads).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from pathlib import Path
from typing import Any

LINES_KEPT = 2000
"""Router lines kept per model; older ones fall off."""
MAX_READ_BYTES = 256 * 2**10
"""Most bytes of a log file one request returns; a follower gets the rest on its next call."""
DEFAULT_TAIL_BYTES = 16 * 2**10
"""Without an offset, the end of the file: about the last hundred lines."""


class RouterModelLog(logging.Handler):
    """Keeps the router's log records whose message is about one model (`"model %s: ..."`)."""

    def __init__(self, kept: int = LINES_KEPT) -> None:
        super().__init__(level=logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._kept = kept
        self._lines: dict[str, deque[tuple[int, str]]] = {}
        self._seq: dict[str, itertools.count[int]] = {}
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if not isinstance(record.msg, str) or not record.msg.startswith("model %s") or not record.args:
            return
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        model = str(args[0])
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - a bad record must not break logging
            return
        with self._guard:
            seq = next(self._seq.setdefault(model, itertools.count(1)))
            self._lines.setdefault(model, deque(maxlen=self._kept)).append((seq, line))

    def read(self, model: str, offset: int | None) -> dict[str, Any]:
        """Lines numbered above `offset` (all kept ones when None); `next_offset` for the next call.

        When older lines fell off, `offset` in the answer is where the returned ones start (the
        line before the first), so `next_offset - offset` is always the number of lines returned.
        """
        with self._guard:
            kept = list(self._lines.get(model, ()))
        after = offset or 0
        if kept and after > kept[-1][0]:
            after = 0  # numbered past the last line: a restarted router numbers from 1 again
        picked = [(seq, text) for seq, text in kept if seq > after]
        if not picked:
            return {"source": "router", "path": None, "offset": after, "next_offset": after, "text": ""}
        text = "".join(line + "\n" for _, line in picked)
        return {"source": "router", "path": None, "offset": picked[0][0] - 1, "next_offset": picked[-1][0],
                "text": text, "lines": len(picked)}


def read_log_file(path: Path, offset: int | None, tail_bytes: int = DEFAULT_TAIL_BYTES) -> dict[str, Any]:
    """Up to MAX_READ_BYTES of a log file from byte `offset` (the end's last `tail_bytes` when None).

    An offset past the end (the file was replaced by a restart) starts from the beginning again.
    """
    try:
        size = path.stat().st_size
    except OSError:
        return {"source": "file", "path": str(path), "offset": 0, "next_offset": 0, "text": "",
                "note": "the engine has not written its log yet"}
    start = max(0, size - tail_bytes) if offset is None else offset
    if start > size:
        start = 0
    with path.open("rb") as fh:
        fh.seek(start)
        data = fh.read(min(MAX_READ_BYTES, size - start))
    if offset is None and start > 0 and b"\n" in data:
        # a tail starts at the first whole line
        cut = data.index(b"\n") + 1
        start, data = start + cut, data[cut:]
    if b"\n" in data:
        data = data[:data.rindex(b"\n") + 1]
    elif len(data) < MAX_READ_BYTES:
        data = b""  # a line still being written: it comes whole with the next read
    return {"source": "file", "path": str(path), "offset": start, "next_offset": start + len(data),
            "text": data.decode("utf-8", errors="replace")}
