"""Another client's time to first token while big request bodies arrive, against a real router.

A streaming client asks a hot tiny model for a few tokens, one request after another, and its
TTFT is measured in three kinds of phase of one run: alone (quiet, once); while `--senders`
processes keep posting big chat bodies to a sink outside the router that parses each as a parser
process would (control: what sharing the machine's cores with that work costs, the router kept out
of it); and while they post the same bodies to the router (big bodies). Control and big-bodies
phases alternate for `--rounds` rounds (control first in even rounds, last in odd ones), so that
a drift of the machine's load falls on both alike, and each is reported over all its rounds'
samples. The senders stand for clients on other machines: plain sockets, each request built
once, at the lowest CPU priority.

`--shape tiny` (the default): ~6.8 MB of 200,000 one-character messages, which the router's parser
processes refuse (400: more messages than `--max-messages` allows); with `--accept-all` the router
is started to take that many (`--max-messages 200000`), so each is prepared in full and unpickled
by the router. `--shape long`: ~8 MB of 10,000 messages of 800 characters, valid on the default
settings: each is parsed and validated in a parser process and refused there, from its byte length,
as longer than the model's context (404 with `--to unknown`, after the router unpickled it).
`--shape triton`: one ~8 MB `text_input` to Triton's generate extension, refused in a parser
process the same way (404 with `--to unknown`, before its body is read).
Reported: p50 and p99 TTFT of each kind of phase; the ratios of the big-bodies phases to the quiet
one and to the control (1.0 = the router adds nothing to what the same work elsewhere costs), each
ratio to the control with a 90% bootstrap interval (an interval that holds 1.0 is no change this
run could tell from noise); the worst /health latency of each; how often the router's event loop
was late by over 5, 10 and 20 ms (its own `umem_event_loop_lag_seconds`, read before and after
each phase: whatever held it, every client waited); what became of the big bodies by the router's
own count (`umem_big_request_bodies_total`); and (`--parse-costs`) what the costliest bodies that
pass the default bounds cost a parser process and the router, measured in this process.

    python benchmarks/big_bodies.py                 # about three minutes on 2 cores
    python benchmarks/big_bodies.py --shape long
    python benchmarks/big_bodies.py --accept-all --senders 8 --rate 0
    python benchmarks/big_bodies.py --parse-costs   # no router: the in-process parse alone
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing
import os
import pickle
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import httpx
from prometheus_client.parser import text_string_to_metric_families

from clearml_umem.catalog import write_manifest
from clearml_umem.child_process import yield_cores
from clearml_umem.json_body import DEFAULT_MAX_MESSAGES, max_values
from clearml_umem.router.errors import APIError
from clearml_umem.router.parser_pool import PARSER_PROCESSES
from clearml_umem.router.schemas import prepare_body
from clearml_umem.spec import spec_from_mapping
from clearml_umem.tinymodels import DEMO_MODELS, ensure_tiny_models

READY = "umem: serving on "
MESSAGES = 200_000
WARMUP_REQUESTS = 5
LONG_CHARS = 800
BODY_LIMIT = 8 * 2**20
SENDER_NICENESS = 19
BOOTSTRAP_RESAMPLES = 2000
INTERVAL = 0.90
LATE_MS = (5, 10, 20)
"""Event-loop lags counted (`umem_event_loop_lag_seconds` has these bounds)."""


def big_body(shape: str, model: str = "not-served") -> bytes:
    if shape == "triton":  # one 8 MB text_input: Triton's generate extension, as long as `long`
        return json.dumps({"text_input": "y" * LONG_CHARS * DEFAULT_MAX_MESSAGES}).encode()
    if shape == "tiny":
        messages = [{"role": "user", "content": "x"}] * MESSAGES
    else:
        messages = [{"role": "user", "content": "y" * LONG_CHARS}] * DEFAULT_MAX_MESSAGES
    return json.dumps({"model": model, "messages": messages}).encode()


def body_path(shape: str, model: str) -> str:
    return f"/v2/models/{model}/generate" if shape == "triton" else "/v1/chat/completions"


def costliest_bodies() -> dict[str, bytes]:
    """Bodies of at most 8 MiB that pass the default bounds, each the worst of its kind for a parse."""
    room = BODY_LIMIT - 200
    values = max_values(DEFAULT_MAX_MESSAGES) - 10
    keys = values // 2 - 2
    key_len = room // keys - 8  # "key": 0,
    return {
        "8 MiB prompt of \\u escapes": json.dumps({"model": "m", "prompt": "\u00e9" * (room // 6)}).encode(),
        "8 MiB prompt of UTF-8 text": json.dumps({"model": "m", "prompt": "\u00e9" * (room // 2)},
                                                  ensure_ascii=False).encode(),
        "10,000 messages, 8 MiB in all": json.dumps({"model": "m", "messages": [
            {"role": "user", "content": "\u00e9" * ((room // DEFAULT_MAX_MESSAGES - 40) // 6)}
        ] * DEFAULT_MAX_MESSAGES}).encode(),
        f"{values:,} one-character strings": json.dumps({"model": "m", "extra": ["x"] * (values - 4)}).encode(),
        f"{keys:,} unique {key_len}-byte keys": json.dumps({"model": "m", "extra": {
            f"{i:0{key_len}d}": 0 for i in range(keys)}}).encode(),
    }


def parse_costs(repeats: int = 5) -> dict[str, dict[str, float]]:
    """What each body costs, in CPU milliseconds (best of `repeats`; CPU time, not wall time, so
    that other load on the machine does not inflate it): `prepare`, the parse and validation a
    parser process does (`schemas.prepare_body`, never in the router's process), and `unpickle`,
    the one call the router makes for it in its parser thread, holding the GIL throughout: what
    other clients may wait for. The garbage collector is paused, as both processes have it."""
    costs: dict[str, dict[str, float]] = {}
    for label, raw in costliest_bodies().items():
        assert len(raw) <= BODY_LIMIT, (label, len(raw))
        kind = "chat" if b'"messages"' in raw[:40] else "completion" if b'"prompt"' in raw[:40] else "object"
        prepare = unpickle = float("inf")
        for _ in range(repeats):
            gc.disable()
            started = time.thread_time()
            payload = pickle.dumps(prepare_body(raw, kind), protocol=pickle.HIGHEST_PROTOCOL)
            prepared = time.thread_time()
            pickle.loads(payload)
            loaded = time.thread_time()
            prepare, unpickle = min(prepare, prepared - started), min(unpickle, loaded - prepared)
            gc.enable()
        costs[label] = {"prepare_ms": prepare * 1e3, "unpickle_ms": unpickle * 1e3}
    return costs


def start_router(manifest: Path, work: Path, accept_all: bool) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "clearml_umem", "serve", "--manifest", str(manifest), "--port", "0",
           "--work-dir", str(work), "--device", "cpu", "--device-budget", "2GB", "--host-budget", "2GB",
           "--log-level", "warning", *(["--max-messages", str(MESSAGES)] if accept_all else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(READY):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
            return proc, line[len(READY):].strip()
    raise RuntimeError(f"the router exited with {proc.wait()}")


def ttft(client: httpx.Client, model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "stream": True,
            "temperature": 0}
    started = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - started
            if line == "data: [DONE]":
                break
    return time.perf_counter() - started


def p(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def content_length(stream: BinaryIO) -> int:
    """Read an HTTP message's lines up to the blank one after its headers; its Content-Length."""
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return length


def send(url: str, body: bytes, stop: Any, posted: Any, interval_s: float = 0.0,
         path: str = "/v1/chat/completions") -> None:
    """One sender, in a process of its own (in the measuring process its work on 8 MB bodies would
    hold that process's GIL and show up in the TTFT it measures), on a plain socket: the request is
    built once and each post is one `sendall`, so that on a machine of few cores the senders take
    little of the CPU the router needs (clients of a real router run on other machines, so the senders
    also run at the lowest priority: they take what is left). With `interval_s`, a post starts every
    that many seconds (one that ends late starts the next at once, without catching up on the ones
    missed); without, as soon as the last was answered."""
    os.nice(SENDER_NICENESS)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    next_at = time.monotonic() + random.random() * interval_s  # senders spread over the interval
    while not stop.is_set():
        if interval_s > 0:
            if stop.wait(max(0.0, next_at - time.monotonic())):
                return
            next_at = max(next_at + interval_s, time.monotonic())
        with socket.create_connection((host, int(port)), timeout=300) as sock, sock.makefile("rb") as answer:
            sock.sendall(request)
            status = int(answer.readline().split()[1])
            text = answer.read(content_length(answer))
        # 400: refused (its shape, or a prompt longer than the context); 404: a model not served
        assert status in (400, 404), text[:200]
        with posted.get_lock():
            posted.value += 1


def sink(listener: socket.socket) -> None:
    """One process of the control phase's sink: reads each body and prepares it as a parser process
    would (`schemas.prepare_body`, at the parser processes' priority: `child_process.yield_cores`;
    the garbage collector off, as there: forked from this process, with its heap, the sink's
    collections cost more CPU than the parse), then answers 400, outside the router. What the other
    client's TTFT loses to it is what sharing the machine's cores with the same work costs, with the
    router's event loop kept out of it."""
    yield_cores()
    gc.disable()
    while True:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as request:
            raw = request.read(content_length(request))
            kind = "chat" if b'"messages"' in raw[:200] else "triton" if b'"text_input"' in raw[:200] \
                else "completion"
            with contextlib.suppress(APIError):  # refused: what the router answers too
                prepare_body(raw, kind)
            del raw
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")


def start_sink(processes: int) -> tuple[str, list[multiprocessing.process.BaseProcess]]:
    """The control phase's sink: as many processes as the router has parser processes, on one
    listening socket (forked before any of this process's threads run a body)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=sink, args=(listener,), daemon=True) for _ in range(processes)]
    for worker in workers:
        worker.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    return url, workers


def phase(url: str, model: str, requests: int, senders: int, body: bytes, to: str | None = None,
          rate: float = 0.0, path: str = "/v1/chat/completions") -> dict[str, Any]:
    """`requests` TTFT samples while `senders` post `body` to `path` on `to` (the router by
    default), at `rate` bodies a second in all (0: each sender as fast as it is answered)."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    posted = context.Value("i", 0)
    health: list[float] = []
    polling = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=300) as c:
            while not polling.is_set():
                started = time.perf_counter()
                c.get("/health").raise_for_status()
                health.append(time.perf_counter() - started)
                time.sleep(0.02)

    interval_s = senders / rate if rate > 0 else 0.0
    processes = [context.Process(target=send, args=(to or url, body, stop, posted, interval_s, path), daemon=True)
                 for _ in range(senders)]
    for proc in processes:
        proc.start()
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    times: list[float] = []
    with httpx.Client(base_url=url, timeout=300) as client:
        # in every phase alike: the bodies are arriving, and both clients are made (an httpx client's
        # start holds this process's GIL for tens of milliseconds)
        time.sleep(2.0)
        health.clear()
        began, answered_before, lag_before = time.monotonic(), posted.value, loop_lag_ticks(url)
        for _ in range(requests):
            times.append(ttft(client, model))
        measured_s, answered = time.monotonic() - began, posted.value - answered_before
        lag = {le: n - lag_before[le] for le, n in loop_lag_ticks(url).items()}
    stop.set()
    polling.set()
    poller.join(300)
    for proc in processes:
        proc.join(300)
    return {"ttft_s": times, "health_s": health, "big_bodies_answered": posted.value,
            "measured_s": measured_s, "answered_while_measured": answered, "loop_lag_ticks": lag}


