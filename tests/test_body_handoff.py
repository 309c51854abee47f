"""The pieces of a big body's way past the event loop (`router/body_handoff.py`): which requests
are handed off, the body reader's outcomes on a real socket, and the writer on a real pipe.
A real router's big bodies are tested in `test_router_connections.py` and `test_router_hardening.py`."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import os
import signal
import socket
import threading
import time
import types

import pytest

from clearml_umem import body_reading
from clearml_umem.body_reading import READ_BYTES, BodyGone, BodyStalled, fill
from clearml_umem.router.body_files import BodyFiles
from clearml_umem.router.body_handoff import BodyHandoff, HandoffRoutes, SharedBody, write_all
from clearml_umem.router.body_reader import BodyReaders

ROUTES = HandoffRoutes(frozenset({"/v1/chat/completions"}), min_bytes=100, max_bytes=1000, read_timeout_s=0.5)


@pytest.mark.parametrize(("method", "path", "headers", "wanted"), [
    ("POST", "/v1/chat/completions", [(b"content-length", b"500")], 500),
    ("POST", "/v1/chat/completions", [(b"Content-Length", b"1000")], 1000),
    ("POST", "/v1/chat/completions", [(b"content-length", b"100")], None),  # small: read on the loop
    ("POST", "/v1/chat/completions", [(b"content-length", b"1001")], None),  # over the limit: its 413, unread
    ("POST", "/v1/chat/completions", [(b"content-length", b"500"), (b"transfer-encoding", b"chunked")], None),
    ("POST", "/v1/chat/completions", [(b"content-length", b"500"), (b"content-length", b"500")], None),
    ("POST", "/v1/chat/completions", [(b"content-length", b"+500")], None),
    ("POST", "/v1/chat/completions", [], None),
    ("GET", "/v1/chat/completions", [(b"content-length", b"500")], None),
    ("POST", "/v2/models/m/generate", [(b"content-length", b"500")], None),
])
def test_which_bodies_are_handed_off(method: str, path: str, headers: list[tuple[bytes, bytes]],
                                     wanted: int | None) -> None:
    assert ROUTES.wants(method, path, headers) == wanted


def _pair() -> tuple[socket.socket, socket.socket]:
    client, server = socket.socketpair()
    server.setblocking(False)  # as asyncio leaves a connection's socket
    return client, server


def test_the_rest_of_a_body_is_read_as_it_trickles_in() -> None:
    client, server = _pair()
    body = os.urandom(300_000)
    shared = SharedBody(len(body))
    os.pwrite(shared.fd, body[:1000], 0)

    def send() -> None:
        for start in range(1000, len(body), 70_000):
            time.sleep(0.05)
            client.sendall(body[start:start + 70_000])

    sender = threading.Thread(target=send)
    sender.start()
    try:
        fill(server.fileno(), shared.fd, len(body), 1000, read_timeout_s=2.0)
        assert bytes(shared) == body
        assert not server.getblocking() and server.gettimeout() == 0.0, "the socket is left as asyncio holds it"
    finally:
        sender.join()
        client.close()
        server.close()


def test_a_body_is_read_in_pieces_short_enough_for_the_loop_to_get_its_core_between(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No `recv` asks for more than `READ_BYTES`: the kernel's copy of a body runs inside the call,
    and a core held for all 8 MB of it kept the router's event loop waiting 4-6 ms."""
    asked: list[int] = []

    class Recording(socket.socket):
        def recv_into(self, buffer: memoryview, nbytes: int = 0, flags: int = 0) -> int:
            asked.append(nbytes or len(buffer))
            return super().recv_into(buffer, nbytes, flags)

    recording = types.ModuleType("socket")
    recording.__dict__.update(socket.__dict__)
    recording.socket = Recording
    monkeypatch.setattr(body_reading, "socket", recording)
    client, server = _pair()
    body = os.urandom(5 * READ_BYTES + 1000)
    shared = SharedBody(len(body))
    sender = threading.Thread(target=client.sendall, args=(body,))
    sender.start()
    try:
        fill(server.fileno(), shared.fd, len(body), 0, read_timeout_s=5.0)
        assert bytes(shared) == body
        assert max(asked) <= READ_BYTES and len(asked) >= 6, asked
    finally:
        sender.join()
        client.close()
        server.close()


