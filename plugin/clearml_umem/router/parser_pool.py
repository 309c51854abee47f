"""Big request bodies are parsed and validated in parser processes, never in the router's.

orjson and pydantic hold the GIL for the whole of each call: in the router's process (even in a
thread of its own) a 6.8 MB body of 200,000 one-character messages held up every other client for
a tenth of a second, and an 8 MB conversation that passes every bound still cost 40 ms of parse,
count and validation in slices, each slice a wait for the event loop. So a body over
`INLINE_PARSE_BYTES` goes to a parser process (`clearml_umem.parser_child`), which does all of
that (`schemas.prepare_body`) and answers with the prepared body, pickled, or the client's 4xx.
The router only unpickles it (one call, a few milliseconds for 8 MB, in its parser thread) and
validates the few settings that depend on the model's defaults.

With each body go the prompt bounds of the models served (`parser_wire.encode_bounds`), so that a
prompt that cannot fit its model is refused there too: then only a small error comes back.

The processes are started at the first big body, fed through pipes by one task each. A body read
from its socket by the body reader process is in a memory file (`body_handoff.SharedBody`): its descriptor goes to
the parser process over a Unix socket of its own, and the process parses the same pages. Any other
body's bytes are written to the pipe by a thread (`body_handoff.write_all`). They end with the router: they read
EOF when it exits, die with it through PR_SET_PDEATHSIG when it is killed, and are closed by
`close()` on a clean stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clearml_umem.router.body_handoff import BODY_IO, Body, SharedBody, write_all
from clearml_umem.router.errors import UNAVAILABLE, APIError
from clearml_umem.router.parser_wire import (
    ANSWER,
    FAILED,
    HEADER,
    KINDS,
    PIPED,
    PREPARED,
    REFUSED,
    SHARED,
    BodyKind,
)

log = logging.getLogger(__name__)

PARSER_PROCESSES = 2
"""Bodies checked at once. Two keep a second body moving while one is parsed, and leave the
other cores (and the router's own) to the engines."""

PARSER_QUEUE = 16
"""Big bodies that may wait for a parser process beyond those being checked; each waits as its
bytes only (at most `--max-request-bytes`, 8 MiB by default, so 128 MiB in all by default).
One more gets a 503 with Retry-After: the server is busy, not the client over a quota of its own
(a 429 says that), and OpenAI's SDKs wait and retry either."""

CHECK_TIMEOUT_S = 30.0
"""The longest one body may take (the worst 8 MiB body takes about a second on a busy core); a
parser process that takes longer is killed and replaced, and its client gets a 503."""

BUSY_RETRY_AFTER_S = 1

_PIPE_BYTES = 2**20
"""Pipe buffer asked of Linux (F_SETPIPE_SZ; 1 MiB is what any user may ask): an 8 MiB body then
crosses in 8 writes, not 128."""

_F_SETPIPE_SZ = 1031


def busy(pending: int) -> APIError:
    return APIError(503, f"The server is checking {pending} large request bodies already; retry shortly",
                    UNAVAILABLE, code="server_busy", headers={"Retry-After": str(BUSY_RETRY_AFTER_S)})


def check_failed() -> APIError:
    return APIError(503, "The server could not check the request body; retry shortly", UNAVAILABLE,
                    code="body_check_failed", headers={"Retry-After": str(BUSY_RETRY_AFTER_S)})


@dataclass(frozen=True)
class _Answer:
    outcome: int
    payload: bytes


@dataclass(eq=False)
class _Job:
    raw: Body | None
    kind: BodyKind
    max_messages: int
    bounds: bytes
    verdict: asyncio.Future[_Answer]


@dataclass(eq=False)
class _Slot:
    """One parser process, the socket its shared bodies' descriptors go through, and the task that feeds it."""

    proc: asyncio.subprocess.Process | None = None
    side: socket.socket | None = None
    task: asyncio.Task[None] | None = None


@dataclass
class ParserPool:
    """The router's parser processes and the bounded queue of bodies waiting for them; built by
    `create_app`, used from the event loop only, closed by the server when it stops."""

    processes: int = PARSER_PROCESSES
    queue: int = PARSER_QUEUE
    timeout_s: float = CHECK_TIMEOUT_S
    checked: int = 0
    """Bodies a parser process answered."""
    skipped: int = 0
    """Bodies whose client left before a parser process took them: never sent to one."""
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _jobs: asyncio.Queue[_Job] | None = field(default=None, repr=False)
    _live: set[_Job] = field(default_factory=set, repr=False)
    _slots: list[_Slot] = field(default_factory=list, repr=False)

    async def prepare(self, raw: Body, kind: BodyKind, max_messages: int, bounds: bytes = b"{}") -> bytes:
        """The prepared body, pickled (`schemas.PreparedBody`, for `pickle.loads`); raises the
        client's 4xx (a prompt longer than its model's `bounds` allow among them: `parser_wire.
        encode_bounds`), or a 503 when the pool is full or the parser process failed. Cancelled (the
        client left), the body is dropped at once and never sent to a parser process if none has
        taken it yet."""
        if len(self._live) >= self.processes + self.queue:
            raise busy(len(self._live))
        jobs = self._started()
        job = _Job(raw, kind, max_messages, bounds, asyncio.get_running_loop().create_future())
        del raw
        self._live.add(job)
        jobs.put_nowait(job)
        try:
            verdict = await job.verdict
        finally:
            job.raw = None
            self._live.discard(job)
            job.verdict.cancel()
        if verdict.outcome == REFUSED:
            error = json.loads(verdict.payload)
            raise APIError(int(error.get("status") or 400), str(error.get("message")), param=_text(error.get("param")),
                           code=_text(error.get("code")))
        if verdict.outcome == FAILED:
            log.error("a parser process failed on a request body: %s", verdict.payload.decode(errors="replace"))
            raise check_failed()
        return verdict.payload

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self._slots if s.proc is not None and s.proc.returncode is None]

    async def close(self) -> None:
        """End the parser processes: stdin closed (they exit at its end), killed if they linger."""
        slots, self._slots, self._jobs, self._loop = self._slots, [], None, None
        for slot in slots:
            if slot.task is not None:
                slot.task.cancel()
        for slot in slots:
            await stop_child(slot.proc)
            _close(slot)
        for job in list(self._live):
            job.verdict.cancel()

    def _started(self) -> asyncio.Queue[_Job]:
        loop = asyncio.get_running_loop()
        if self._jobs is None or self._loop is not loop:
            # a new loop (a test client's): the old one's tasks and pipes went with it
            self._loop, self._jobs, self._live = loop, asyncio.Queue(), set()
            self._slots = [_Slot() for _ in range(self.processes)]
            for i, slot in enumerate(self._slots):
                slot.task = loop.create_task(self._feed(slot, self._jobs), name=f"umem-parser-{i}")
        return self._jobs

    async def _feed(self, slot: _Slot, jobs: asyncio.Queue[_Job]) -> None:
        while True:
            job = await jobs.get()
            raw, job.raw = job.raw, None
            if job.verdict.done() or raw is None:
                self.skipped += 1
                continue
            verdict = await self._verdict(slot, raw, job)
            del raw
            if not job.verdict.done():
                job.verdict.set_result(verdict)

    async def _verdict(self, slot: _Slot, raw: Body, job: _Job) -> _Answer:
        """The parser process's answer; a process found dead is replaced and asked again, once."""
        for attempt in (1, 2):
            try:
                return await asyncio.wait_for(self._ask(slot, raw, job), self.timeout_s)
            except (asyncio.TimeoutError, OSError, EOFError, ValueError) as exc:
                log.error("parser process %s failed (%s: %s); starting another", slot.proc and slot.proc.pid,
                          type(exc).__name__, exc)
                await stop_child(slot.proc, grace_s=0)
                _close(slot)
                if attempt == 2 or isinstance(exc, asyncio.TimeoutError):
                    return _Answer(FAILED, f"{type(exc).__name__}: {exc}".encode())
        raise AssertionError("unreachable")

    async def _ask(self, slot: _Slot, raw: Body, job: _Job) -> _Answer:
        proc = slot.proc
        if proc is None or proc.returncode is not None:
            _close(slot)
            proc, slot.side = await _spawn()
            slot.proc = proc
        assert proc.stdin is not None and proc.stdout is not None and slot.side is not None
        header = HEADER.pack(len(raw), KINDS.index(job.kind), SHARED if isinstance(raw, SharedBody) else PIPED,
                             job.max_messages, len(job.bounds))
        pipe = proc.stdin.get_extra_info("pipe")
        if isinstance(raw, SharedBody):  # one byte and a descriptor; the parser process maps the body
            proc.stdin.write(header + job.bounds)
            await proc.stdin.drain()
            socket.send_fds(slot.side, [b"\0"], [raw.fd])
        elif pipe is None:
            proc.stdin.write(header + job.bounds)
            proc.stdin.write(memoryview(raw))
            await proc.stdin.drain()
        else:  # megabytes: written by a thread, never copied on the event loop (`body_handoff.py`)
            await asyncio.get_running_loop().run_in_executor(BODY_IO, write_all, pipe.fileno(),
                                                             (header, job.bounds, raw), self.timeout_s)
        try:
            outcome, length = ANSWER.unpack(await proc.stdout.readexactly(ANSWER.size))
            payload = await proc.stdout.readexactly(length)
        except asyncio.IncompleteReadError:
            raise EOFError("the parser process ended") from None
        if outcome not in (PREPARED, REFUSED, FAILED):
            raise ValueError(f"unexpected outcome {outcome}")
        self.checked += 1
        return _Answer(outcome, payload)


