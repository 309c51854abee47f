"""Connection limits at the socket, before any request exists: what nginx does and uvicorn does not.

uvicorn closes a kept-alive connection after `timeout_keep_alive` but nothing else: a client
that opens a connection and sends nothing, or trickles its headers a byte at a time, or sends
half a body and stops, holds a descriptor forever, and a few hundred of them hold them all
(no key helps: this is before authentication). So, per connection:

- **idle**: a connection with no request under way (new, or kept alive after a response) must
  send its first byte within `idle_timeout_s` (uvicorn's keep-alive timer, armed at accept too);
- **header**: from its first byte, a request's headers must be complete within
  `header_timeout_s` (nginx `client_header_timeout`): trickling does not extend it;
- **body**: while a body is read, two reads may be at most `body_timeout_s` apart (nginx
  `client_body_timeout`), so a sender that stops is cut with a 408, a slow but steady one is not;
- **cap**: at most `max_connections` open at once. At the cap a new connection takes the place
  of the one that has waited longest without sending a request (idle or slow: it costs the
  server nothing to drop), so slow connections cannot lock clients out; when every connection
  is busy with a request, the new one is answered 503 with Retry-After and closed.

- **header size**: a request's headers may take at most `MAX_HEADER_BYTES` (h11's own limit,
  kept when httptools parses: llhttp has none of its own), else 431 and the connection closes.

A response that takes long (a stream) is never cut: the limits only cover waiting for the client.

The HTTP parser is httptools (llhttp, in C) where it is installed, as `uvicorn[standard]` has it;
h11 (pure Python, 300 calls a request) otherwise. On the router's own cost (`benchmarks/
router_overhead.py`) httptools took 0.35 ms off what the router adds to a first token.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import resource
import socket
import time
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from clearml_umem.router.body_handoff import SCOPE_KEY, TIMED_OUT_KEY, BodyHandoff, HandoffRoutes, body_timeout

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
"""uvicorn's h11 limit on a request's line and headers (`h11_max_incomplete_event_size`)."""


def http_protocol_base() -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol where httptools is installed, its h11 protocol otherwise."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return H11Protocol
    return HttpToolsProtocol

DESCRIPTOR_RESERVE_FRACTION = 0.25
"""Of the descriptor limit, the part kept for what is not a client connection: engine sockets,
log files, weight files, and the one a refusal needs to be accepted and answered."""


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 5.0
    max_connections: int = 0
    """0: three quarters of the process's descriptor limit (RLIMIT_NOFILE)."""

    def resolved_max_connections(self) -> int:
        if self.max_connections > 0:
            return self.max_connections
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 65536
        return max(8, int(soft * (1 - DESCRIPTOR_RESERVE_FRACTION)))


class RateLimitedLog:
    """At most one line per `period_s` for one recurring condition, with the count it stands for."""

    def __init__(self, logger: logging.Logger, period_s: float = 10.0) -> None:
        self._log = logger
        self.period_s = period_s
        self._last = -float("inf")
        self._suppressed = 0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.period_s:
            self._suppressed += 1
            return
        if self._suppressed:
            message += " (%d more like this in the last %.0f s)"
            args = (*args, self._suppressed, self.period_s)
        self._last = now
        self._suppressed = 0
        self._log.warning(message, *args)


