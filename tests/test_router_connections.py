"""Slow and idle connections against a real router whose descriptor limit is 256, as found.

1000 connections that trickle header bytes or send nothing, reopened as soon as the router
closes them: /health and a real OpenAI client keep being answered, and the log stays short.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from clearml_umem.catalog import write_manifest
from clearml_umem.spec import spec_from_mapping
from tests.routerproc import RouterProcess, big_bodies_counted, start_router

pytestmark = pytest.mark.slow

TIMEOUT_S = 2.0
DESCRIPTORS = 256
CHAT = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def router(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("connections")
    manifest = work / "models.yaml"
    write_manifest(manifest, [spec_from_mapping({"name": "tiny-llama", "weights": str(tiny_models["tiny-llama"])})])
    proc = start_router(manifest, work, "--device", "cpu", "--device-budget", "2GB", "--host-budget", "2GB",
                        "--header-timeout", str(TIMEOUT_S), "--body-timeout", str(TIMEOUT_S),
                        "--idle-timeout", str(TIMEOUT_S), "--allowed-hosts", "router.internal",
                        max_descriptors=DESCRIPTORS)
    yield proc
    proc.kill()


def _connect(proc: RouterProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(proc.url.rsplit(":", 1)[1])), timeout=10)


def _closed_by_server(sock: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing the connection, or None when it is still open after `within` s."""
    sock.settimeout(within)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def test_idle_slow_header_and_slow_body_connections_are_closed(router) -> None:
    idle = _connect(router)
    trickler = _connect(router)
    trickler.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    half_body = _connect(router)
    half_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"model\":")
    stop = threading.Event()

    def trickle() -> None:  # a byte every half second: each one arrives well within any read timeout
        while not stop.wait(0.5):
            with contextlib.suppress(OSError):
                trickler.sendall(b"X")

    threading.Thread(target=trickle, daemon=True).start()
    try:
        # generous bounds (the timeouts are 2 s): these connections used to stay open forever
        assert _closed_by_server(idle, 30) == b""
        answer = _closed_by_server(trickler, 30)
        assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
        answer = _closed_by_server(half_body, 30)
        assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer  # as a big body's
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        deadline = time.monotonic() + 10  # and the operator's access log says so
        while not any("POST /v1/completions" in line and "status=408" in line for line in router.log):
            assert time.monotonic() < deadline, router.log[-5:]
            time.sleep(0.05)
    finally:
        stop.set()
        for s in (idle, trickler, half_body):
            s.close()


def test_a_name_given_with_allowed_hosts_is_accepted(router) -> None:
    resp = httpx.get(router.url + "/admin/status", headers={"host": "router.internal:8000"}, timeout=30)
    assert resp.status_code == 200
    assert httpx.get(router.url + "/admin/status", headers={"host": "other.internal"}, timeout=30).status_code == 403


class Flood:
    """`count` connections, half trickling header bytes, half silent; any the server closes is reopened."""

    def __init__(self, proc: RouterProcess, count: int) -> None:
        self.port = int(proc.url.rsplit(":", 1)[1])
        self.count = count
        self.stop = threading.Event()
        self.opened = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        open_: dict[socket.socket, bool] = {}
        try:
            while not self.stop.is_set():
                # a round every quarter second, reopening at most 100: an attacker's pace, not a
                # benchmark of connect() (any server drowns in connects alone)
                round_end = time.monotonic() + 0.25
                for _ in range(min(100, self.count - len(open_))):
                    sock = socket.socket()
                    sock.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        sock.connect(("127.0.0.1", self.port))
                    trickles = self.opened % 2 == 0
                    self.opened += 1
                    open_[sock] = trickles
                    selector.register(sock, selectors.EVENT_READ)
                    if trickles:
                        with contextlib.suppress(OSError):
                            sock.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                while (left := round_end - time.monotonic()) > 0:
                    for key, _ in selector.select(timeout=left):
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        with contextlib.suppress(OSError):
                            if sock.recv(4096):
                                continue
                        selector.unregister(sock)
                        open_.pop(sock, None)
                        sock.close()
                for sock, trickles in list(open_.items()):
                    if trickles:
                        with contextlib.suppress(OSError):
                            sock.send(b"a")
        finally:
            for sock in open_:
                sock.close()
            selector.close()


