"""The router's own cost: time to first token through the router beside the same engine reached
without it, in alternating pairs in one run.

A router process (the real CLI, default settings: access log on) serves two tiny models, both
hot: a GGUF model on the llama.cpp engine and a Hugging Face model on the transformers engine.

- llamacpp: each pair sends the same streaming chat request (`max_tokens` 1) once through the
  router and once straight to its `llama-server`, on the private Unix socket the router's engine
  client uses (`GET /admin/models` names it; this benchmark runs as the router's user, the only
  one who can open it). Both go through one `httpx` client library, kept-alive connections.
- transformers: the engine runs inside the router, so its peer is the same engine class called in
  this process (`engine.generate`, to the first piece of text), loading the same model; the
  paired difference is then the router and HTTP together.

TTFT is measured by the client, from sending the request to the first chunk that carries text
(or ends the answer). Each pair swaps which goes first, so drift and order effects hit both;
`--baseline DIR` adds a second router on another checkout's code to the same rotation;
the figures are medians and p90 of each side and the median of the paired differences
(router minus peer), in ms and as a ratio to the peer's median.

    python benchmarks/router_overhead.py                      # about a minute on 2 cores
    python benchmarks/router_overhead.py --pairs 500 --json out.json --engines llamacpp
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from clearml_umem.engines.llama_server import find_llama_server
from clearml_umem.server import READY_PREFIX
from clearml_umem.tinygguf import TinyGGUF, write_tiny_gguf

ENGINES = ("llamacpp", "transformers")
MESSAGES = [{"role": "user", "content": "tell me about the tier"}]
GGUF_SHAPE = TinyGGUF("overhead-gguf", "q8_0", hidden_size=64, num_layers=2, context_length=1024, seed=21)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile by linear interpolation (statistics.quantiles needs two values or more)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(router_s: Sequence[float], peer_s: Sequence[float]) -> dict[str, float]:
    """Medians, p90s and the median paired difference, in ms; ratios to the peer's median."""
    diffs = [r - p for r, p in zip(router_s, peer_s, strict=True)]
    peer_median = statistics.median(peer_s)
    median_diff = statistics.median(diffs)
    return {
        "pairs": len(diffs),
        "router_median_ms": 1e3 * statistics.median(router_s),
        "router_p90_ms": 1e3 * percentile(router_s, 0.9),
        "peer_median_ms": 1e3 * peer_median,
        "peer_p90_ms": 1e3 * percentile(peer_s, 0.9),
        "added_median_ms": 1e3 * median_diff,
        "added_p90_ms": 1e3 * percentile(diffs, 0.9),
        "router_over_peer": statistics.median(router_s) / peer_median,
        "added_over_peer": median_diff / peer_median,
    }