def summary(phases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One kind of phase over all its rounds: its samples pooled."""
    times = [t for ph in phases for t in ph["ttft_s"]]
    health = [t for ph in phases for t in ph["health_s"]]
    measured_s = sum(ph["measured_s"] for ph in phases)
    ticks = {le: sum(ph["loop_lag_ticks"][le] for ph in phases) for le in phases[0]["loop_lag_ticks"]}
    return {"ttft_p50_s": statistics.median(times), "ttft_p99_s": p(times, 0.99),
            "health_max_s": max(health) if health else float("nan"), "samples": len(times),
            "big_bodies_answered": sum(ph["big_bodies_answered"] for ph in phases),
            "bodies_per_s": sum(ph["answered_while_measured"] for ph in phases) / measured_s,
            "loop_late": late_ticks(ticks, measured_s),
            "ttft_s": times}


def ratio_interval(loaded: Sequence[float], control: Sequence[float], q: float, seed: int = 0,
                   resamples: int = BOOTSTRAP_RESAMPLES, level: float = INTERVAL) -> tuple[float, float]:
    """A bootstrap interval for the ratio of the `q` quantiles of two samples: each resampled with
    replacement, `resamples` times; the middle `level` of the ratios. A p99 over a few hundred
    samples is its third-worst one, so a single run's ratio moves by tens of percent: the interval
    says how far."""
    rng = random.Random(seed)
    ratios = sorted(p(rng.choices(loaded, k=len(loaded)), q) / p(rng.choices(control, k=len(control)), q)
                    for _ in range(resamples))
    tail = (1 - level) / 2
    return ratios[int(tail * resamples)], ratios[min(resamples - 1, int((1 - tail) * resamples))]


def metric_samples(url: str, sample: str, label: str) -> dict[str, float]:
    """One sample of the router's /metrics (a counter's `_total`, a histogram's `_bucket`), by one label."""
    families = text_string_to_metric_families(httpx.get(url + "/metrics", timeout=60).text)
    return {s.labels[label]: s.value for family in families for s in family.samples if s.name == sample}


def big_body_outcomes(url: str) -> dict[str, int]:
    """The router's own count of what became of big bodies (`umem_big_request_bodies_total`)."""
    return {outcome: int(n) for outcome, n in metric_samples(url, "umem_big_request_bodies_total", "outcome").items()}


def loop_lag_ticks(url: str) -> dict[str, float]:
    """The router's own measure of how long its event loop was held (`umem_event_loop_lag_seconds`):
    ticks late by at most each bound, cumulative, `+Inf` for all."""
    return metric_samples(url, "umem_event_loop_lag_seconds_bucket", "le")


def late_ticks(ticks: dict[str, float], measured_s: float) -> dict[str, float]:
    """Ticks a second that the loop ran later than each of `LATE_MS`, and the bound all were within."""
    late = {f"over_{ms}ms_per_s": (ticks["+Inf"] - ticks[_bound(ms)]) / measured_s for ms in LATE_MS}
    within = min((float(le) for le, n in ticks.items() if n == ticks["+Inf"]), default=float("inf"))
    return {**late, "all_within_ms": within * 1e3}


def _bound(ms: float) -> str:
    return str(ms / 1e3)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30, help="TTFT samples per phase (default 30)")
    parser.add_argument("--rate", type=float, default=6.0,
                        help="big bodies a second from all senders together, the same in the control and the "
                             "big-bodies phases, so that both do the same work (default 6; 0: each sender posts "
                             "again as soon as it is answered, and the faster side does more)")
    parser.add_argument("--rounds", type=int, default=10,
                        help="control and big-bodies phases, alternated, each this many times (default 10)")
    parser.add_argument("--senders", type=int, default=4, help="processes posting big bodies (default 4)")
    parser.add_argument("--models", default=os.environ.get("UMEM_TEST_MODELS"),
                        help="folder of the tiny demo models (env UMEM_TEST_MODELS; default: built in a temp dir)")
    parser.add_argument("--accept-all", action="store_true",
                        help=f"start the router with --max-messages {MESSAGES}, so the bodies are validated in full")
    parser.add_argument("--shape", choices=("tiny", "long", "triton"), default="tiny",
                        help=f"tiny: {MESSAGES:,} one-character messages (default); long: {DEFAULT_MAX_MESSAGES:,} "
                             f"messages of {LONG_CHARS} characters; triton: one text_input as long, to Triton's "
                             "generate extension (/v2/models/{name}/generate)")
    parser.add_argument("--to", choices=("served", "unknown"), default="served",
                        help="the model the big bodies name: the hot one (default; a long body is then refused "
                             "by its engine for the context, from its byte length) or one not served (404)")
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the control phase: the same senders post the same bodies to a sink that "
                             "parses them as the parser processes do, outside the router (default: on)")
    parser.add_argument("--parse-costs", action="store_true",
                        help="only time the router's own parse of the costliest bodies that pass the default bounds")
    args = parser.parse_args(argv)
    if args.parse_costs:
        costs = parse_costs()
        print(f"  {'body':<40} {'prepare':>9} {'unpickle':>9}   (CPU ms; prepare in a parser process)")
        for label, row in costs.items():
            print(f"  {label:<40} {row['prepare_ms']:9.1f} {row['unpickle_ms']:9.1f}")
        print(json.dumps({"parse_ms": costs}))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.models) if args.models else Path(tmp) / "models"
        models = ensure_tiny_models(root, DEMO_MODELS[:1])
        name, weights = next(iter(models.items()))
        manifest = Path(tmp) / "models.yaml"
        write_manifest(manifest, [spec_from_mapping({"name": name, "weights": str(weights)})])
        proc, url = start_router(manifest, Path(tmp) / "work", args.accept_all)
        try:
            target = name if args.to == "served" else "not-served"
            body, path = big_body(args.shape, target), body_path(args.shape, target)
            with httpx.Client(base_url=url, timeout=300) as client:
                for _ in range(WARMUP_REQUESTS):  # hot, its batching started, its tokenizer loaded
                    ttft(client, name)
            quiet = summary([phase(url, name, args.requests * args.rounds, 0, b"")])  # as many samples
            controls: list[dict[str, Any]] = []
            loads: list[dict[str, Any]] = []
            sink_url, sinks = start_sink(PARSER_PROCESSES) if args.control else ("", [])
            try:
                for round_ in range(args.rounds):
                    if args.control and round_ % 2 == 0:
                        controls.append(phase(url, name, args.requests, args.senders, body, sink_url, args.rate, path))
                    loads.append(phase(url, name, args.requests, args.senders, body, rate=args.rate, path=path))
                    if args.control and round_ % 2 == 1:
                        controls.append(phase(url, name, args.requests, args.senders, body, sink_url, args.rate, path))
            finally:
                for worker in sinks:
                    worker.kill()
            outcomes = big_body_outcomes(url)
        finally:
            proc.terminate()
            proc.wait(60)
    loaded = summary(loads)
    control = summary(controls) if controls else None
    result: dict[str, Any] = {
        "body_bytes": len(body), "shape": args.shape, "to": args.to, "senders": args.senders,
        "accept_all": args.accept_all, "rate": args.rate, "rounds": args.rounds, "big_body_outcomes": outcomes,
        "quiet": quiet, "big_bodies": loaded,
        "ttft_p50_ratio": loaded["ttft_p50_s"] / quiet["ttft_p50_s"],
        "ttft_p99_ratio": loaded["ttft_p99_s"] / quiet["ttft_p99_s"]}
    if control is not None:
        result.update(control=control, ttft_p50_ratio_to_control=loaded["ttft_p50_s"] / control["ttft_p50_s"],
                      ttft_p99_ratio_to_control=loaded["ttft_p99_s"] / control["ttft_p99_s"],
                      ttft_p50_ratio_to_control_interval=ratio_interval(loaded["ttft_s"], control["ttft_s"], 0.5),
                      ttft_p99_ratio_to_control_interval=ratio_interval(loaded["ttft_s"], control["ttft_s"], 0.99))
    told = ", ".join(f"{outcome} {count}" for outcome, count in sorted(outcomes.items()) if count) or "none counted"
    pace = f"{args.rate:g} a second" if args.rate > 0 else "each as fast as answered"
    print(f"body {len(body) / 1e6:.1f} MB ({args.shape}) x {args.senders} senders ({pace}), {args.rounds} rounds "
          f"({loaded['big_bodies_answered']} answered by the router; by its count: {told})")
    rows = [("quiet", quiet), *([("control", control)] if control is not None else []), ("big bodies", loaded)]
    for label, row in rows:
        print(f"  {label:<11} TTFT p50 {row['ttft_p50_s'] * 1e3:7.1f} ms  p99 {row['ttft_p99_s'] * 1e3:7.1f} ms  "
              f"/health max {row['health_max_s'] * 1e3:7.1f} ms  ({row['samples']} samples, "
              f"{row['bodies_per_s']:.1f} bodies/s)")
        late = row["loop_late"]
        print(f"  {'':<11} event loop late by over " + ", ".join(
            f"{ms} ms {late[f'over_{ms}ms_per_s']:.2f}/s" for ms in LATE_MS)
            + f"; all within {late['all_within_ms']:g} ms")
    print(f"  big bodies / quiet    p50 {result['ttft_p50_ratio']:.2f}  p99 {result['ttft_p99_ratio']:.2f}")
    if control is not None:
        (lo50, hi50), (lo99, hi99) = (result["ttft_p50_ratio_to_control_interval"],
                                      result["ttft_p99_ratio_to_control_interval"])
        print(f"  big bodies / control  p50 {result['ttft_p50_ratio_to_control']:.2f} [{lo50:.2f}, {hi50:.2f}]  "
              f"p99 {result['ttft_p99_ratio_to_control']:.2f} [{lo99:.2f}, {hi99:.2f}]   "
              f"(1.0: the router adds nothing to sharing the cores; [{INTERVAL:.0%} interval])")
    for row in rows:
        del row[1]["ttft_s"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