def test_a_thousand_slow_connections_do_not_lock_clients_out(router) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", timeout=60)
    client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=2)  # loaded before the flood
    before = len(router.log)
    answered = 0
    with Flood(router, 1000) as flood:
        time.sleep(2)  # every descriptor the router has is offered to the flood
        end = time.monotonic() + 5
        while time.monotonic() < end:
            assert httpx.get(router.url + "/health", timeout=20).status_code == 200
            answered += 1
            time.sleep(0.2)
        chat = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=2)
        assert chat.choices[0].message.content is not None
        assert flood.opened > DESCRIPTORS  # the router's descriptors were all offered
    assert answered >= 5
    lines = router.log[before:]
    assert len(lines) < 20, lines[:40]
    assert not any("Traceback" in line for line in lines), lines[:40]


# -- big bodies are read by a thread, not by the event loop (router/body_handoff.py) ------------------


def _big_chat(filler: int = 200_000) -> bytes:
    """A chat body over 64 KiB that fits the model: a long `user` field pads it."""
    return json.dumps({"model": "tiny-llama", "messages": CHAT, "max_tokens": 2, "temperature": 0,
                       "user": "u" * filler}).encode()


def _head(body: bytes, *extra: str) -> bytes:
    lines = ["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _answer(sock: socket.socket, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    sock.settimeout(timeout)
    with sock.makefile("rb") as stream:
        status = int(stream.readline().split()[1])
        headers: dict[str, str] = {}
        while (line := stream.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers, stream.read(int(headers.get("content-length", "0")))


def test_a_big_body_sent_slowly_is_answered_and_the_connection_then_closes(router) -> None:
    """Sent in pieces with pauses shorter than the body timeout (2 s here), a big body is read to its
    end and answered as a small one; the connection closes after the answer (the router never
    read the body itself, so it does not parse what follows as a next request)."""
    small = httpx.post(router.url + "/v1/chat/completions", json={"model": "tiny-llama", "messages": CHAT,
                                                                  "max_tokens": 2, "temperature": 0}, timeout=120)
    assert small.status_code == 200, small.text
    body = _big_chat()
    with _connect(router) as sock:
        sock.sendall(_head(body) + body[:1000])
        for start in range(1000, len(body), 50_000):
            time.sleep(0.3)
            sock.sendall(body[start:start + 50_000])
        status, headers, answer = _answer(sock)
        assert status == 200, answer
        assert headers.get("connection") == "close"
        assert json.loads(answer)["choices"][0]["message"] == small.json()["choices"][0]["message"]
        assert _closed_by_server(sock, 10) == b""


def test_a_big_body_that_stops_gets_a_408_and_one_whose_client_leaves_costs_nothing(router) -> None:
    """Both counted in /metrics: the stalled body, and each client that left while its body was read."""
    body = _big_chat()
    before = big_bodies_counted(router.url)
    with _connect(router) as stalled:
        stalled.sendall(_head(body) + body[:len(body) // 2])
        started = time.monotonic()
        status, _, answer = _answer(stalled, timeout=30)
        assert status == 408 and json.loads(answer)["error"]["code"] == "request_timeout", answer
        assert time.monotonic() - started < 20  # the body timeout is 2 s
    for _ in range(8):  # more clients that leave mid-body than a parser process would take
        with _connect(router) as leaver:
            leaver.sendall(_head(body) + body[:len(body) // 3])
            time.sleep(0.2)  # its reading thread is under way
    resp = httpx.post(router.url + "/v1/chat/completions", content=body,
                      headers={"content-type": "application/json"}, timeout=60)
    assert resp.status_code == 200, resp.text
    assert httpx.get(router.url + "/health", timeout=10).status_code == 200
    after = big_bodies_counted(router.url)
    assert after.get("stalled", 0) - before.get("stalled", 0) == 1, (before, after)
    assert after.get("abandoned", 0) - before.get("abandoned", 0) == 8, (before, after)
    assert after.get("prepared", 0) - before.get("prepared", 0) == 1, (before, after)


def test_a_big_body_that_expects_100_continue_gets_it(router) -> None:
    """curl sends `Expect: 100-continue` before a body over 1 MB and waits for the go-ahead."""
    body = _big_chat(1_200_000)
    with _connect(router) as sock:
        sock.sendall(_head(body, "Expect: 100-continue"))
        sock.settimeout(10)
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        status, _, answer = _answer(sock)
        assert status == 200, answer


def test_a_big_body_answered_unread_passes_through_and_the_connection_stays_usable(router) -> None:
    """A request refused before its body is needed (a cross-site POST, 403): its answer arrives whole
    (a socket closed with bytes unread sends a reset, which can take the answer with it), the body
    passes through unused, and the kept-alive connection takes its next request."""
    body = _big_chat()
    with _connect(router) as sock:
        sock.sendall(_head(body, "Origin: http://attacker.example") + body)
        status, headers, answer = _answer(sock)
        assert status == 403, answer
        assert headers.get("connection") != "close"
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _, answer = _answer(sock)
        assert status == 200 and json.loads(answer)["status"] == "ok", answer
    with _connect(router) as silent:  # then silent: closed as idle, as after any answer
        silent.sendall(_head(body, "Origin: http://attacker.example") + body)
        status, _, _ = _answer(silent)
        assert status == 403
        assert _closed_by_server(silent, 30) == b""


def test_big_bodies_are_read_by_a_niced_reader_process_that_ends_with_the_router(
        tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The kernel's copy of a big body happens in the body reader process (niced like the parser
    processes, and like them a batch task, which never preempts the loop that woke it), so that it
    never competes with the router's event loop at the router's priority;
    one body is mid-read when the router is killed (-9), and nothing of the router outlives it."""
    from clearml_umem.child_process import NICENESS

    manifest = tmp_path / "models.yaml"
    write_manifest(manifest, [spec_from_mapping({"name": "tiny-llama", "weights": str(tiny_models["tiny-llama"])})])
    proc = start_router(manifest, tmp_path, "--device", "cpu", "--device-budget", "2GB", "--host-budget", "2GB",
                        "--body-timeout", "60")
    try:
        body = _big_chat()
        resp = httpx.post(proc.url + "/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=120)
        assert resp.status_code == 200, resp.text
        readers = [c for c in proc.descendants() if "clearml_umem.body_reader_child" in " ".join(c.cmdline())]
        assert len(readers) == 1 and readers[0].nice() >= NICENESS, readers
        if hasattr(os, "SCHED_BATCH"):  # helpers never preempt the loop that hands them a body
            from tests.test_parser_pool import batch_and_niced

            parsers = [c for c in proc.descendants() if "clearml_umem.parser_child" in " ".join(c.cmdline())]
            assert parsers and all(batch_and_niced(c.pid) for c in [*readers, *parsers]), (readers, parsers)
        with _connect(proc) as slow:
            slow.sendall(_head(body) + body[:1000])
            time.sleep(0.5)  # its read is under way, in the reader process
            assert proc.end_leaving("kill") == []
            assert _closed_by_server(slow, 10) is not None, "the client's connection outlived the router"
    finally:
        proc.kill()


def test_a_body_reader_that_dies_fails_its_bodies_with_a_503_and_is_replaced(router) -> None:
    """kill -9 of the body reader process mid-body: that client gets a 503 with Retry-After (an
    SDK retries it), counted `failed`; the next big body is read by a new reader process."""
    body = _big_chat()
    before = big_bodies_counted(router.url)
    warm = httpx.post(router.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                      timeout=60)
    assert warm.status_code == 200, warm.text
    readers = [c for c in router.descendants() if "clearml_umem.body_reader_child" in " ".join(c.cmdline())]
    assert len(readers) == 1
    with _connect(router) as sock:
        sock.sendall(_head(body) + body[:len(body) // 2])
        time.sleep(0.3)  # its read is under way
        readers[0].kill()
        status, headers, answer = _answer(sock, timeout=30)
    assert status == 503 and "retry-after" in headers, answer
    assert json.loads(answer)["error"]["code"] == "body_read_failed"
    again = httpx.post(router.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                       timeout=60)
    assert again.status_code == 200, again.text
    now = [c for c in router.descendants() if "clearml_umem.body_reader_child" in " ".join(c.cmdline())]
    assert len(now) == 1 and now[0].pid != readers[0].pid
    after = big_bodies_counted(router.url)
    assert after.get("failed", 0) - before.get("failed", 0) == 1, (before, after)