def test_a_sender_that_stops_is_a_408_and_one_that_leaves_is_gone() -> None:
    client, server = _pair()
    client.sendall(b"x" * 10)
    shared = SharedBody(500)  # held: its descriptor is closed when it goes
    with pytest.raises(BodyStalled):
        fill(server.fileno(), shared.fd, 500, 0, read_timeout_s=0.3)
    client.close()
    with pytest.raises(BodyGone):
        fill(server.fileno(), shared.fd, 500, 0, read_timeout_s=5.0)
    server.close()


def test_a_read_given_up_on_ends_when_its_socket_is_shut_down() -> None:
    """The router gives up on a body (the server stopping) by shutting the client's socket down: the
    reader's blocking read ends at once, not at the body timeout."""
    client, server = _pair()
    client.sendall(b"x" * 10)
    threading.Timer(0.2, server.shutdown, (socket.SHUT_RD,)).start()
    shared = SharedBody(500)
    started = time.monotonic()
    with pytest.raises(BodyGone):
        fill(server.fileno(), shared.fd, 500, 0, read_timeout_s=30.0)
    assert time.monotonic() - started < 5
    client.close()
    server.close()


def test_a_body_is_written_whole_to_a_pipe_smaller_than_it() -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    fcntl.fcntl(write_end, 1031, 65536)  # F_SETPIPE_SZ
    pieces = [b"head", os.urandom(1_000_000)]
    received = bytearray()

    def drain() -> None:
        while chunk := os.read(read_end, 100_000):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        write_all(write_end, pieces, timeout_s=5.0)
    finally:
        os.close(write_end)
        reader.join()
        os.close(read_end)
    assert bytes(received) == b"".join(pieces)


def test_a_reader_that_takes_nothing_times_the_writer_out() -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        with pytest.raises(TimeoutError):
            write_all(write_end, [b"x" * 2_000_000], timeout_s=0.3)
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize(("path", "wanted"), [
    ("/v2/models/m/generate", 500), ("/v2/models/m/generate_stream", 500), ("/v2/models/m/infer", 500),
    ("/v2/models/m/versions/1/infer", 500), ("/v2/models/m", None), ("/v2/models/m/ready", None),
    ("/v2/models//infer", None), ("/v2/models/m/infer/x", None), ("/v1/models/m/infer", None),
])
def test_tritons_inference_routes_are_handed_off_too(path: str, wanted: int | None) -> None:
    from clearml_umem.router.triton_http import BODY_PATHS

    routes = HandoffRoutes(frozenset(), min_bytes=100, max_bytes=1000, read_timeout_s=0.5, pattern=BODY_PATHS)
    assert routes.wants("POST", path, [(b"content-length", b"500")]) == wanted


def _shmem_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("Shmem:"))


def _memfds() -> list[str]:
    links = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            links.append(os.readlink(f"/proc/self/fd/{name}"))
    return [link for link in links if "umem-body" in link]


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux's /proc: where memory files' pages are counted")
def test_a_body_let_go_is_closed_last_by_the_reader_process_where_its_pages_are_freed() -> None:
    """Freeing 8 MB of a memory file's pages is kernel time (0.6-0.9 ms) charged to whoever closes
    it last: the router gives each body it does not keep for the next (`body_files.py`; here it
    keeps none) back to the niced reader process (`body_reading.DROP`). Seen here with the reader
    stopped (SIGSTOP): the router no longer holds the file, yet its 64 MB stay in memory (Shmem)
    until the reader runs again and closes it."""
    size = 64 * 2**20

    async def run() -> None:
        readers = BodyReaders(files=BodyFiles(keep=0))
        client, server = socket.socketpair()
        server.setblocking(False)
        sender = threading.Thread(target=client.sendall, args=(b"x" * size,))
        sender.start()
        try:
            body = await readers.read(BodyHandoff(size, 10.0, server))
            sender.join()
            assert bytes(body)[-3:] == b"xxx"
            pid = readers.pids[0]
            os.kill(pid, signal.SIGSTOP)
            try:
                held = _shmem_bytes()
                del body
                gc.collect()
                for _ in range(20):  # the file goes back on the loop (`call_soon_threadsafe`)
                    await asyncio.sleep(0.05)
                assert _memfds() == []
                assert _shmem_bytes() > held - size // 4, "freed while the reader process was stopped"
            finally:
                os.kill(pid, signal.SIGCONT)
            deadline = time.monotonic() + 10
            while _shmem_bytes() > held - size * 3 // 4:
                assert time.monotonic() < deadline, "the reader process did not free the body"
                await asyncio.sleep(0.05)
        finally:
            client.close()
            server.close()
            await readers.close()

    asyncio.run(run())


