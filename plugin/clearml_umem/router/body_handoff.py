"""A big request body read straight from the client's socket by the body reader process, never by the
router's event loop nor in the router's process.

Parsing in parser processes took the parse off the event loop, but the bytes still crossed it: an
8 MB body was some forty 256 KiB reads, as many pauses and resumes of the socket (uvicorn holds
64 KiB at most), an 8 MB join and an 8 MB write into a parser process's pipe in 1 MiB pieces, each
a slice of the loop that other clients' requests and the generation thread waited behind
(`benchmarks/big_bodies.py`: another client's p99 TTFT was 1.6-2.4 times what the same bodies cost
it when posted to another process). So when a request for an inference route (OpenAI's or Triton's) declares a body
bigger than `INLINE_PARSE_BYTES` (and within the body limit), the connection's protocol stops
reading at the end of its headers and keeps the body bytes that came with them (`BodyHandoff.head`);
the router puts those bytes in a memory file (`SharedBody`, one an earlier body left when it can:
`body_files.py`) and passes it, with the client's socket, to the body reader process
(`body_reader.py`), where a thread reads the rest into it (`body_reading.fill`), half a MiB at a
time; the parser pool then hands the file's descriptor to a parser process, which parses the same
pages: the body is copied from its socket into the file by a niced process, and never again. A
slow sender holds a thread of the reader process, not the loop nor a parser process.

What that changes for the connection, as nginx does for a request whose body it did not read
ahead: once the reader has read its body, it closes after its answer (`Connection: close`). A
client that leaves while its body is read is seen by the reader (the end of the stream); one that
stops sending is cut after the body timeout between reads (`--body-timeout`) with a 408. Once the
body was read, the loop reads the socket again, so a client that leaves during generation is
noticed as any other.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import select
import weakref
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clearml_umem.router.errors import APIError

BODY_IO_THREADS = 64
"""Threads of the router's that write big bodies to parser processes' pipes (those not in a memory
file) and close memory files; a thread waiting in poll costs only its stack."""

BODY_IO = concurrent.futures.ThreadPoolExecutor(max_workers=BODY_IO_THREADS, thread_name_prefix="umem-body-io")

class SharedBody:
    """A body in a memory file (memfd), shared by its descriptor with a parser process
    (`parser_pool.py`), so that its megabytes are not copied again through a pipe: that copy and
    the parser process's read of it cost as much CPU as reading the body from its socket. The body
    is the file's first `length` bytes (a file lent again by `body_files.BodyFiles` may be longer).
    At rest a body holds one descriptor; the file goes back (`dispose`) when this object and the
    parser process's mapping are both gone."""

    def __init__(self, length: int, dispose: Callable[[int], None] | None = None, fd: int | None = None) -> None:
        """`dispose(fd)` lets the descriptor go once the body is let go, from whichever thread let
        it go (`BodyReaders.dispose`); by default a body thread closes it. `fd`: a file of at least
        `length` bytes to use (`body_files.BodyFiles.take`); by default a new one."""
        self.fd = os.memfd_create("umem-body", os.MFD_CLOEXEC) if fd is None else fd
        self.length = length
        self._closed = weakref.finalize(self, dispose or close_in_a_thread, self.fd)
        if fd is None:
            try:
                os.ftruncate(self.fd, length)
            except BaseException:
                self._closed()
                raise

    def __len__(self) -> int:
        return self.length

    def __bytes__(self) -> bytes:
        return self.read(0, self.length)

    def read(self, start: int, end: int) -> bytes:
        """Bytes `start:end` of the body (offsets from its start, clamped to it): never past
        `length`, where a file lent again holds an earlier body's bytes."""
        start, end = max(0, start), min(end, self.length)
        return os.pread(self.fd, end - start, start) if end > start else b""


def close_in_a_thread(fd: int) -> None:
    """A body's last descriptor closed by a body thread: that frees its megabytes of pages, which
    took 0.6 ms a body on the event loop, where the body was let go (`py-spy` on a router taking
    six 8 MB bodies a second: half of its loop's time for them)."""
    try:
        BODY_IO.submit(os.close, fd)
    except RuntimeError:  # the pool is shut down: the process is ending
        os.close(fd)


