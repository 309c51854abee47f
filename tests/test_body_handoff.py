"""The pieces of a big body's way past the event loop (`router/body_handoff.py`): which requests
are handed off, the reading thread's outcomes on a real socket, and the writer on a real pipe.
A real router's big bodies are tested in `test_router_connections.py` and `test_router_hardening.py`."""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time

import pytest

from clearml_umem.router.body_handoff import BodyHandoff, HandoffRoutes, read_rest, write_all
from clearml_umem.router.disconnect import ClientGone
from clearml_umem.router.errors import APIError

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
    handoff = BodyHandoff(len(body), read_timeout_s=2.0, socket=server, head=bytearray(body[:1000]))

    def send() -> None:
        for start in range(1000, len(body), 70_000):
            time.sleep(0.05)
            client.sendall(body[start:start + 70_000])

    sender = threading.Thread(target=send)
    sender.start()
    try:
        assert bytes(read_rest(handoff)) == body
    finally:
        sender.join()
        client.close()
        server.close()


def test_a_sender_that_stops_is_a_408_and_one_that_leaves_is_gone() -> None:
    client, server = _pair()
    client.sendall(b"x" * 10)
    with pytest.raises(APIError) as stopped:
        read_rest(BodyHandoff(500, read_timeout_s=0.3, socket=server))
    assert (stopped.value.status, stopped.value.code) == (408, "request_timeout")
    client.close()
    with pytest.raises(ClientGone):
        read_rest(BodyHandoff(500, read_timeout_s=5.0, socket=server))
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
