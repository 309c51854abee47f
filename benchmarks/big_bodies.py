"""Another client's time to first token while big request bodies arrive, against a real router.

A streaming client asks a hot tiny model for a few tokens, one request after another, and its
TTFT is measured twice in one run: alone, then while `--senders` threads keep posting ~6.8 MB
chat bodies (200,000 one-character messages each) for a model that is not served, so only
parsing and validation run for them. On the default settings they are refused (400: more
messages than `--max-messages` allows) once parsed; with `--accept-all` the router is started
to take that many, so each is also validated in full (and answered 404). Reported: p50 and p99
TTFT of each phase and their ratios (1.0 = big bodies cost other clients nothing), plus the
worst /health latency seen in each phase.

    python benchmarks/big_bodies.py                 # about a minute on 2 cores
    python benchmarks/big_bodies.py --accept-all --requests 200 --senders 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from clearml_umem.catalog import write_manifest
from clearml_umem.spec import spec_from_mapping
from clearml_umem.tinymodels import DEMO_MODELS, ensure_tiny_models

READY = "umem: serving on "
MESSAGES = 200_000


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


def phase(url: str, model: str, requests: int, senders: int, body: bytes) -> dict[str, float]:
    stop = threading.Event()
    posted = [0]
    health: list[float] = []

    def send() -> None:
        with httpx.Client(base_url=url, timeout=300) as c:
            while not stop.is_set():
                resp = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
                # 400: over the messages cap; 404: valid, validated in full, for a model not served
                assert resp.status_code in (400, 404), resp.text[:200]
                posted[0] += 1

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=300) as c:
            while not stop.is_set():
                started = time.perf_counter()
                c.get("/health").raise_for_status()
                health.append(time.perf_counter() - started)
                time.sleep(0.02)

    threads = [threading.Thread(target=send, daemon=True) for _ in range(senders)]
    threads.append(threading.Thread(target=poll, daemon=True))
    for t in threads:
        t.start()
    if senders:
        time.sleep(1.0)  # the bodies are arriving
    times: list[float] = []
    with httpx.Client(base_url=url, timeout=300) as client:
        for _ in range(requests):
            times.append(ttft(client, model))
    stop.set()
    for t in threads:
        t.join(300)
    return {"ttft_p50_s": statistics.median(times), "ttft_p99_s": p(times, 0.99),
            "health_max_s": max(health) if health else float("nan"), "big_bodies_answered": posted[0]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60, help="TTFT samples per phase (default 60)")
    parser.add_argument("--senders", type=int, default=4, help="threads posting big bodies (default 4)")
    parser.add_argument("--models", default=os.environ.get("UMEM_TEST_MODELS"),
                        help="folder of the tiny demo models (env UMEM_TEST_MODELS; default: built in a temp dir)")
    parser.add_argument("--accept-all", action="store_true",
                        help=f"start the router with --max-messages {MESSAGES}, so the bodies are validated in full")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.models) if args.models else Path(tmp) / "models"
        models = ensure_tiny_models(root, DEMO_MODELS[:1])
        name, weights = next(iter(models.items()))
        manifest = Path(tmp) / "models.yaml"
        write_manifest(manifest, [spec_from_mapping({"name": name, "weights": str(weights)})])
        proc, url = start_router(manifest, Path(tmp) / "work", args.accept_all)
        try:
            body = json.dumps({"model": "not-served", "messages": [{"role": "user", "content": "x"}] * MESSAGES})
            with httpx.Client(base_url=url, timeout=300) as client:
                ttft(client, name)  # the model is hot before anything is measured
            quiet = phase(url, name, args.requests, 0, b"")
            loaded = phase(url, name, args.requests, args.senders, body.encode())
        finally:
            proc.terminate()
            proc.wait(60)
    result = {"body_bytes": len(body), "senders": args.senders, "accept_all": args.accept_all, "quiet": quiet,
              "big_bodies": loaded,
              "ttft_p50_ratio": loaded["ttft_p50_s"] / quiet["ttft_p50_s"],
              "ttft_p99_ratio": loaded["ttft_p99_s"] / quiet["ttft_p99_s"]}
    print(f"body {len(body) / 1e6:.1f} MB x {args.senders} senders ({loaded['big_bodies_answered']} answered, "
          f"{'validated in full' if args.accept_all else 'refused over the messages cap'})")
    for label, row in (("quiet", quiet), ("big bodies", loaded)):
        print(f"  {label:<11} TTFT p50 {row['ttft_p50_s'] * 1e3:7.1f} ms  p99 {row['ttft_p99_s'] * 1e3:7.1f} ms  "
              f"/health max {row['health_max_s'] * 1e3:7.1f} ms")
    print(f"  ratio       p50 {result['ttft_p50_ratio']:.2f}  p99 {result['ttft_p99_ratio']:.2f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