def first_text_seconds(client: httpx.Client, url: str, body: dict[str, Any]) -> float:
    """Seconds from sending `body` to the first chunk with text or a finish reason; reads the rest.

    llama-server (0.3.36) closes a kept-alive connection after some streamed answers without
    saying so; a request sent on it fails before any byte comes back, and is sent again,
    timed afresh, on a new connection."""
    for attempt in range(3):
        try:
            return _timed_stream(client, url, body)
        except httpx.RemoteProtocolError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _timed_stream(client: httpx.Client, url: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    ttft = None
    with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{url} answered {resp.status_code}: {resp.read()[:300]!r}")
        for line in resp.iter_lines():
            if ttft is not None or not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            delta = choices[0].get("delta") or {}
            if delta.get("content") or choices[0].get("finish_reason"):
                ttft = time.perf_counter() - started
    if ttft is None:
        raise RuntimeError(f"{url} streamed no text and no finish reason")
    return ttft


def rotate(sides: dict[str, Callable[[], float]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Each side once per round, `rounds` timed rounds after `warmup` untimed ones; round i starts
    at side i (mod the number of sides), so that no side always goes first."""
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        got = {name: sides[name]() for name in order}
        if i >= warmup:
            for name in names:
                times[name].append(got[name])
    return times


def start_router(manifest: Path, work: Path, device: str, extra: Sequence[str] = (), timeout: float = 300,
                 pythonpath: str | None = None) -> tuple[subprocess.Popen[str], str, list[str]]:
    """The CLI's router; `pythonpath` runs another checkout's code (`--baseline`)."""
    cmd = [sys.executable, "-m", "clearml_umem", "serve", "--manifest", str(manifest), "--port", "0",
           "--work-dir", str(work), "--device", device, *extra]
    env = {**os.environ, "UMEM_API_KEY": "", "UMEM_ADMIN_KEY": ""}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if len(lines) < 400:
                lines.append(line.rstrip())
            if line.startswith(READY_PREFIX) and not found:
                found.append(line[len(READY_PREFIX):].strip())
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout) or not found:
        proc.kill()
        raise RuntimeError("the router did not start:\n" + "\n".join(lines[-30:]))
    return proc, found[0], lines


def engine_socket(client: httpx.Client, model: str) -> str:
    """The Unix socket of the model's llama-server, as the router's admin view names it."""
    rows = client.get("/admin/models").json()["data"]
    details = next(r for r in rows if r["name"] == model)["engine_details"]
    url = str(details.get("url") or "")
    if details.get("transport") != "uds" or not url.startswith("unix:"):
        raise RuntimeError(f"llama-server of {model} does not listen on a Unix socket ({url or 'no url'}): "
                           "this benchmark reaches it only there")
    return url[len("unix:"):]


def chat_body(model: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True}


def bench_llamacpp(routers: dict[str, httpx.Client], model: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per router (this one, and `--baseline`'s), each against its own llama-server; all
    sides rotate in one loop."""
    body = chat_body(model, args.max_tokens)
    sides: dict[str, Callable[[], float]] = {}
    with contextlib.ExitStack() as stack:
        for label, router in routers.items():
            direct = stack.enter_context(httpx.Client(transport=httpx.HTTPTransport(uds=engine_socket(router, model)),
                                                      base_url="http://localhost", trust_env=False, timeout=60))
            sides[f"{label} router"] = lambda c=router: first_text_seconds(c, "/v1/chat/completions", body)
            sides[f"{label} direct"] = lambda c=direct: first_text_seconds(c, "/v1/chat/completions", body)
        times = rotate(sides, args.pairs, args.warmup)
    return [{"engine": "llamacpp" if label == "this" else f"llamacpp ({label})", "peer": "llama-server on its socket",
             **summary(times[f"{label} router"], times[f"{label} direct"])} for label in routers]


def bench_transformers(router: httpx.Client, model: str, weights: Path, args: argparse.Namespace) -> dict[str, Any]:
    from clearml_umem.engines import EngineContext, GenerationRequest, create_engine
    from clearml_umem.spec import spec_from_mapping
    from clearml_umem.tiers import Tier

    body = chat_body(model, args.max_tokens)
    engine = create_engine(spec_from_mapping({"name": model, "weights": str(weights)}),
                           EngineContext(work_dir=args.work / "inproc", device=args.device))
    loop = asyncio.new_event_loop()

    async def in_process() -> float:
        request = GenerationRequest(messages=MESSAGES, max_tokens=args.max_tokens, temperature=0.0)
        started = time.perf_counter()
        ttft = None
        async for delta in engine.generate(request):
            if ttft is None and (delta.text or delta.finish_reason):
                ttft = time.perf_counter() - started
        assert ttft is not None
        return ttft

    try:
        loop.run_until_complete(engine.move(Tier.COLD, Tier.GPU))
        times = rotate({"router": lambda: first_text_seconds(router, "/v1/chat/completions", body),
                        "peer": lambda: loop.run_until_complete(in_process())}, args.pairs, args.warmup)
    finally:
        loop.run_until_complete(engine.close())
        loop.close()
    return {"engine": "transformers", "peer": "the engine in-process", **summary(times["router"], times["peer"])}


def prepare_models(args: argparse.Namespace) -> dict[str, tuple[str, Path, str]]:
    """name -> (engine, weights, manifest lines) for each engine asked for."""
    models: dict[str, tuple[str, Path, str]] = {}
    if "llamacpp" in args.engines:
        gguf = write_tiny_gguf(args.work / "m.gguf", GGUF_SHAPE)
        models["llamacpp"] = (GGUF_SHAPE.name, gguf, "    engine: llamacpp\n    context_length: 1024\n")
    if "transformers" in args.engines:
        from clearml_umem.tinymodels import DEMO_MODELS, ensure_tiny_models

        shape = DEMO_MODELS[0]
        root = Path(args.models_dir).expanduser() if args.models_dir else args.work / "hf"
        path = ensure_tiny_models(root, (shape,))[shape.name]
        models["transformers"] = (shape.name, path, "    engine: transformers\n")
    return models


def run(args: argparse.Namespace) -> dict[str, Any]:
    models = prepare_models(args)
    manifest = args.work / "models.yaml"
    manifest.write_text("models:\n" + "".join(f"  - name: {name}\n    weights: {weights}\n{more}"
                                               for name, weights, more in models.values()))
    extra = ["--llama-server", args.llama_server] if "llamacpp" in models else []
    results: list[dict[str, Any]] = []
    procs: list[tuple[subprocess.Popen[str], list[str]]] = []
    try:
        proc, url, log_lines = start_router(manifest, args.work / "router", args.device, [*extra, *args.router_args])
        procs.append((proc, log_lines))
        urls = {"this": url}
        if args.baseline and "llamacpp" in models:
            base_manifest = args.work / "baseline.yaml"
            name, weights, more = models["llamacpp"]
            base_manifest.write_text(f"models:\n  - name: {name}\n    weights: {weights}\n{more}")
            proc, urls["baseline"], log_lines = start_router(base_manifest, args.work / "baseline", args.device,
                                                             [*extra, *args.router_args], pythonpath=args.baseline)
            procs.append((proc, log_lines))
        with contextlib.ExitStack() as stack:
            routers = {label: stack.enter_context(httpx.Client(base_url=u, trust_env=False, timeout=300))
                       for label, u in urls.items()}
            for engine, (name, weights, _) in models.items():
                for router in routers.values() if engine == "llamacpp" else [routers["this"]]:
                    first_text_seconds(router, "/v1/chat/completions", chat_body(name, 1))  # load it: cold -> gpu
                if engine == "llamacpp":
                    results.extend(bench_llamacpp(routers, name, args))
                else:
                    results.append(bench_transformers(routers["this"], name, weights, args))
    except Exception:
        for _, lines in procs:
            print("\n".join(lines[-30:]), file=sys.stderr)
        raise
    finally:
        for proc, _ in procs:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"device": args.device, "max_tokens": args.max_tokens, "pairs": args.pairs, "warmup": args.warmup,
            "router_args": list(args.router_args), "baseline": args.baseline, "results": results}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Router overhead, {report['pairs']} alternating pairs, streaming chat, "
             f"max_tokens {report['max_tokens']}, {report['device']}:", "",
             "| engine | peer | router TTFT median / p90 | peer TTFT median / p90 | added (median of pairs) | "
             "router / peer |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['engine']} | {r['peer']} | {r['router_median_ms']:.2f} / {r['router_p90_ms']:.2f} ms | "
                     f"{r['peer_median_ms']:.2f} / {r['peer_p90_ms']:.2f} ms | {r['added_median_ms']:+.2f} ms "
                     f"({r['added_over_peer']:+.2f}x) | {r['router_over_peer']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=200, help="timed pairs per engine (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed pairs first (default 10)")
    parser.add_argument("--max-tokens", type=int, default=1, help="tokens per answer (default 1)")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help=f"comma-separated, of {', '.join(ENGINES)} (default both)")
    parser.add_argument("--device", default="cpu", help="the router's --device (default cpu)")
    parser.add_argument("--llama-server", default=None, help="the binary (default: as the router finds it)")
    parser.add_argument("--models-dir", default=None,
                        help="where to build (or reuse) the tiny transformers model (default: a temporary folder)")
    parser.add_argument("--router-arg", dest="router_args", action="append", default=[],
                        help="one more argument for `clearml-umem serve` (repeatable), "
                        "e.g. --router-arg=--no-access-log")
    parser.add_argument("--baseline", default=None, metavar="PYTHONPATH",
                        help="also run a router from another checkout's code (its plugin folder, e.g. the code "
                             "before a change): for llamacpp its router and llama-server join the rotation, one "
                             "more row in the same run")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(args.engines) - set(ENGINES))
    if unknown or not args.engines:
        parser.error(f"--engines: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(ENGINES)}")
    if args.pairs < 1 or args.warmup < 0 or args.max_tokens < 1:
        parser.error("--pairs and --max-tokens must be at least 1, --warmup at least 0")
    if "llamacpp" in args.engines:
        args.llama_server = find_llama_server(args.llama_server)
        if not args.llama_server:
            print("no llama-server: run scripts/install-llama-server.sh or pass --llama-server", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="umem-overhead-") as tmp:
        args.work = Path(tmp)
        report = run(args)
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
