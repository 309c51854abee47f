"""The body reader process: reads big request bodies from their clients' sockets, so that the router's
process never copies their bytes (`router/body_reader.py` starts and feeds it).

Reading a body is a kernel copy of megabytes, done by whichever thread calls `recv`. In a thread of
the router's process it ran at the router's priority, beside its event loop and engines: another
client's loop steps waited 3-5 ms on the run queue for a core (per-thread `schedstat`, 2 cores),
twice as often as while the same bodies went to a process of their own (`benchmarks/big_bodies.py`).
A niced thread of the router's did worse: preempted while holding the GIL, it held up the loop. Here
the copy runs niced, like the parser processes, and holds no lock the router needs. It imports
nothing of the router's package (`body_reading.py`, `child_process.py`): it starts in tens of
milliseconds, at the first big body.

Run as `python -m clearml_umem.body_reader_child PARENT_PID SOCKET_FD`. Each job comes on the
socket (SOCK_SEQPACKET) as one message carrying two descriptors, the client's socket and the body's
memory file: a thread fills the file (`body_reading.fill`) and the outcome goes back with the job's
tag. A memory file the router let go of and does not keep for a later body (`router/body_files.py`)
comes back alone (`DROP`) to be closed here, where freeing its pages costs no core the router
needs. It ends when the socket closes (the router exited or closed it) and, through
PR_SET_PDEATHSIG, when the router dies (kill -9 included).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import sys
import threading

from clearml_umem.body_reading import (
    DONE,
    DROP,
    FAILED,
    GONE,
    JOB,
    READING_THREADS,
    REPLY,
    STALLED,
    BodyGone,
    BodyStalled,
    fill,
)
from clearml_umem.child_process import die_with, yield_cores


def serve(channel: socket.socket) -> None:
    """Until the router closes the socket; its caller then ends the process without waiting for the
    threads (a slow sender's body is nobody's any more)."""
    replies = threading.Lock()
    pool = concurrent.futures.ThreadPoolExecutor(READING_THREADS, thread_name_prefix="umem-body-read")
    # a close of its own: freeing a body's pages takes a millisecond of CPU, and the next job waits for none
    drops = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="umem-body-drop")
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(channel, JOB.size, 2)
        except OSError:
            return
        if not message:
            return
        if message == DROP and len(fds) == 1:
            drops.submit(os.close, fds[0])  # the body's last reference: its pages are freed here, niced
            continue
        if len(message) != JOB.size or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        pool.submit(_read, channel, replies, *JOB.unpack(message), *fds)


def _read(channel: socket.socket, replies: threading.Lock, tag: int, length: int, have: int, timeout_s: float,
          sock_fd: int, mem_fd: int) -> None:
    outcome = FAILED
    try:
        fill(sock_fd, mem_fd, length, have, timeout_s)
        outcome = DONE
    except BodyGone:
        outcome = GONE
    except BodyStalled:
        outcome = STALLED
    except Exception:  # noqa: BLE001 - the router answers 503 and logs it
        outcome = FAILED
    finally:
        os.close(sock_fd)
        os.close(mem_fd)
    with replies:
        try:
            channel.send(REPLY.pack(tag, outcome))
        except OSError:  # the router is gone
            os._exit(0)


def main(argv: list[str]) -> None:
    die_with(int(argv[0]))
    yield_cores()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the router decides when this one ends
    serve(socket.socket(fileno=int(argv[1])))
    os._exit(0)  # threads still waiting on slow senders end with the process


if __name__ == "__main__":
    main(sys.argv[1:])
