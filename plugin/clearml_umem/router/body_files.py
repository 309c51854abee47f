"""The memory files big bodies are read into, kept between bodies while big bodies keep coming.

A new memory file's pages are allocated as its body is written and freed when its last descriptor
closes: for an 8 MB body, the body reader spent 5.1 ms of CPU on a new file, and 2.6 ms on one
whose pages were already there (`body_reading.READ_BYTES`). On a machine of few cores that CPU is
what another client's request waits for while big bodies arrive (`benchmarks/big_bodies.py`). So a file
let go goes back here, up to `KEPT_FILES` of them and `KEPT_BYTES` in all, and the next body is
written over it; after `IDLE_S` with no big body they are all let go. So at most `KEPT_BYTES` is
held while bodies come, whatever `--max-request-bytes` allows, and none when they stop.

A file is lent again only once nothing can still write to it: a body whose read was given up on
while the body reader was still at it (the server stopping, the reader failing) is `forget`-ten,
and its file goes as before. A file lent again keeps the bytes of the bodies before it past its new
body's length: a body is read and mapped by its `length` alone, never by the file's size.

Used from the event loop only (`body_reader.BodyReaders`); no lock."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

KEPT_FILES = 4
"""Files kept for the next bodies: one for each body the two parser processes parse, and one for
each body being read behind it."""

KEPT_BYTES = 32 * 2**20
"""The most the kept files hold in all: four bodies of the default limit (8 MiB); a bigger file than
that leaves room for is let go, as before."""

IDLE_S = 10.0
"""Seconds without a big body after which the kept files are let go."""


@dataclass
class BodyFiles:
    keep: int = KEPT_FILES
    keep_bytes: int = KEPT_BYTES
    idle_s: float = IDLE_S
    _free: list[int] = field(default_factory=list, repr=False)
    _sizes: dict[int, int] = field(default_factory=dict, repr=False)
    """The size of each file lent and not yet given back or forgotten: those may come back."""
    _last_used: float = 0.0

    def take(self, length: int, now: float) -> int:
        """A file of at least `length` bytes: the last one given back (its pages the most likely
        still in the cache), grown if it is short; a new one when none is kept."""
        self._last_used = now
        if self._free:
            fd = self._free.pop()
            size = self._sizes[fd]
        else:
            fd, size = os.memfd_create("umem-body", os.MFD_CLOEXEC), 0
        if size < length:
            try:
                os.ftruncate(fd, length)
            except BaseException:
                self._sizes.pop(fd, None)
                os.close(fd)
                raise
            size = length
        self._sizes[fd] = size
        return fd

    def give_back(self, fd: int, now: float) -> bool:
        """True when the file is kept for a later body (the caller then keeps its descriptor open);
        False when the caller is to let it go: a file not lent here, forgotten, or one too many."""
        if fd not in self._sizes or fd in self._free:
            return False
        if len(self._free) >= self.keep or self.kept_bytes + self._sizes[fd] > self.keep_bytes:
            del self._sizes[fd]
            return False
        self._free.append(fd)
        self._last_used = now
        return True

    def forget(self, fd: int) -> None:
        """This file may still be written to (its read given up on mid-way): never lend it again."""
        self._sizes.pop(fd, None)

    def idle(self, now: float) -> float:
        """Seconds left until the kept files are to be let go; 0 when they are due now."""
        return max(0.0, self._last_used + self.idle_s - now) if self._free else 0.0

    def drain(self) -> list[int]:
        """The kept files, to be let go by the caller (idle, or the router stopping)."""
        free, self._free = self._free, []
        for fd in free:
            del self._sizes[fd]
        return free

    @property
    def kept(self) -> int:
        return len(self._free)

    @property
    def kept_bytes(self) -> int:
        return sum(self._sizes[fd] for fd in self._free)
