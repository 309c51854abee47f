"""Model-aware routing against round-robin over the same three routers and the same traffic.

Three real routers on loopback (the CPU as each one's device), each serving the demo's three tiny
models with room for one on its device: a router that gets a model other than the one it holds
swaps. The same seeded traffic (models drawn at random, `--clients` at a time) goes through the
fleet's relay (the code of `clearml-umem front` and of the clearml-serving forwarder) twice: once
choosing routers by model (hot, then RAM, then disk, then least loaded), once in turn. Between the
runs every model is placed cold on every router, so both start alike. Reported: swaps (moves to
the GPU, from the routers' own move history) and time to first token at the client, with the
round-robin run's figures as ratios to the model-aware run's, all from one run.

    python benchmarks/fleet_routing.py                          # 3 routers, 90 requests, about a minute
    python benchmarks/fleet_routing.py --routers URL,URL,URL    # routers already up (no API keys)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from clearml_umem.fleet.choose import RouterView, rank, round_robin  # noqa: E402
from clearml_umem.fleet.discovery import StaticRouters  # noqa: E402
from clearml_umem.fleet.probe import Fleet  # noqa: E402
from clearml_umem.fleet.relay import send  # noqa: E402


@dataclass
class Run:
    name: str
    ttft: list[float] = field(default_factory=list)
    swaps: int = 0
    routers_used: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def p(self, q: float) -> float:
        ordered = sorted(self.ttft)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.ttft) if self.ttft else float("nan")


def traffic(models: list[str], requests: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(models) for _ in range(requests)]


async def reset(client: httpx.AsyncClient, urls: list[str], models: list[str]) -> dict[str, int]:
    """Every model cold everywhere; each router's move-history mark, to count the swaps after it."""
    for url in urls:
        for model in models:
            resp = await client.post(f"{url}/admin/models/{model}/place", json={"tier": "cold"}, timeout=300)
            resp.raise_for_status()
    marks = {}
    for url in urls:
        moves = (await client.get(f"{url}/admin/status", timeout=30)).json()["moves"]
        marks[url] = max((m["seq"] for m in moves), default=0)
    return marks


async def swaps_since(client: httpx.AsyncClient, urls: list[str], marks: dict[str, int]) -> int:
    total = 0
    for url in urls:
        moves = (await client.get(f"{url}/admin/status", params={"after": marks[url]}, timeout=30)).json()["moves"]
        total += sum(1 for m in moves if m["dst"] == "gpu" and m["ok"])
    return total


async def one_run(name: str, urls: list[str], models: list[str], sequence: list[str], clients: int,
                  max_tokens: int, by_model: bool) -> Run:
    run = Run(name)
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        marks = await reset(client, urls, models)
        fleet = Fleet(StaticRouters.parse(urls), client, probe_s=0.5)
        fleet.start()
        turns = itertools.count()

        def turn_by_turn(views: list[RouterView], model: str) -> list[RouterView]:
            return round_robin(views, model, next(turns))

        chooser = rank if by_model else turn_by_turn
        queue = list(reversed(sequence))

        async def worker() -> None:
            while queue:
                model = queue.pop()
                body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
                        "stream": True}
                started = time.perf_counter()
                try:
                    sent = await send(fleet, client, "POST", "/v1/completions", model, body, {}, chooser)
                    first = True
                    async for _ in sent.chunks():
                        if first:
                            run.ttft.append(time.perf_counter() - started)
                            first = False
                    if sent.response.status_code != 200:
                        run.errors.append(f"{model}: HTTP {sent.response.status_code}")
                    run.routers_used[sent.url] = run.routers_used.get(sent.url, 0) + 1
                except Exception as exc:  # noqa: BLE001 - counted and shown
                    run.errors.append(f"{model}: {type(exc).__name__}: {exc}")

        try:
            await asyncio.gather(*(worker() for _ in range(clients)))
        finally:
            await fleet.close()
        run.swaps = await swaps_since(client, urls, marks)
    return run


def table(runs: Sequence[Run], requests: int) -> str:
    aware, rr = runs
    rows = ["| routing | answered | swaps | median TTFT s | p95 TTFT s | requests per router |",
            "|---|---|---|---|---|---|"]
    for r in runs:
        spread = ", ".join(str(n) for _, n in sorted(r.routers_used.items()))
        rows.append(f"| {r.name} | {len(r.ttft)}/{requests} | {r.swaps} | {r.median:.3f} | {r.p(0.95):.3f} | "
                    f"{spread} |")
    swaps = rr.swaps / max(aware.swaps, 1)
    rows.append("")
    rows.append(f"round-robin / model-aware: swaps {swaps:.2f}x, median TTFT {rr.median / aware.median:.2f}x, "
                f"p95 TTFT {rr.p(0.95) / aware.p(0.95):.2f}x")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routers", default="", help="comma-separated URLs of running routers (default: start 3)")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--requests", type=int, default=90)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models-dir", default=str(Path.home() / ".cache" / "clearml-umem" / "demo"))
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        parser.error("--clients and --requests must be at least 1")
    from clearml_umem.tinymodels import DEMO_MODELS, ensure_tiny_models

    paths = ensure_tiny_models(Path(args.models_dir), DEMO_MODELS)
    models = sorted(paths)
    sequence = traffic(models, args.requests, args.seed)
    with tempfile.TemporaryDirectory(prefix="umem-fleet-") as tmp:
        started = None
        if args.routers:
            urls = list(StaticRouters.parse(args.routers).urls)
        else:
            from tests.fleetproc import start_fleet3

            started = start_fleet3(paths, Path(tmp))
            urls = started.urls
        try:
            runs = [asyncio.run(one_run(name, urls, models, sequence, args.clients, args.max_tokens, by_model))
                    for name, by_model in (("model-aware", True), ("round-robin", False))]
        finally:
            if started is not None:
                started.stop()
    print(f"{len(urls)} routers (room for one model each), {len(models)} models, {args.requests} requests, "
          f"{args.clients} clients, {args.max_tokens} tokens each, seed {args.seed}; TTFT at the client")
    print(table(runs, args.requests))
    for r in runs:
        if r.errors:
            print(f"{r.name}: {len(r.errors)} errors, e.g. {r.errors[0]}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps([{"name": r.name, "answered": len(r.ttft), "swaps": r.swaps,
                                                "median_ttft": r.median, "p95_ttft": r.p(0.95),
                                                "routers_used": r.routers_used, "errors": r.errors} for r in runs],
                                              indent=2))
    return runs


if __name__ == "__main__":
    main()