Body = bytes | SharedBody
"""A request body as the router holds it: a big one read from its socket by the body reader is in a memory file."""

SCOPE_KEY = "umem.body_handoff"
"""Where the ASGI scope's `extensions` hold a request's `BodyHandoff`."""
TIMED_OUT_KEY = "umem.body_timed_out"
"""Set in the ASGI scope's `extensions` when the connection cut a body that stopped arriving and
answered it 408 itself (`connections.py`): the handler, which sees its client gone, logs that 408."""


@dataclass(frozen=True)
class HandoffRoutes:
    """Which requests' bodies are handed off: POSTs to `paths` (or to a path `pattern` matches
    whole), with a declared length over `min_bytes` and at most `max_bytes` (a bigger one gets its
    413 from the router, unread)."""

    paths: frozenset[str]
    min_bytes: int
    max_bytes: int
    read_timeout_s: float
    """The most the body reader waits between two reads of the body (`--body-timeout`)."""
    pattern: re.Pattern[str] | None = None

    def wants(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> int | None:
        """The declared body length when this request's body is to be handed off; None otherwise
        (chunked bodies among them: their length is not known ahead)."""
        if method != "POST" or (path not in self.paths and not (self.pattern and self.pattern.fullmatch(path))):
            return None
        length: int | None = None
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"transfer-encoding":
                return None
            if lowered == b"content-length":
                if not value.isdigit() or length is not None:
                    return None
                length = int(value)
        if length is None or not self.min_bytes < length <= self.max_bytes:
            return None
        return length


@dataclass(eq=False)
class BodyHandoff:
    """A request whose body its connection does not read: `length` bytes declared, `head` of them
    already received with the headers, the rest waiting in `socket`."""

    length: int
    read_timeout_s: float
    socket: Any
    """The connection's socket (asyncio's `TransportSocket`): its descriptor is what is passed."""
    head: bytearray = field(default_factory=bytearray)
    taken: bool = False
    """The body reader reads (or read) the body from the socket: the connection must not read it too."""
    release: Callable[[bool], None] = lambda taken: None
    """Called once the body was read from the socket (`taken`: the connection then closes after its
    answer, its HTTP parser never having seen the body) or, `taken` False, when the body came whole
    with the headers or the answer went out without it (a 401, a 403): the connection reads its
    socket again either way, and in the second case the body passes through its parser unused and
    the connection is kept alive as any other (closed unread, a socket with bytes waiting sends a
    reset, which can take the answer with it)."""

    @property
    def complete(self) -> bool:
        """The whole body came with the headers: nothing is left to read from the socket."""
        return len(self.head) >= self.length


def handoff_of(scope: MutableMapping[str, Any]) -> BodyHandoff | None:
    extensions = scope.get("extensions") or {}
    handoff = extensions.get(SCOPE_KEY)
    return handoff if isinstance(handoff, BodyHandoff) else None


def body_timed_out(scope: MutableMapping[str, Any]) -> float | None:
    """The body timeout that cut this request's body, if the connection cut it (`TIMED_OUT_KEY`)."""
    seconds = (scope.get("extensions") or {}).get(TIMED_OUT_KEY)
    return seconds if isinstance(seconds, float) else None


def body_timeout(seconds: float) -> APIError:
    return APIError(408, f"The request body stopped arriving: nothing for {seconds:g} s", code="request_timeout")


def write_all(fd: int, pieces: Sequence[bytes], timeout_s: float) -> None:
    """Write every piece to a non-blocking descriptor (a parser process's pipe: a big body read on
    the loop, a Triton request's), waiting in poll when it is full; run in a thread, so that the
    loop never copies the bytes. Raises TimeoutError
    when the reader took nothing for `timeout_s`, BrokenPipeError when it is gone."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    timeout_ms = max(1, int(timeout_s * 1000))
    for piece in pieces:
        with memoryview(piece) as view:
            done = 0
            while done < len(view):
                try:
                    done += os.write(fd, view[done:])
                except (BlockingIOError, InterruptedError):
                    if not poller.poll(timeout_ms):
                        raise TimeoutError("the parser process took nothing") from None
