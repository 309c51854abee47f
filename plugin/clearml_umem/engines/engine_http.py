"""One streamed POST to an engine server on its private socket, without a general HTTP client.

Streaming an answer from vLLM or llama-server needs one thing: send one request, read its status
and headers, then its body line by line. Through httpx that cost a hot first token more than the
router's own handler (profiled: about 1,300 Python calls a request in httpx, httpcore and anyio,
the request's headers and body in two writes, each a wake-up of the server). Here it is asyncio's
streams: the request in one write, one connection per stream (`Connection: close`: llama-server
closes it after every stream anyway), and httpx's exception types, so that callers tell a server
that died (`httpx.TransportError`) as before. Control calls (health, sleep, wake) keep the pooled
httpx client (`VLLMProcess.client`): they are rare and not on a first token's path.

Each engine has one connection opened ahead of need (`_Spare`): llama-server closes every connection
after its answer, and opening the next one (asyncio's streams: 80 µs alone, 0.28 ms measured in
a router under load) sat on every first token's path; now it happens after an answer, between requests.

Lines are split on `\\n` only, as SSE is written: httpx split them like `str.splitlines`, which
also breaks at U+2028, U+0085 and a few more that JSON may carry unescaped inside a token's text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10.0
SPARE_MAX_AGE_S = 10.0
"""A spare connection older than this is closed rather than used: an idle server may be about to
close it (llama-server's read timeout is 600 s; a stale one is retried once anyway)."""
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


Address = tuple[str | None, int | None]
"""An engine server's Unix socket path, else its 127.0.0.1 port."""


@dataclass
class _Spare:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    loop: asyncio.AbstractEventLoop
    opened: float


_spares: dict[Address, _Spare] = {}
_opening: dict[Address, asyncio.Task[None]] = {}


def _take_spare(address: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """The address's spare connection if it is still good for this loop, else None (and it is closed)."""
    spare = _spares.pop(address, None)
    if spare is None:
        return None
    loop = asyncio.get_running_loop()
    if (spare.loop is loop and not spare.reader.at_eof() and not spare.writer.transport.is_closing()
            and loop.time() - spare.opened < SPARE_MAX_AGE_S):
        return spare.reader, spare.writer
    _discard(spare)
    return None


def _discard(spare: _Spare) -> None:
    """Close a spare connection; one of a loop that has closed (a test's) closes when collected."""
    if not spare.loop.is_closed():
        spare.writer.transport.abort()


def _open_spare(address: Address) -> None:
    """Open the address's next connection in the background, unless one is open or opening."""
    loop = asyncio.get_running_loop()
    opening = _opening.get(address)
    if address in _spares or (opening is not None and not opening.done() and opening.get_loop() is loop):
        return

    async def open_one() -> None:
        try:
            reader, writer = await _within(_connect(address), CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            return  # the next request connects itself, and reports what fails
        finally:
            _opening.pop(address, None)
        old = _spares.pop(address, None)
        if old is not None:
            _discard(old)
        _spares[address] = _Spare(reader, writer, loop, loop.time())

    _opening[address] = loop.create_task(open_one(), name="umem-engine-spare")


def drop_spare(socket_path: str | None, port: int | None) -> None:
    """Close the spare connection to a server that stops (its socket may be reused by the next one)."""
    spare = _spares.pop((socket_path, port), None)
    if spare is not None:
        _discard(spare)


def _connect(address: Address) -> Coroutine[Any, Any, tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    socket_path, port = address
    if socket_path is not None:
        return asyncio.open_unix_connection(socket_path, limit=MAX_HEAD_BYTES)
    return asyncio.open_connection("127.0.0.1", port, limit=MAX_HEAD_BYTES)


@contextlib.asynccontextmanager
async def post_stream(socket_path: str | None, port: int | None, path: str, body: dict[str, Any], *,
                      api_key: str | None = None, read_timeout_s: float = 600.0,
                      connect_timeout_s: float = CONNECT_TIMEOUT_S) -> AsyncIterator[EngineResponse]:
    """POST `body` as JSON to the engine on its Unix socket (else 127.0.0.1:`port`); the answer's
    head is read, its body is read by the caller. Leaving the block closes the connection, which
    makes the server stop generating. A spare connection that the server had closed (it went away,
    or restarted) before answering is given up for a new one, once: it never read the request."""
    address: Address = (socket_path, port)
    host = "localhost" if socket_path is not None else f"127.0.0.1:{port}"
    request = request_bytes(host, path, body, api_key)
    spare = _take_spare(address)
    writer: asyncio.StreamWriter | None = None
    stall: _Stall | None = None
    try:
        for connection in (spare, None) if spare is not None else (None,):
            if connection is None:
                try:
                    connection = await _within(_connect(address), connect_timeout_s)
                except (OSError, asyncio.TimeoutError) as exc:
                    raise httpx.ConnectError(f"cannot connect to the engine: {type(exc).__name__}: {exc}") from exc
            reader, writer = connection
            stall = _Stall(writer.transport, read_timeout_s)
            try:
                writer.write(request)
            except (OSError, RuntimeError) as exc:
                raise httpx.WriteError(f"cannot send to the engine: {exc}") from exc
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                break
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                dropped = isinstance(exc, ConnectionError) or not exc.partial
                if connection is spare and dropped and not stall.fired:
                    stall.cancel()
                    writer.transport.abort()
                    continue
                if isinstance(exc, ConnectionError):
                    raise httpx.ReadError(f"the engine closed the connection: {exc}") from exc
                if stall.fired:
                    raise httpx.ReadTimeout(f"no answer from the engine for {read_timeout_s:g} s") from None
                if not exc.partial:
                    raise httpx.RemoteProtocolError("Server disconnected without sending a response.") from None
                raise httpx.RemoteProtocolError("the engine's answer broke off in its headers") from exc
            except asyncio.LimitOverrunError:
                raise httpx.RemoteProtocolError(f"the engine's answer has more than {MAX_HEAD_BYTES} bytes of "
                                                "headers") from None
        stall.progressed()
        status, headers = parse_head(head[:-4])
        yield EngineResponse(reader, stall, status, headers)
    finally:
        if stall is not None:
            stall.cancel()
        if writer is not None:
            writer.transport.abort()
        if writer is not None or spare is not None:
            _open_spare(address)
