"""Mixed load on the real router: swaps per request and waits, with and without the fairness window.

Many clients send requests spread at random over the demo's three tiny models, with a
device budget that holds one of them, all three loaded in RAM and asked once before the
traffic starts: every switch between models is a swap from RAM. The same seeded traffic runs with the
fairness window (the default) and with strict arrival order (`--fairness-window off`), in
one process, and the table reports each as a ratio to strict order from the same run.
With --rounds 2 (the default) the order is A B B A, so that the machine's load changing
over the run weighs on both alike. Real router on loopback, real transformers engine on
the CPU (or the GPU), an HTTP client per request; bounded by --requests.

    python benchmarks/load_bench.py                      # 32 clients, 2 x 300 requests per variant, 2-4 minutes
    python benchmarks/load_bench.py --clients 8 --requests 40
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from clearml_umem.catalog import write_manifest
from clearml_umem.config import ServeConfig
from clearml_umem.engines import EngineContext
from clearml_umem.events import Event, MoveFinished
from clearml_umem.spec import spec_from_mapping
from clearml_umem.tiers import Tier
from clearml_umem.tinymodels import DEMO_MODELS, ensure_tiny_models

VARIANTS = (("fairness window (default)", "auto"), ("strict arrival order", "off"))


@dataclass
class Run:
    name: str
    waits: list[float] = field(default_factory=list)
    hits: int = 0
    swap_ins: int = 0
    errors: list[str] = field(default_factory=list)

    def p(self, q: float) -> float:
        ordered = sorted(self.waits)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def one_run(name: str, fairness: str, manifest: Path, budgets: tuple[int, int], work: Path, clients: int,
            requests: int, seed: int, max_tokens: int) -> Run:
    from clearml_umem.server import UnifiedMemoryServer

    config = ServeConfig(manifest=str(manifest), port=0, device="cpu", device_budget=str(budgets[0]),
                         host_budget=str(budgets[1]), work_dir=str(work), fairness_window=fairness).validate()
    server = UnifiedMemoryServer(config)
    run = Run(name)
    lock = threading.Lock()

    def count(event: Event) -> None:
        if isinstance(event, MoveFinished) and event.dst is Tier.GPU:
            with lock:
                run.swap_ins += 1

    server.bus.subscribe(count)
    names = [m.name for m in DEMO_MODELS]
    rng = random.Random(seed)
    plan = [rng.choice(names) for _ in range(requests)]
    with server.run_in_thread() as url, httpx.Client(base_url=url, timeout=300) as client:
        # Every model starts in RAM: the traffic measures swaps, not engine starts (the first
        # server of the process would also pay for the imports and the first kernels) ...
        for name in names:
            client.post(f"/admin/models/{name}/place", json={"tier": "ram"}).raise_for_status()
        # and has answered once: first requests pay one-time costs (kernels, caches) that are not the scheduler's
        for name in names:
            client.post("/v1/chat/completions", json={"model": name, "max_tokens": 1,
                                                      "messages": [{"role": "user", "content": "hi"}]}
                        ).raise_for_status()
        with lock:
            run.swap_ins = 0

        def ask(model: str) -> None:
            body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True}
            start = time.perf_counter()
            try:
                with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                    if resp.status_code != 200:
                        raise RuntimeError(f"HTTP {resp.status_code}")
                    first = None
                    for line in resp.iter_lines():
                        if first is None and line.startswith("data:") and '"content":"' in line.replace(" ", "") \
                                and '"content":""' not in line.replace(" ", ""):
                            first = time.perf_counter() - start
                    with lock:
                        run.waits.append(first if first is not None else time.perf_counter() - start)
                        run.hits += resp.headers.get("x-umem-served-from") == "gpu"
            except Exception as exc:  # noqa: BLE001 - counted and shown, the run goes on
                with lock:
                    run.errors.append(f"{model}: {exc}")

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(ask, plan))
    return run


def table(runs: Sequence[Run], requests: int) -> str:
    base = runs[-1]
    rows = ["| variant | answered | served hot | swap-ins / request | p50 wait s | p99 wait s | swaps / strict "
            "| p50 / strict | p99 / strict |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        swaps = r.swap_ins / requests
        rows.append(f"| {r.name} | {len(r.waits)}/{requests} | {r.hits} | {swaps:.3f} | {r.p(0.5):.3f} | "
                    f"{r.p(0.99):.3f} | {swaps / max(base.swap_ins / requests, 1e-9):.2f} | "
                    f"{r.p(0.5) / base.p(0.5):.2f} | {r.p(0.99) / base.p(0.99):.2f} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds per variant, in alternating order (seed + round: the same traffic for both)")
    parser.add_argument("--models-dir", default=str(Path.home() / ".cache" / "clearml-umem" / "demo"))
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.rounds < 1:
        parser.error("--clients, --requests and --rounds must be at least 1")
    from clearml_umem.demo import room_for_one

    paths = ensure_tiny_models(args.models_dir)
    specs = [spec_from_mapping({"name": n, "weights": str(p)}) for n, p in paths.items()]
    with tempfile.TemporaryDirectory(prefix="umem-load-") as tmp:
        work = Path(tmp)
        manifest = work / "models.yaml"
        write_manifest(manifest, specs)
        device, host, _ = room_for_one(specs, EngineContext(work_dir=work, device="cpu"))
        runs = [Run(name) for name, _ in VARIANTS]
        for i in range(args.rounds):
            # ABBA...: a variant that runs first in one round runs last in the next, so that a change
            # in the machine's load over the run weighs on both alike
            for k in (range(len(VARIANTS)) if i % 2 == 0 else reversed(range(len(VARIANTS)))):
                name, fairness = VARIANTS[k]
                one = one_run(name, fairness, manifest, (device, host), work / f"{name.split()[0]}-{i}",
                              args.clients, args.requests, args.seed + i, args.max_tokens)
                runs[k].waits += one.waits
                runs[k].hits += one.hits
                runs[k].swap_ins += one.swap_ins
                runs[k].errors += one.errors
    requests = args.requests * args.rounds
    print(f"{args.clients} clients, {args.requests} requests over {len(specs)} models (room for one) in each of "
          f"{args.rounds} rounds per variant (alternating order), {args.max_tokens} tokens each, seed {args.seed}; "
          "wait = time to first token at the client")
    print(table(runs, requests))
    for r in runs:
        if r.errors:
            print(f"{r.name}: {len(r.errors)} errors, e.g. {r.errors[0]}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps([{"name": r.name, "answered": len(r.waits), "hits": r.hits,
                                                "swap_ins": r.swap_ins, "p50": r.p(0.5), "p99": r.p(0.99),
                                                "errors": r.errors} for r in runs], indent=2))
    return runs


if __name__ == "__main__":
    main()
