"""The parser process: prepares big request bodies for the router, so that their parse and
validation never hold the router's GIL (`router/parser_pool.py` starts and feeds it;
`router/schemas.prepare_body` is the work).

Run as `python -m clearml_umem.parser_child PARENT_PID SOCKET_FD`. It reads bodies from stdin,
or maps the memory file whose descriptor comes on the socket (a body the body reader process read from its
client's socket: `router/body_handoff.SharedBody`), and answers each with its outcome
(`router/parser_wire.py`: the pickled `PreparedBody`, the client's error, or a fault of its own).
It ends when stdin closes (the router exited or closed it) and, through PR_SET_PDEATHSIG, when the
router dies mid-body (kill -9 included).
"""

from __future__ import annotations

import contextlib
import gc
import json
import mmap
import os
import pickle
import signal
import socket
import sys
from typing import BinaryIO

from clearml_umem.child_process import die_with, yield_cores
from clearml_umem.router.errors import APIError
from clearml_umem.router.parser_wire import (
    ANSWER,
    FAILED,
    HEADER,
    KINDS,
    PREPARED,
    REFUSED,
    SHARED,
    BodyKind,
    decode_bounds,
)
from clearml_umem.router.schemas import prepare_body


def answer(raw: bytes | memoryview, kind: BodyKind, max_messages: int, bounds: bytes = b"{}") -> tuple[int, bytes]:
    try:
        prepared = prepare_body(raw, kind, max_messages, decode_bounds(bounds))
    except APIError as error:
        return REFUSED, json.dumps({"status": error.status, "message": error.message, "param": error.param,
                                    "code": error.code}).encode()
    except Exception as exc:  # noqa: BLE001 - told to the router, which logs it; this process lives on
        return FAILED, f"{type(exc).__name__}: {exc}".encode()
    return PREPARED, pickle.dumps(prepared, protocol=pickle.HIGHEST_PROTOCOL)


def serve(inp: BinaryIO, out: BinaryIO, side: socket.socket | None = None) -> None:
    while True:
        header = inp.read(HEADER.size)
        if len(header) < HEADER.size:
            return
        length, kind, carrier, max_messages, bounds_length = HEADER.unpack(header)
        bounds = inp.read(bounds_length)
        if len(bounds) < bounds_length:
            return
        if carrier == SHARED:
            if side is None:
                return
            mapping = _shared(side, length)
            if mapping is None:
                return
            outcome, payload = answer(memoryview(mapping), KINDS[kind], max_messages, bounds)
            _unmap(mapping)
            del mapping
        else:
            raw = inp.read(length)
            if len(raw) < length:
                return
            outcome, payload = answer(raw, KINDS[kind], max_messages, bounds)
            del raw
        out.write(ANSWER.pack(outcome, len(payload)))
        out.write(payload)
        out.flush()
        del payload


def _unmap(mapping: mmap.mmap) -> None:
    """Unmapped now: this process does not collect cycles by itself, and one that still held a view
    of the body (an exception's traceback) would keep its megabytes until the process ends."""
    try:
        mapping.close()
    except BufferError:
        gc.collect()
        with contextlib.suppress(BufferError):
            mapping.close()


def _shared(side: socket.socket, length: int) -> mmap.mmap | None:
    """The memory file whose descriptor came on `side`, mapped read-only; None when the router is
    gone or sent something else."""
    _, fds, _, _ = socket.recv_fds(side, 1, 1)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return None
    try:
        if os.fstat(fds[0]).st_size < length:
            return None
        return mmap.mmap(fds[0], length, prot=mmap.PROT_READ)
    finally:
        os.close(fds[0])


def main(argv: list[str]) -> None:
    die_with(int(argv[0]))
    yield_cores()
    # a terminal's Ctrl-C reaches the whole process group: the router decides when this one ends
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a parsed body makes no reference cycles (reference counting frees it), and the collections
    # its hundreds of thousands of objects would trigger only cost time
    gc.disable()
    side = socket.socket(fileno=int(argv[1])) if len(argv) > 1 else None
    serve(sys.stdin.buffer, sys.stdout.buffer, side)


if __name__ == "__main__":
    main(sys.argv[1:])