def child_env() -> dict[str, str]:
    """The child imports this package from where the router did, also when a script put it on
    sys.path itself rather than installing it."""
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else "")}


async def spawn_child(module: str, kind: socket.SocketKind, **options: Any,
                      ) -> tuple[asyncio.subprocess.Process, socket.socket]:
    """A helper process (`python -m module PARENT_PID SOCKET_FD`, `options` for the subprocess), and the
    router's end, non-blocking, of the Unix socket of `kind` whose other end it is given."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, str(os.getpid()), str(theirs.fileno()), env=child_env(),
            pass_fds=(theirs.fileno(),), **options)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.setblocking(False)
    return proc, ours


async def _spawn() -> tuple[asyncio.subprocess.Process, socket.socket]:
    """A parser process, and the router's end of the socket its shared bodies' descriptors go through
    (non-blocking: it holds at most one message, as each body waits for its answer)."""
    proc, ours = await spawn_child("clearml_umem.parser_child", socket.SOCK_STREAM, stdin=asyncio.subprocess.PIPE,
                                   stdout=asyncio.subprocess.PIPE, limit=2**20)
    assert proc.stdin is not None
    pipe = proc.stdin.get_extra_info("pipe")
    if pipe is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
    return proc, ours


def _close(slot: _Slot) -> None:
    if slot.side is not None:
        slot.side.close()
    slot.proc = slot.side = None


async def stop_child(proc: asyncio.subprocess.Process | None, grace_s: float = 2.0) -> None:
    """End a helper process of `spawn_child`'s: its stdin closed, if a pipe (a parser process exits at
    its end; the caller has closed the socket the body reader waits on), killed after `grace_s` (0: at once)."""
    if proc is None or proc.returncode is not None:
        return
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        if grace_s <= 0:
            raise asyncio.TimeoutError
        await asyncio.wait_for(proc.wait(), grace_s)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _text(value: object) -> str | None:
    return None if value is None else str(value)
