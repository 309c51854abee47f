"""The engine's streaming client (engines/engine_http.py) against scripted servers on real sockets.

Each server reads one request and answers with the exact bytes the test gives it (chunk
boundaries included), so framing, line splitting and every way a server can fail are exercised
without an engine.
"""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from clearml_umem.engines.engine_http import drop_spare, parse_head, post_stream, request_bytes

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    _, headers = parse_head(b"HTTP/1.1 200 x\r\n" + head.split(b"\r\n", 1)[1][:-4])
    body = await reader.readexactly(int(headers["content-length"]))
    return head, body


def serve(script: Script, scenario: Callable[[str], Awaitable[None]]) -> None:
    """Run `scenario(socket_path)` against a Unix-socket server that runs `script` per connection."""

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="umem-http-") as tmp:
            path = str(Path(tmp) / "s.sock")
            server = await asyncio.start_unix_server(script, path)
            try:
                await asyncio.wait_for(scenario(path), 10)
            finally:
                server.close()

    asyncio.run(main())


async def lines_of(path: str, **kwargs: object) -> list[str]:
    async with post_stream(path, None, "/v1/chat/completions", {"x": 1}, **kwargs) as resp:  # type: ignore[arg-type]
        assert resp.status_code == 200
        return [line async for line in resp.aiter_lines()]


def test_lines_are_split_at_newlines_only_across_any_chunking() -> None:
    """U+2028 and U+0085 may sit unescaped in a JSON string: they are not line ends (httpx split at them)."""
    event = json.dumps({"t": "a\u2028b\x85c é"}, ensure_ascii=False).encode()
    stream = b"data: " + event + b"\r\n\r\ndata: [DONE]\n\n"
    cut = stream.index("é".encode()) + 1  # inside the two bytes of é

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD + chunked(stream[:5], stream[5:cut], stream[cut:]))
        await writer.drain()
        writer.close()

    async def scenario(path: str) -> None:
        assert await lines_of(path) == ["data: " + event.decode(), "", "data: [DONE]", ""]

    serve(script, scenario)


def test_the_request_is_one_post_with_the_json_body_and_closes() -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(HEAD + chunked(b"data: [DONE]\n\n"))
        writer.close()

    async def scenario(path: str) -> None:
        async with post_stream(path, None, "/v1/completions", {"prompt": "é", "n": 1}) as resp:
            assert [line async for line in resp.aiter_lines()] == ["data: [DONE]", ""]

    serve(script, scenario)
    head, body = seen[0]
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert b"\r\nConnection: close\r\n" in head and b"\r\nContent-Type: application/json\r\n" in head
    assert b"Authorization" not in head
    assert json.loads(body) == {"prompt": "é", "n": 1}


def test_an_error_answer_is_read_whole_by_its_length() -> None:
    error = json.dumps({"error": {"message": "the prompt exceeds the available context size"}}).encode()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\nContent-Type: application/json\r\n\r\n%s"
                     % (len(error), error))
        await writer.drain()  # the connection stays open: the length ends the body

    async def scenario(path: str) -> None:
        async with post_stream(path, None, "/v1/completions", {}) as resp:
            assert resp.status_code == 400
            assert resp.headers["content-type"] == "application/json"
            assert await resp.aread() == error

    serve(script, scenario)


@pytest.mark.parametrize("answer", [b"", b"HTTP/1.1 200 OK\r\nTransfer-", HEAD + b"1a\r\ndata: {"])
def test_a_server_that_hangs_up_is_a_transport_error(answer: bytes) -> None:
    """What a dying engine looks like to the stream: callers restart it on httpx.TransportError."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    async def scenario(path: str) -> None:
        with pytest.raises(httpx.RemoteProtocolError):
            await lines_of(path)

    serve(script, scenario)


def test_a_missing_socket_is_a_connect_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        with pytest.raises(httpx.ConnectError):
            await lines_of(str(tmp_path / "gone.sock"))

    asyncio.run(scenario())


def test_a_server_that_goes_quiet_is_a_read_timeout() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD + chunked(b"data: 1\n")[:-5])
        await writer.drain()
        await asyncio.sleep(30)

    async def scenario(path: str) -> None:
        async with post_stream(path, None, "/x", {}, read_timeout_s=0.3) as resp:
            lines = resp.aiter_lines()
            assert await lines.__anext__() == "data: 1"
            with pytest.raises(httpx.ReadTimeout):
                await lines.__anext__()
            await lines.aclose()

    serve(script, scenario)


def test_over_tcp_the_key_is_sent() -> None:
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append((await read_request(reader))[0])
        writer.write(HEAD + chunked(b"data: [DONE]\n"))
        writer.close()

    async def main() -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = await asyncio.start_server(script, "127.0.0.1", port)
        try:
            async with post_stream(None, port, "/v1/completions", {}, api_key="k3y") as resp:
                assert [line async for line in resp.aiter_lines()] == ["data: [DONE]"]
        finally:
            server.close()

    asyncio.run(main())
    assert b"\r\nHost: 127.0.0.1:" in seen[0]
    assert b"\r\nAuthorization: Bearer k3y\r\n" in seen[0]


def test_request_bytes_carry_the_length_of_the_encoded_body() -> None:
    raw = request_bytes("localhost", "/p", {"s": "日本"})
    head, body = raw.split(b"\r\n\r\n", 1)
    assert f"Content-Length: {len(body)}".encode() in head and json.loads(body) == {"s": "日本"}
    with pytest.raises(ValueError):
        request_bytes("localhost", "/p", {"x": float("nan")})  # as httpx: no NaN in JSON


class Counted:
    """A server script that answers every request with one line, numbering its connections."""

    def __init__(self, hang_up_on: frozenset[int] = frozenset()) -> None:
        self.accepted: list[float] = []
        self.served_on: list[int] = []
        self.ended: list[int] = []
        self.hang_up_on = hang_up_on

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = len(self.accepted)
        self.accepted.append(asyncio.get_running_loop().time())
        try:
            await read_request(reader)
        except asyncio.IncompleteReadError:
            self.ended.append(number)  # closed by the client without a request
            return
        if number in self.hang_up_on:
            writer.close()  # as a server that went away just as the request came
            return
        self.served_on.append(number)
        writer.write(HEAD + chunked(b"data: %d\n" % number))
        await writer.drain()
        writer.close()


def test_the_next_request_goes_out_on_a_connection_opened_after_the_last_answer() -> None:
    server = Counted()

    async def scenario(path: str) -> None:
        assert await lines_of(path) == ["data: 0"]
        await asyncio.sleep(0.2)  # the spare connection opens between requests
        assert len(server.accepted) == 2
        started = asyncio.get_running_loop().time()
        assert await lines_of(path) == ["data: 1"]
        assert server.accepted[1] < started  # it was open before the request began
        await asyncio.sleep(0.2)
        drop_spare(path, None)  # as an engine that stops does first
        await asyncio.sleep(0.2)

    serve(server, scenario)
    assert server.served_on == [0, 1] and server.ended == [2]


def test_a_spare_connection_the_server_dropped_is_replaced_not_reported() -> None:
    server = Counted(hang_up_on=frozenset({1}))

    async def scenario(path: str) -> None:
        assert await lines_of(path) == ["data: 0"]
        await asyncio.sleep(0.2)
        assert await lines_of(path) == ["data: 2"]  # the spare (1) hung up; a new connection answered

    serve(server, scenario)
    assert server.served_on == [0, 2]
