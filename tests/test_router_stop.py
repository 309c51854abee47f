"""SIGTERM to a real router with a stream running and a request queued behind a swap.

The queued request gets a 503 with Retry-After at once, in OpenAI's shape; the stream keeps
going through the grace period and then ends with an error event and [DONE]; nothing new is
accepted; the router exits 0 and leaves no process behind.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.routerproc import start_room_for_one, wait_gone
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

GRACE_S = 2.0


def test_sigterm_answers_the_queue_lets_streams_run_out_their_grace_and_exits(
        tiny_models: dict[str, Path], tmp_path: Path) -> None:
    models = {n: tiny_models[n] for n in ("tiny-llama", "tiny-qwen2")}
    # the grace from the environment, as a Kubernetes pod spec would set it
    router, (hot, other) = start_room_for_one(models, tmp_path, env={"UMEM_SHUTDOWN_GRACE": str(GRACE_S)})
    tree = [router.proc.pid] + [p.pid for p in router.descendants()]
    port = int(router.url.rsplit(":", 1)[1])
    events: list[tuple[float, bytes]] = []
    stream_open = threading.Event()

    def stream() -> None:
        # greedy on a random tiny model: runs to max_tokens, far longer than the grace
        body = {"model": hot, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1500,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", router.url + "/v1/chat/completions", json=body, timeout=120) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append((time.monotonic(), line[6:].encode()))
                    if len(events) >= 3:
                        stream_open.set()

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    assert stream_open.wait(120), "the stream did not start"

    queued: list[httpx.Response] = []
    waiter = threading.Thread(target=lambda: queued.append(httpx.post(
        router.url + "/v1/chat/completions", json={"model": other, "messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 2}, timeout=120)), daemon=True)
    waiter.start()

    def other_waiting() -> bool:
        rows = httpx.get(router.url + "/admin/models", timeout=30).json()["data"]
        return any(r["name"] == other and r["waiting"] >= 1 for r in rows)

    assert wait_until(other_waiting, 60), "the request for the other model did not queue"
    stopped = time.monotonic()
    router.proc.send_signal(signal.SIGTERM)
    waiter.join(60)

    # the queued request: answered at once (long before the grace ends), 503, Retry-After, OpenAI's shape
    assert queued, "the queued request got no answer"
    refused = queued[0]
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    assert "shutting down" in refused.json()["error"]["message"]
    assert streamer.is_alive(), "the stream ended before the queued request was answered"

    # nothing new is accepted
    def refuses_connections() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError:
            return True
        return False

    assert wait_until(refuses_connections, 10)

    # the stream ran on through the grace, then ended readably
    streamer.join(60)
    assert not streamer.is_alive()
    payloads = [p for _, p in events]
    assert payloads[-1] == b"[DONE]", payloads[-3:]
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == "server_shutting_down" and set(error) == {"message", "type", "param", "code"}
    assert any(t > stopped + GRACE_S / 2 for t, p in events[:-2]), "the stream was cut before its grace"

    assert router.proc.wait(timeout=60) == 0
    assert wait_gone(tree) == []


def test_sigterm_while_an_engine_starts_stops_that_start_and_exits_at_once(tmp_path: Path) -> None:
    """A vLLM start takes minutes for a large model; nobody is left to use it once the router stops, so
    SIGTERM stops the start instead of waiting for it (it waited 60 s, past Kubernetes' default 30 s
    grace, after which the kubelet's SIGKILL would have ended the router with its work undone)."""
    from tests.routerproc import start_fake_vllm_router

    router = start_fake_vllm_router(tmp_path, behaviour={"startup_delay_s": 300})
    tree = [router.proc.pid]
    answers: list[httpx.Response] = []
    asker = threading.Thread(target=lambda: answers.append(httpx.post(
        router.url + "/v1/completions", json={"model": "fake-vllm", "prompt": "hi", "max_tokens": 2},
        timeout=120)), daemon=True)
    asker.start()
    try:
        assert wait_until(lambda: any("starting vLLM (pid" in line for line in router.log), 60), router.log[-5:]
        tree += [p.pid for p in router.descendants()]
        assert len(tree) > 1, "the engine process is running"
        stopped = time.monotonic()
        router.proc.send_signal(signal.SIGTERM)
        assert router.proc.wait(timeout=60) == 0
        took = time.monotonic() - stopped
        asker.join(30)
    finally:
        router.kill()
    assert took < 30, f"the router took {took:.0f} s to stop: it waited for the engine's start"
    assert answers and answers[0].status_code == 503 and answers[0].json()["error"]["code"] == "server_shutting_down"
    assert wait_gone(tree) == []
    log = "\n".join(router.log)
    assert "move cold -> gpu stopped by the shutdown" in log
    assert "Traceback" not in log and "failed" not in log.split("stopping on signal")[-1], log[-2000:]
