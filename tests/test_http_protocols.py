"""The router's connection limits (`router/connections.py`) on both HTTP parsers uvicorn has:
httptools, the default, and h11, the fallback where httptools is not installed. A real uvicorn
server on loopback with a small ASGI app; real sockets."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from clearml_umem.log_setup import UVICORN_LOGGING
from clearml_umem.router.connections import MAX_HEADER_BYTES, ConnectionLimits, http_protocol_base, limited_protocol

LIMITS = ConnectionLimits(header_timeout_s=1.0, body_timeout_s=1.0, idle_timeout_s=1.0, max_connections=16)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/early":  # answers before it reads its body, as a refusal by key does
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer = b"got %d" % len(body)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(answer))]})
    await send({"type": "http.response.body", "body": answer})


@pytest.fixture(params=[HttpToolsProtocol, H11Protocol], ids=["httptools", "h11"])
def server(request: pytest.FixtureRequest) -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, **UVICORN_LOGGING, lifespan="off",  # type: ignore[arg-type]
                            http=limited_protocol(LIMITS, base=request.param), timeout_keep_alive=1)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(srv.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started
    yield port
    srv.should_exit = True
    thread.join(30)


def _answer(sock: socket.socket, within: float = 10) -> bytes:
    """All the server sent until it closed the connection (or `within` seconds passed)."""
    sock.settimeout(within)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return received


def test_the_default_parser_is_httptools() -> None:
    assert http_protocol_base() is HttpToolsProtocol


def test_requests_are_answered_and_kept_alive(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server)) as sock:
        for size in (0, 70_000):
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size + b"a" * size)
            sock.settimeout(10)
            head = sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"got %d" % size), head


def test_headers_over_the_cap_are_refused_and_the_connection_closed(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"b" * (MAX_HEADER_BYTES + 100) + b"\r\n")
        answer = _answer(sock)
    status = answer.split(b"\r\n", 1)[0]
    assert status.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400")), answer[:300]  # h11 answers its own 400


def test_idle_and_trickling_connections_are_closed(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server)) as idle, \
            socket.create_connection(("127.0.0.1", server)) as slow:
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert _answer(idle) == b""
        assert b"408" in _answer(slow).split(b"\r\n", 1)[0]
        assert time.monotonic() - started < 9  # closed by the 1 s limits, not by _answer's own 10 s


def test_a_body_that_stops_gets_a_408_and_nothing_after_it(server: int) -> None:
    """As nginx answers (`client_body_timeout`): the client learns why it was cut. The app, which
    then sees its client gone and answers, must not add a second response behind the 408."""
    with socket.create_connection(("127.0.0.1", server)) as half:
        half.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\":")
        started = time.monotonic()
        answer = _answer(half)
        assert time.monotonic() - started < 9
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert answer.count(b"HTTP/1.1 ") == 1 and b"got " not in answer, answer
    assert b'"code": "request_timeout"' in answer and b"stopped arriving" in answer, answer


def test_a_body_that_stops_after_its_answer_is_cut_without_a_second_answer(server: int) -> None:
    """An app that answered before reading its body (a 401, say) has answered: the body that then
    stops is cut with nothing added behind the answer."""
    with socket.create_connection(("127.0.0.1", server)) as early:
        early.sendall(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\":")
        answer = _answer(early)
    assert answer.startswith(b"HTTP/1.1 401 ") and answer.count(b"HTTP/1.1 ") == 1, answer