def _raw_response(status: int, reason: str, message: str, code: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 answer in OpenAI's error shape, written straight to a transport that
    has no request cycle (uvicorn's machinery only answers requests it parsed)."""
    type_ = "service_unavailable_error" if status == 503 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    lines = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
             "connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ConnectionGate:
    """Counts accepted connections from `accept()` to their close.

    asyncio accepts up to the listen backlog (uvicorn: 2048) in one pass before any protocol sees
    its connection, so a cap applied in the protocol alone comes too late: one pass of a flood
    takes every descriptor. The listener asks the gate first and leaves connections in the
    kernel's backlog beyond `cap + headroom` (the headroom: connections accepted over the cap
    that are about to replace an idle one or be refused)."""

    def __init__(self, cap: int, headroom: int | None = None) -> None:
        self.cap = cap
        self.headroom = headroom if headroom is not None else max(4, min(64, cap // 8))
        self.open = 0

    def admit(self) -> bool:
        if self.open >= self.cap + self.headroom:
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open = max(0, self.open - 1)


class GatedListener(socket.socket):
    """A listening socket whose `accept` stops while its gate is full: asyncio treats the
    BlockingIOError as "no more for now", and the next pass of the loop (after the closes the
    over-cap connections caused) accepts again."""

    gate: ConnectionGate

    def accept(self) -> tuple[socket.socket, Any]:
        if not self.gate.admit():
            raise BlockingIOError(errno.EAGAIN, "connection cap reached")
        try:
            return super().accept()
        except BaseException:
            self.gate.release()
            raise


def gated_listener(family: int, gate: ConnectionGate) -> GatedListener:
    sock = GatedListener(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.gate = gate
    return sock


COALESCE_BYTES = 64 * 1024
"""Writes pending past this size leave at once: coalescing is for a response's small pieces."""


class CoalescedWrites:
    """A transport whose writes made in one pass of the event loop leave in one send.

    uvicorn writes a response's status line and headers, each body piece and the end of a chunked
    body separately, each a send and, on the client's side, a wake-up: a streamed answer's headers
    and first token took two, its last piece and end two more. Here they wait in a list until the
    loop has run what is ready (a `call_soon`), so what a handler sends without waiting in between
    leaves together; a piece sent after an await still leaves on the next pass, microseconds later,
    and a complete response at once (`on_response_complete`). Everything else is the real transport's.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._size = 0
        self.reading_held = False
        """While the body reader reads the body from the socket (`body_handoff.py`), nothing resumes
        reading it here (uvicorn would, on the handler's first `receive()`)."""

    def resume_reading(self) -> None:
        if not self.reading_held:
            self._transport.resume_reading()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))
        self._size += len(data)
        if self._size >= COALESCE_BYTES:
            self.flush()

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending.clear()
        self._size = 0
        if not self._transport.is_closing():
            self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._size + self._transport.get_write_buffer_size()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._size = 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def limited_protocol(limits: ConnectionLimits, gate: ConnectionGate | None = None,
                     base: type[asyncio.Protocol] | None = None,
                     handoff: HandoffRoutes | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (`base`, default `http_protocol_base()`: both of uvicorn's have the
    request cycle, flow control and keep-alive timer this relies on) with `limits`; pass it as
    `uvicorn.Config(http=...)`. `gate`, when the listener is a `GatedListener`, is told of each close.
    With `handoff`, the bodies it wants are left in the socket for a thread to read
    (`body_handoff.py`; httptools only: h11's parser reads bodies itself)."""
    cap = limits.resolved_max_connections()
    refusals = RateLimitedLog(log)
    replacements = RateLimitedLog(log)
    parent: Any = base or http_protocol_base()
    routes = handoff if hasattr(parent, "on_headers_complete") else None

    class LimitedProtocol(parent):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.timeout_keep_alive = limits.idle_timeout_s
            self._header_bytes = 0
            self._waiting_since: float | None = time.monotonic()
            self._seen_cycle: Any = None
            self._header_timer: asyncio.TimerHandle | None = None
            self._body_timer: asyncio.TimerHandle | None = None
            self._handoff: BodyHandoff | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(CoalescedWrites(transport, self.loop))  # type: ignore[arg-type]
            if len(self.connections) > cap and not self._make_room():
                refusals.warning("%d connections open, the most this server keeps (--max-connections): refusing "
                                 "new ones with 503 while every one is busy with a request", cap)
                transport.write(_raw_response(
                    503, "Service Unavailable", f"The server has {cap} connections open, the most it keeps; "
                    "retry shortly.", "too_many_connections", {"retry-after": "1"}))
                transport.close()
                return
            # a new connection is idle until its first byte: uvicorn's keep-alive timer closes it
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

        def _make_room(self) -> bool:
            """Close the connection that has waited longest without sending a request."""
            waiting = [c for c in self.connections
                       if isinstance(c, LimitedProtocol) and c is not self and c._waiting_since is not None]
            if not waiting:
                return False
            victim = min(waiting, key=lambda c: c._waiting_since or 0.0)
            replacements.warning("%d connections open, the most this server keeps (--max-connections): closing "
                                 "the ones waiting longest without a request to take new ones", cap)
            victim._close()
            return True

        def _close(self) -> None:
            self._cancel_timers()
            self._waiting_since = None
            if not self.transport.is_closing():
                self.transport.close()

        def _cancel_timers(self) -> None:
            for timer in (self._header_timer, self._body_timer):
                if timer is not None:
                    timer.cancel()
            self._header_timer = self._body_timer = None

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_timers()
            self._waiting_since = None
            if gate is not None:
                gate.release()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._waiting_since is not None:
                self._header_bytes += len(data)
                if self._header_timer is None:
                    self._header_timer = self.loop.call_later(limits.header_timeout_s, self._on_header_timeout)
            super().data_received(data)
            self._track()
            if self._waiting_since is not None and self._header_bytes > MAX_HEADER_BYTES \
                    and not self.transport.is_closing():
                self.transport.write(_raw_response(
                    431, "Request Header Fields Too Large",
                    f"The request line and headers exceed {MAX_HEADER_BYTES} bytes.", "headers_too_large"))
                self._close()

        def on_headers_complete(self) -> None:
            self._handoff = None
            super().on_headers_complete()
            cycle = self.cycle
            if routes is None or cycle is None or self.pipeline or cycle.response_complete:
                return
            length = routes.wants(self.scope["method"], self.scope.get("path", ""), self.scope["headers"])
            sock = self.transport.get_extra_info("socket") if length is not None else None
            if length is None or sock is None:
                return
            self._handoff = BodyHandoff(length, routes.read_timeout_s, sock, release=self._release_handoff)
            self.scope.setdefault("extensions", {})[SCOPE_KEY] = self._handoff  # the cycle's scope
            self.transport.reading_held = True
            self.flow.pause_reading()
            if cycle.waiting_for_100_continue:
                # curl asks before sending a body over 1 MB: the body reader is the one waiting for it
                cycle.waiting_for_100_continue = False
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

        def on_body(self, body: bytes) -> None:
            if self._handoff is None:
                super().on_body(body)
            elif self.transport.reading_held:
                self._handoff.head += body  # came with the headers: passed on with the socket
            # else: a body that was not needed, passing through; or bytes past one a thread read

        def _release_handoff(self, taken: bool) -> None:
            if not self.transport.reading_held:
                return
            self.transport.reading_held = False
            if (taken or (self._handoff is not None and self._handoff.taken)) and self.cycle is not None:
                self.cycle.keep_alive = False  # the parser never saw that body: nothing after it can be read
            if not self.transport.is_closing():
                self.flow.resume_reading()

        def on_response_complete(self) -> None:
            if self._handoff is not None:
                self._handoff.release(False)  # answered without its body: it passes through unused
            if isinstance(self.transport, CoalescedWrites):
                self.transport.flush()  # a whole answer leaves now, before the handler's cleanup runs
            super().on_response_complete()
            cycle = self.cycle
            if not self.transport.is_closing() and (cycle is None or not cycle.more_body):
                self._waiting_since = time.monotonic()
                self._header_bytes = 0
            self._track()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            cycle = self.cycle
            if cycle is not None and cycle.response_complete and self._waiting_since is None \
                    and not self.transport.is_closing():
                # answered before its body was all in (a 401, a 403): the wait for the next request
                # starts now (idle, as after any answer), and the body's bytes were not its header's
                self._waiting_since = time.monotonic()
                self._header_bytes = 0
                self._unset_keepalive_if_required()
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)

        def _track(self) -> None:
            """After each step of the parser: which wait, if any, the connection is in now."""
            cycle = self.cycle
            if cycle is not None and cycle is not self._seen_cycle:
                # a request's headers are complete
                self._seen_cycle = cycle
                self._waiting_since = None
                self._header_bytes = 0
                if self._header_timer is not None:
                    self._header_timer.cancel()
                    self._header_timer = None
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            # a body the body reader reads is timed there; one still arriving after its answer is timed here too
            taken = self.transport.reading_held or (self._handoff is not None and self._handoff.taken)
            if cycle is not None and cycle.more_body and not cycle.disconnected and not taken:
                self._body_timer = self.loop.call_later(limits.body_timeout_s, self._on_body_timeout)

        def _on_header_timeout(self) -> None:
            self._header_timer = None
            if self._waiting_since is None or self.transport.is_closing():
                return
            log.debug("closing %s: headers not complete within %.1f s", self.client, limits.header_timeout_s)
            self.transport.write(_raw_response(
                408, "Request Timeout", f"The request headers did not arrive within {limits.header_timeout_s:g} s.",
                "request_timeout"))
            self._close()

        def _on_body_timeout(self) -> None:
            self._body_timer = None
            cycle = self.cycle
            if cycle is None or not cycle.more_body or self.transport.is_closing():
                return
            if self.flow.read_paused:
                # the application is not reading yet: the client is not the one who is slow
                self._body_timer = self.loop.call_later(limits.body_timeout_s, self._on_body_timeout)
                return
            log.debug("closing %s: no body bytes for %.1f s", self.client, limits.body_timeout_s)
            if not cycle.response_started:
                # a 408 as nginx answers and as a big body gets from the body reader, so a client
                # learns why; the request's handler sees its client gone and answers nothing more
                cycle.scope.setdefault("extensions", {})[TIMED_OUT_KEY] = float(limits.body_timeout_s)
                cycle.disconnected = True
                cycle.message_event.set()
                error = body_timeout(limits.body_timeout_s)
                self.transport.write(_raw_response(408, "Request Timeout", error.message, error.code or ""))
            self._close()

    return LimitedProtocol


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, period_s: float = 10.0) -> None:
    """asyncio logs "socket.accept() out of system resource" with a traceback for every failed
    accept, up to the listen backlog per loop pass (hundreds of MB of log when descriptors run
    out); it already pauses accepting for a second. This keeps the pause and logs one line per
    `period_s`; every other loop error goes to the handler that was there."""
    previous = loop.get_exception_handler()
    limited = RateLimitedLog(log, period_s)

    def handler(the_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            limited.warning("out of file descriptors (%s): not accepting connections for a second; raise the "
                            "limit (ulimit -n) or lower --max-connections", context.get("exception"))
            return
        if previous is not None:
            previous(the_loop, context)
        else:
            the_loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
