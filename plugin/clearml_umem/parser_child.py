"""The parser process: checks big request bodies for the router, so that their parse never holds
the router's GIL (`router/parser_pool.py` starts and feeds it; `json_body.py` is the check).

Run as `python -m clearml_umem.parser_child PARENT_PID`. It reads checks from stdin, each a
header (`HEADER`: body length, chat flag, the messages cap) and the body, and answers each with
one JSON line: `{"ok": true}`, or the client's 400 as `{"message", "param", "code"}`, or
`{"failed": reason}` for a fault of its own. It ends when stdin closes (the router exited or
closed it) and, through PR_SET_PDEATHSIG, when the router dies mid-check (kill -9 included).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import signal
import struct
import sys
from typing import BinaryIO

from clearml_umem.json_body import BodyProblem, load_body

HEADER = struct.Struct("!IBI")
"""Body length in bytes, chat (1) or not (0), the messages cap."""

_PR_SET_PDEATHSIG = 1

NICENESS = 10
"""Added to this process's nice value: where cores are short, the router's event loop and the
engines run first, and a big body waits for its check instead (it is refused or passed a little later)."""


def die_with(parent: int) -> None:
    """Ask Linux to kill this process when its parent ends; exit at once if it already has."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the end of stdin still ends it
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        raise SystemExit(0)


def answer(raw: bytes, chat: bool, max_messages: int) -> dict[str, object]:
    try:
        load_body(raw, chat, max_messages)
    except BodyProblem as problem:
        return dict(problem.as_dict())
    except Exception as exc:  # noqa: BLE001 - told to the router, which logs it; this process lives on
        return {"failed": f"{type(exc).__name__}: {exc}"}
    return {"ok": True}


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    while True:
        header = inp.read(HEADER.size)
        if len(header) < HEADER.size:
            return
        length, chat, max_messages = HEADER.unpack(header)
        raw = inp.read(length)
        if len(raw) < length:
            return
        out.write(json.dumps(answer(raw, bool(chat), max_messages)).encode() + b"\n")
        out.flush()
        del raw


def main(argv: list[str]) -> None:
    die_with(int(argv[0]))
    os.nice(NICENESS)
    # a terminal's Ctrl-C reaches the whole process group: the router decides when this one ends
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a parsed body makes no reference cycles (reference counting frees it), and the collections
    # its hundreds of thousands of objects would trigger only cost time
    gc.disable()
    serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main(sys.argv[1:])
