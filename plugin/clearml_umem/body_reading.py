"""A big body's read from its client's socket into its memory file, and what the router and its body
reader process (`body_reader_child.py`) say about it: a job (its tag, the body's length, the bytes
already in its memory file, the body timeout) with the client's socket and the memory file as
descriptors, and the job's outcome. Light on purpose: the reader process imports it, not the
router's package."""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import struct
import time

JOB = struct.Struct("<QQQd")
"""tag, length, bytes already in the file, seconds the sender may send nothing."""

REPLY = struct.Struct("<QB")
"""tag, outcome."""

DONE, GONE, STALLED, FAILED = 0, 1, 2, 3
"""The body is in its file; the client left (or the router gave up); it stopped sending; a fault."""


READING_THREADS = 64
"""Bodies read at once; a thread waiting on a slow sender costs only its stack, and one more waits
for a free thread while its sender waits on TCP's window."""


WAKE_CHECK_S = 0.25
"""How often a reading thread (of the body reader process) wakes while a body is still arriving (a slow sender's)."""


class BodyGone(Exception):
    """The stream ended before the body did: the client left, or the router shut the socket down."""


class BodyStalled(Exception):
    """Nothing came for the body timeout."""


def fill(sock_fd: int, mem_fd: int, length: int, have: int, read_timeout_s: float) -> None:
    """Read bytes `have`..`length` of a body from the client's socket into its memory file. Run in
    a thread of the body reader process (`body_reader_child.py`), never in the router's. Raises
    BodyGone at the end of the stream (the client left, or the router shut the socket down: it
    gave up on the body), BodyStalled when nothing came for `read_timeout_s`.

    Most bodies take one call: the socket is read blocking, with MSG_WAITALL, which returns once
    the whole rest has arrived, or after `WAKE_CHECK_S` with what came by then (SO_RCVTIMEO: a slow
    sender's bytes and the timeout are checked that often). The socket the router holds shares the
    blocking mode until the read ends; meanwhile the router neither reads it (paused) nor writes
    to it (the request has no answer yet)."""
    mapping = mmap.mmap(mem_fd, length)
    view = memoryview(mapping)
    reader = socket.socket(fileno=os.dup(sock_fd))
    last_byte = time.monotonic()
    try:
        reader.setblocking(True)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(WAKE_CHECK_S))
        while have < length:
            try:
                count = reader.recv_into(view[have:], 0, socket.MSG_WAITALL)
            except BlockingIOError:  # nothing for WAKE_CHECK_S
                count = -1
            except OSError as exc:  # reset by the client
                raise BodyGone() from exc
            if count == 0:
                raise BodyGone()
            if count > 0:
                have += count
                last_byte = time.monotonic()
            elif time.monotonic() - last_byte >= read_timeout_s:
                raise BodyStalled()
    finally:
        view.release()
        mapping.close()
        with contextlib.suppress(OSError):
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(0))
            reader.setblocking(False)  # asyncio's socket, as it left it
        reader.close()


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))
