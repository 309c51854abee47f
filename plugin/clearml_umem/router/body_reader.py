"""The router's side of the body reader process (`body_reader_child.py`): a big body's client socket
and memory file go there as descriptors, and the router waits for the outcome without copying a byte.

One process, started at the first big body, read by a thread per body (a slow sender holds a thread
there, not the loop, not a parser process). A job is one SOCK_SEQPACKET message, so messages and
their descriptors never mix. When the router stops waiting for a body (its request was cancelled:
the server stopping), it shuts the client's socket down, which ends the read there at once. A
reader process that dies fails the bodies it was reading with a 503 and is started again for the
next. It ends with the router: the end of its socket, PR_SET_PDEATHSIG on kill -9, `close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from dataclasses import dataclass, field

from clearml_umem.body_reading import DONE, DROP, FAILED, GONE, JOB, REPLY, STALLED
from clearml_umem.router.body_files import BodyFiles
from clearml_umem.router.body_handoff import BodyHandoff, SharedBody, body_timeout, close_in_a_thread
from clearml_umem.router.disconnect import ClientGone
from clearml_umem.router.errors import UNAVAILABLE, APIError
from clearml_umem.router.parser_pool import BUSY_RETRY_AFTER_S, spawn_child, stop_child

log = logging.getLogger(__name__)


def read_failed() -> APIError:
    return APIError(503, "The server could not read the request body; retry shortly", UNAVAILABLE,
                    code="body_read_failed", headers={"Retry-After": str(BUSY_RETRY_AFTER_S)})


@dataclass
class BodyReaders:
    """Built by `create_app`, used from the event loop only, closed by the server when it stops."""

    files: BodyFiles = field(default_factory=BodyFiles)
    proc: asyncio.subprocess.Process | None = field(default=None, repr=False)
    _side: socket.socket | None = field(default=None, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _waiting: dict[int, asyncio.Future[int]] = field(default_factory=dict, repr=False)
    _tags: itertools.count[int] = field(default_factory=itertools.count, repr=False)
    _starting: asyncio.Lock | None = field(default=None, repr=False)
    _trim: asyncio.TimerHandle | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)
    """`close()` ran on this loop: a body let go now is not kept (nothing would let it go)."""

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.returncode is None else []

    async def read(self, handoff: BodyHandoff) -> SharedBody:
        """The whole body in a memory file: the bytes that came with the headers, then the rest read
        there. Raises ClientGone (the client left), the 408 of `body_timeout`, or a 503 when the
        reader process failed."""
        loop = self._bind()
        try:
            fd = self.files.take(handoff.length, loop.time())
        except OSError as exc:  # out of descriptors or memory: the server's trouble, retried shortly
            log.error("no memory file for a %d-byte body: %s", handoff.length, exc)
            raise read_failed() from exc
        body = SharedBody(handoff.length, self.dispose, fd)
        have = min(len(handoff.head), handoff.length)
        if have:
            os.pwrite(body.fd, bytes(handoff.head[:have]), 0)
        if have >= handoff.length:
            return body
        side = await self._started()
        if handoff.socket.fileno() < 0:  # the connection was closed meanwhile (the server stopping)
            raise ClientGone()
        tag = next(self._tags)
        outcome: asyncio.Future[int] = loop.create_future()
        self._waiting[tag] = outcome
        result = FAILED
        try:
            await self._send(side, JOB.pack(tag, handoff.length, have, handoff.read_timeout_s),
                             [handoff.socket.fileno(), body.fd])
            result = await outcome
        except asyncio.CancelledError:
            if not outcome.done():  # given up on (the server stopping): the read there ends at once
                with contextlib.suppress(OSError):
                    handoff.socket.shutdown(socket.SHUT_RD)
            raise
        finally:
            self._waiting.pop(tag, None)
            if result not in (DONE, GONE, STALLED):  # no answer from the reading thread: it may write yet
                self.files.forget(body.fd)
        if result == DONE:
            return body
        if result == GONE:
            raise ClientGone()
        if result == STALLED:
            raise body_timeout(handoff.read_timeout_s)
        raise read_failed()

    def dispose(self, fd: int) -> None:
        """A body read here was let go (from any thread): its memory file is kept for the next
        body (`body_files.py`), or goes to the reader process, whose close of it is the last and
        frees its pages there, niced (`DROP`); closed by a body thread when there is no reader to
        take it."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._given_back, fd)
                return
        close_in_a_thread(fd)

    def _given_back(self, fd: int) -> None:
        loop = self._loop
        assert loop is not None
        if self._stopped or not self.files.give_back(fd, loop.time()):
            self._drop(fd)
        elif self._trim is None:
            self._trim = loop.call_later(self.files.idle_s, self._trim_idle)

    def _trim_idle(self) -> None:
        """Big bodies stopped coming: the kept files go, and their pages with them."""
        assert self._loop is not None
        self._trim = None
        if (left := self.files.idle(self._loop.time())) > 0:
            self._trim = self._loop.call_later(left, self._trim_idle)
            return
        for fd in self.files.drain():
            self._drop(fd)

    def _drop(self, fd: int) -> None:
        try:
            handed = self._side is not None and socket.send_fds(self._side, [DROP], [fd]) == len(DROP)
        except OSError:  # BlockingIOError among them: a full socket is not waited for
            handed = False
        if handed:
            os.close(fd)  # not the last reference: the message in flight holds one
        else:
            close_in_a_thread(fd)

    async def close(self) -> None:
        """End the reader process: its socket closed (it exits at the end of it), killed if it lingers."""
        proc, self.proc = self.proc, None
        self._stopped = True
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None
        for fd in self.files.drain():
            close_in_a_thread(fd)
        self._drop_side()
        await stop_child(proc)

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new loop (a test client's): the old one's process went with it
            self._loop, self._side, self.proc, self._waiting, self._trim = loop, None, None, {}, None
            self._stopped = False
            self._starting = asyncio.Lock()
        return loop

    async def _started(self) -> socket.socket:
        loop = self._bind()
        assert self._starting is not None
        async with self._starting:
            if self._side is None or self.proc is None or self.proc.returncode is not None:
                self._drop_side()
                try:
                    self.proc, self._side = await spawn_child(
                        "clearml_umem.body_reader_child", socket.SOCK_SEQPACKET, stdin=asyncio.subprocess.DEVNULL)
                except OSError as exc:  # out of descriptors or processes: this body's 503, the next tries again
                    log.error("the body reader process could not start: %s", exc)
                    raise read_failed() from exc
                loop.add_reader(self._side.fileno(), self._on_replies, self._side)
            return self._side

    async def _send(self, side: socket.socket, message: bytes, fds: list[int]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                socket.send_fds(side, [message], fds)
                return
            except BlockingIOError:
                writable: asyncio.Future[None] = loop.create_future()
                loop.add_writer(side.fileno(), _settle, writable)
                try:
                    await writable
                finally:
                    loop.remove_writer(side.fileno())
            except ConnectionError as exc:  # its end of the socket is closed: the process is gone
                log.error("the body reader process is gone (%s); starting another for the next body", exc)
                self._fail(side)
                raise read_failed() from exc
            except OSError as exc:  # this job's descriptors (the client's socket closed meanwhile)
                raise ClientGone() from exc

    def _on_replies(self, side: socket.socket) -> None:
        while True:
            try:
                reply = side.recv(REPLY.size)
            except BlockingIOError:
                return
            except OSError:
                reply = b""
            if len(reply) != REPLY.size:
                log.error("the body reader process ended; starting another for the next body")
                self._fail(side)
                return
            tag, result = REPLY.unpack(reply)
            waiting = self._waiting.get(tag)
            if waiting is not None and not waiting.done():
                waiting.set_result(result if result in (DONE, GONE, STALLED) else FAILED)

    def _fail(self, side: socket.socket) -> None:
        """The process behind `side` is gone: every body it was reading gets a 503."""
        if side is self._side:
            self._drop_side()
        for waiting in self._waiting.values():
            if not waiting.done():
                waiting.set_result(FAILED)

    def _drop_side(self) -> None:
        side, self._side = self._side, None
        if side is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(side.fileno())
        side.close()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
