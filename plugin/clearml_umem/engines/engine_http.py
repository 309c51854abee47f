"""One streamed POST to an engine server on its private socket, without a general HTTP client.

Streaming an answer from vLLM or llama-server needs one thing: send one request, read its status
and headers, then its body line by line. Through httpx that cost a hot first token more than the
router's own handler (profiled: about 1,300 Python calls a request in httpx, httpcore and anyio,
the request's headers and body in two writes, each a wake-up of the server). Here it is asyncio's
streams: the request in one write, one connection per stream (`Connection: close`: llama-server
closes it after every stream anyway), and httpx's exception types, so that callers tell a server
that died (`httpx.TransportError`) as before. Control calls (health, sleep, wake) keep the pooled
httpx client (`VLLMProcess.client`): they are rare and not on a first token's path.

Lines are split on `\\n` only, as SSE is written: httpx split them like `str.splitlines`, which
also breaks at U+2028, U+0085 and a few more that JSON may carry unescaped inside a token's text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 64 * 1024
"""A status line and headers longer than this are not an engine server's answer."""


async def _within(opening: Coroutine[Any, Any, T], seconds: float) -> T:
    """`opening`, cancelled after `seconds`: in the same task where asyncio can (3.11), since
    `wait_for` wraps it in a task of its own, one more hop through the event loop per request."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await opening
    return await asyncio.wait_for(opening, seconds)


class _Stall:
    """httpx's read timeout for a whole stream with one timer: the connection is aborted when no
    byte came for `seconds` (a timer per read would cost more than the read)."""

    def __init__(self, transport: asyncio.BaseTransport, seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport = transport
        self.seconds = seconds
        self.last = self._loop.time()
        self.fired = False
        self._handle = self._loop.call_at(self.last + seconds, self._check)

    def progressed(self) -> None:
        self.last = self._loop.time()

    def _check(self) -> None:
        if self._loop.time() - self.last >= self.seconds:
            self.fired = True
            self._transport.abort()
        else:
            self._handle = self._loop.call_at(self.last + self.seconds, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


class EngineResponse:
    """The status and headers of an engine's answer; its body read as lines or whole."""

    def __init__(self, reader: asyncio.StreamReader, stall: _Stall, status_code: int,
                 headers: dict[str, str]) -> None:
        self._reader = reader
        self._stall = stall
        self.status_code = status_code
        self.headers = headers

    async def _read(self, fn: Any, *args: Any) -> bytes:
        try:
            data: bytes = await fn(*args)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
            if self._stall.fired:
                raise httpx.ReadTimeout(f"no byte from the engine for {self._stall.seconds:g} s") from None
            if isinstance(exc, ConnectionError):
                raise httpx.ReadError(f"the engine closed the connection: {exc}") from exc
            raise httpx.RemoteProtocolError(f"the engine's answer broke off: {type(exc).__name__}") from exc
        self._stall.progressed()
        return data

    async def _body_pieces(self) -> AsyncIterator[bytes]:
        """The body's bytes as they come, by its framing: chunked, a length, or up to the close."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await self._read(self._reader.readuntil, b"\n")
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise httpx.RemoteProtocolError(f"bad chunk size {size_line[:40]!r} from the engine") from None
                if size == 0:
                    while (await self._read(self._reader.readuntil, b"\n")).strip():
                        pass  # trailers
                    return
                chunk = await self._read(self._reader.readexactly, size + 2)
                yield chunk[:-2]
        elif "content-length" in self.headers:
            length = int(self.headers["content-length"])
            if length:
                yield await self._read(self._reader.readexactly, length)
        else:
            while piece := await self._read(self._reader.read, 65536):
                yield piece

    async def aiter_lines(self) -> AsyncIterator[str]:
        """The body's lines without their endings (`\\n`, or `\\r\\n`), decoded as UTF-8."""
        pending = b""
        async with contextlib.aclosing(self._body_pieces()) as pieces:  # closed here, not by the loop's finalizer
            async for piece in pieces:
                pending += piece
                if b"\n" not in piece:
                    continue
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.rstrip(b"\r").decode("utf-8", "replace")
        if pending:
            yield pending.rstrip(b"\r").decode("utf-8", "replace")

    async def aread(self) -> bytes:
        return b"".join([piece async for piece in self._body_pieces()])


def request_bytes(host: str, path: str, body: dict[str, Any], api_key: str | None = None) -> bytes:
    """The whole request, for one write; the body encoded as httpx encodes `json=`."""
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n{auth}Connection: close\r\n\r\n")
    return head.encode("latin-1") + payload


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status code and headers (names lower-cased) of an answer's head, up to its blank line."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise httpx.RemoteProtocolError(f"not an HTTP answer from the engine: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


@contextlib.asynccontextmanager
async def post_stream(socket_path: str | None, port: int | None, path: str, body: dict[str, Any], *,
                      api_key: str | None = None, read_timeout_s: float = 600.0,
                      connect_timeout_s: float = CONNECT_TIMEOUT_S) -> AsyncIterator[EngineResponse]:
    """POST `body` as JSON to the engine on its Unix socket (else 127.0.0.1:`port`); the answer's
    head is read, its body is read by the caller. Leaving the block closes the connection, which
    makes the server stop generating."""
    try:
        if socket_path is not None:
            opening = asyncio.open_unix_connection(socket_path, limit=MAX_HEAD_BYTES)
            host = "localhost"
        else:
            opening = asyncio.open_connection("127.0.0.1", port, limit=MAX_HEAD_BYTES)
            host = f"127.0.0.1:{port}"
        reader, writer = await _within(opening, connect_timeout_s)
    except (OSError, asyncio.TimeoutError) as exc:
        raise httpx.ConnectError(f"cannot connect to the engine: {type(exc).__name__}: {exc}") from exc
    stall = _Stall(writer.transport, read_timeout_s)
    try:
        try:
            writer.write(request_bytes(host, path, body, api_key))
        except (OSError, RuntimeError) as exc:
            raise httpx.WriteError(f"cannot send to the engine: {exc}") from exc
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if stall.fired:
                raise httpx.ReadTimeout(f"no answer from the engine for {read_timeout_s:g} s") from None
            if not exc.partial:
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.") from None
            raise httpx.RemoteProtocolError("the engine's answer broke off in its headers") from exc
        except asyncio.LimitOverrunError:
            raise httpx.RemoteProtocolError(f"the engine's answer has more than {MAX_HEAD_BYTES} bytes of "
                                            "headers") from None
        except ConnectionError as exc:
            raise httpx.ReadError(f"the engine closed the connection: {exc}") from exc
        stall.progressed()
        status, headers = parse_head(head[:-4])
        yield EngineResponse(reader, stall, status, headers)
    finally:
        stall.cancel()
        writer.transport.abort()
