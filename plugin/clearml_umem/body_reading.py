"""A big body's read from its client's socket into its memory file, and what the router and its body
reader process (`body_reader_child.py`) say about it: a job (its tag, the body's length, the bytes
already in its memory file, the body timeout) with the client's socket and the memory file as
descriptors, and the job's outcome. Light on purpose: the reader process imports it, not the
router's package."""

from __future__ import annotations

import contextlib
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

DROP = b"D"
"""A message of its own, with one descriptor: a memory file the router let go of and does not keep
(`router/body_files.py`), for the reader to close. Its last close frees the body's pages (0.6-0.9
ms of kernel time for 8 MB), which is then spent here, niced, rather than in a thread of the
router's at the router's priority."""


READING_THREADS = 64
"""Bodies read at once; a thread waiting on a slow sender costs only its stack, and one more waits
for a free thread while its sender waits on TCP's window."""


WAKE_CHECK_S = 0.25
"""How often a reading thread (of the body reader process) wakes while a body is still arriving (a slow sender's)."""

READ_BYTES = 512 * 2**10
"""The most one `recv` asks for, into a buffer this size, written to the memory file from there.
The kernel's copy runs inside the call, where Linux preempts it only at its end (or at a tick,
4 ms): in one call for a whole 8 MB body, the copy held its core for 4-6 ms, and the router's
event loop, woken onto that core by its timer or a client, waited out most of it (`perf sched`,
2 cores: 1.4-1.9 such waits a second of 4 ms each, at six long bodies a second). Half a MiB is a
few tenths of a millisecond of copy. Through a buffer rather than into a mapping of the file: each
page of a shared mapping written is a page fault. The reader's CPU for an 8 MB body, a new file
(its pages then freed) against one kept from an earlier body (`router/body_files.py`): 7.5 and
3.8 ms mapped, 5.1 and 2.6 ms through the buffer (a socket pair, Linux 6.18)."""


class BodyGone(Exception):
    """The stream ended before the body did: the client left, or the router shut the socket down."""


class BodyStalled(Exception):
    """Nothing came for the body timeout."""


def fill(sock_fd: int, mem_fd: int, length: int, have: int, read_timeout_s: float) -> None:
    """Read bytes `have`..`length` of a body from the client's socket into its memory file. Run in
    a thread of the body reader process (`body_reader_child.py`), never in the router's. Raises
    BodyGone at the end of the stream (the client left, or the router shut the socket down: it
    gave up on the body), BodyStalled when nothing came for `read_timeout_s`.

    The socket is read blocking, `READ_BYTES` at a time, with MSG_WAITALL, which returns once
    those have arrived, or after `WAKE_CHECK_S` with what came by then (SO_RCVTIMEO: a slow
    sender's bytes and the timeout are checked that often). The socket the router holds shares the
    blocking mode until the read ends; meanwhile the router neither reads it (paused) nor writes
    to it (the request has no answer yet)."""
    buffer = memoryview(bytearray(min(READ_BYTES, max(length - have, 1))))
    reader = socket.socket(fileno=os.dup(sock_fd))
    last_byte = time.monotonic()
    try:
        reader.setblocking(True)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(WAKE_CHECK_S))
        while have < length:
            try:
                count = reader.recv_into(buffer[:length - have], 0, socket.MSG_WAITALL)
            except BlockingIOError:  # nothing for WAKE_CHECK_S
                count = -1
            except OSError as exc:  # reset by the client
                raise BodyGone() from exc
            if count == 0:
                raise BodyGone()
            if count > 0:
                _write_all(mem_fd, buffer[:count], have)
                have += count
                last_byte = time.monotonic()
            elif time.monotonic() - last_byte >= read_timeout_s:
                raise BodyStalled()
    finally:
        with contextlib.suppress(OSError):
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(0))
            reader.setblocking(False)  # asyncio's socket, as it left it
        reader.close()


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))