async def _read(readers: BodyReaders, body: bytes, head: int = 0) -> SharedBody:
    client, server = _pair()
    sender = threading.Thread(target=client.sendall, args=(body[head:],))
    sender.start()
    try:
        return await readers.read(BodyHandoff(len(body), 10.0, server, bytearray(body[:head])))
    finally:
        sender.join()
        client.close()
        server.close()


async def _settle() -> None:
    gc.collect()
    for _ in range(5):  # a body let go comes back on the loop (`call_soon_threadsafe`)
        await asyncio.sleep(0.02)


def test_a_body_let_go_lends_its_file_to_the_next_and_kept_files_go_when_bodies_stop() -> None:
    """The next body is written over the last one's pages (`body_files.py`): the same file, and
    the next body is exactly its own bytes, also where it is shorter than the file. Once no body
    came for `idle_s`, the router holds no file any more."""
    first, second = os.urandom(300_000), os.urandom(100_000)

    async def run() -> None:
        readers = BodyReaders(files=BodyFiles(keep=1, idle_s=1.0))
        try:
            body = await _read(readers, first, head=1000)
            assert bytes(body) == first
            inode = os.fstat(body.fd).st_ino
            del body
            await _settle()
            assert readers.files.kept == 1
            body = await _read(readers, second, head=500)
            assert os.fstat(body.fd).st_ino == inode and os.fstat(body.fd).st_size == len(first)
            assert len(body) == len(second) and bytes(body) == second
            whole = await readers.read(BodyHandoff(len(second), 10.0, None, bytearray(second)))  # came with its headers
            assert os.fstat(whole.fd).st_ino != inode and bytes(whole) == second
            del body, whole
            await _settle()
            assert readers.files.kept == 1, "one kept, the other let go"
            await asyncio.sleep(1.5)
            assert readers.files.kept == 0 and _memfds() == []
            body = await _read(readers, first)
            await readers.close()
            assert readers.files.kept == 0 and len(_memfds()) == 1
            del body  # let go once the router stopped: closed, not kept
            await _settle()
            assert readers.files.kept == 0 and _memfds() == []
        finally:
            await readers.close()

    asyncio.run(run())


def test_a_file_whose_read_was_given_up_on_is_never_lent_again() -> None:
    """Given up on mid-way (the server stopping), a read may still write into its file: lent to the
    next body, it could write into that one."""

    async def run() -> None:
        readers = BodyReaders(files=BodyFiles(keep=4))
        client, server = _pair()
        try:
            client.sendall(b"x" * 1000)
            reading = asyncio.ensure_future(readers.read(BodyHandoff(100_000, 10.0, server)))
            await asyncio.sleep(0.5)  # the reader process has it
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
            del reading
            await _settle()
            assert readers.files.kept == 0
            body = await _read(readers, b"y" * 200_000)
            del body
            await _settle()
            assert readers.files.kept == 1, "a body read to its end is kept"
        finally:
            client.close()
            server.close()
            await readers.close()

    asyncio.run(run())


def test_a_body_in_a_longer_file_reads_as_its_own_bytes_only() -> None:
    """A file lent again holds an earlier (another client's) body past this one's length: no read
    of the body reaches it, as none of a bytes object's slices would."""
    files = BodyFiles()
    fd = files.take(1000, now=0.0)
    os.pwrite(fd, b"s" * 1000, 0)  # the earlier body
    assert files.give_back(fd, now=1.0)
    body = SharedBody(10, fd=files.take(10, now=2.0))
    os.pwrite(body.fd, b"0123456789", 0)
    assert bytes(body) == b"0123456789"
    assert body.read(0, 1000) == b"0123456789" and body.read(5, 500) == b"56789"
    assert body.read(10, 1000) == b"" and body.read(-5, 3) == b"012" and body.read(7, 3) == b""


def test_no_memory_file_for_a_body_is_a_503_to_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of descriptors (or memory) when a big body arrives: the server's trouble, a 503 with
    Retry-After that SDKs retry, not a 500."""
    from clearml_umem.router.errors import APIError

    def no_file(name: str, flags: int = 0) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "memfd_create", no_file)

    async def run() -> APIError:
        readers = BodyReaders()
        try:
            with pytest.raises(APIError) as refused:
                await readers.read(BodyHandoff(500, 10.0, None))
            return refused.value
        finally:
            await readers.close()

    error = asyncio.run(run())
    assert error.status == 503 and error.code == "body_read_failed" and "Retry-After" in error.headers
