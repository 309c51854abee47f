"""The transformers engine's hot path: time to first token and decode tokens/s at 1, 8 and 32 concurrent
requests, with continuous batching (`auto`) and with each request on its own `generate()` (`off`),
in one run, on the engine itself (no router: what the engine adds, not the HTTP around it).

On the CPU each figure of the batched path is reported as a ratio to the per-request path's. On a GPU
also as a ratio to the weight-read bound: a forward of a short prompt cannot beat reading every weight
once, so the bound TTFT is weight bytes / memory bandwidth and the bound decode rate at N requests is
N x bandwidth / weight bytes (one weight read per step, shared by the batch). The bandwidth is measured
in the same run with a device-to-device copy probe (bytes read + bytes written over its time).

    python benchmarks/hot_path.py                        # tiny model on the CPU
    python benchmarks/hot_path.py --weights DIR --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROMPT = "The quick brown fox jumps over the lazy dog"
VARIANTS = ("off", "auto")
"""Per-request generate() (the old path), then continuous batching."""


def bandwidth_probe(device: str, nbytes: int, runs: int = 5) -> float | None:
    """Device memory bandwidth in bytes/s from a device-to-device copy (read + write); None on a CPU."""
    import torch

    if not device.startswith("cuda"):
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


async def _one(engine: Any, prompt_ids: list[int], tokens: int, temperature: float) -> tuple[float, int, float]:
    """(time to first token, completion tokens, total seconds) of one streaming request."""
    from clearml_umem.engines.base import GenerationRequest

    request = GenerationRequest(prompt=PROMPT, max_tokens=tokens, temperature=temperature)
    request.prompt_ids = list(prompt_ids)
    started = time.perf_counter()
    first = None
    completion = 0
    async for delta in engine.generate(request):
        if first is None:
            first = time.perf_counter() - started
        if delta.finish_reason is not None:
            completion = delta.completion_tokens or 0
    return first or 0.0, completion, time.perf_counter() - started


async def _load(weights: Path, device: str, batching: str, max_concurrency: int) -> Any:
    from clearml_umem.engines import create_engine
    from clearml_umem.engines.base import EngineContext
    from clearml_umem.spec import spec_from_mapping
    from clearml_umem.tiers import Tier

    spec = spec_from_mapping({"name": weights.name, "weights": str(weights)})
    options = {"batching": batching, "host_copy": "evict", "max_concurrency": max_concurrency}
    engine = create_engine(spec, EngineContext(work_dir=weights.parent, device=device, options=options))
    await engine.move(Tier.COLD, Tier.GPU)
    return engine


async def _warm(engine: Any, prompt_ids: list[int], concurrency: Sequence[int], ready_s: float,
                temperature: float) -> None:
    """Untimed: the first requests (on a GPU they start the batcher's graph capture, in the background),
    then one pass per batch size (CUDA graphs of its shapes)."""
    await _one(engine, prompt_ids, 2, temperature)
    deadline = time.monotonic() + ready_s
    while engine.batching != "off" and not (engine.batcher and engine.batcher.running) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        await _one(engine, prompt_ids, 1, temperature)
    for n in concurrency:
        await asyncio.gather(*[_one(engine, prompt_ids, 2, temperature) for _ in range(n)])


async def _compare(weights: Path, device: str, concurrency: Sequence[int], tokens: int, runs: int,
                   repeats: int, ready_s: float, temperature: float) -> dict[str, Any]:
    """Both paths loaded side by side and measured in alternation (a busy machine slows both alike)."""
    engines: dict[str, Any] = {}
    try:
        for batching in VARIANTS:
            # sampled requests are batched by `auto` on a GPU; `all` batches them on a CPU as well
            mode = "all" if batching == "auto" and temperature > 0 else batching
            engines[batching] = await _load(weights, device, mode, max(concurrency))
        prompt_ids = engines["off"]._prompt_counter.ids(_request())
        for engine in engines.values():
            await _warm(engine, prompt_ids, concurrency, ready_s, temperature)
        steps = {b: e.batcher.steps if e.batcher else 0 for b, e in engines.items()}
        ttft: dict[str, list[float]] = {b: [] for b in engines}
        for _ in range(runs):
            for batching, engine in engines.items():
                ttft[batching].append((await _one(engine, prompt_ids, 1, temperature))[0])
        out: dict[str, Any] = {b: {"ttft_ms": round(statistics.median(ttft[b]) * 1000, 2), "by_concurrency": {}}
                               for b in engines}
        for n in concurrency:
            rounds: dict[str, list[dict[str, Any]]] = {b: [] for b in engines}
            for _ in range(repeats):
                for batching, engine in engines.items():
                    started = time.perf_counter()
                    results = await asyncio.gather(*[_one(engine, prompt_ids, tokens, temperature) for _ in range(n)])
                    wall = time.perf_counter() - started
                    produced = sum(r[1] for r in results)
                    rounds[batching].append({
                        "tokens_per_s": round(produced / wall, 1), "tokens": produced,
                        "ttft_p50_ms": round(statistics.median(r[0] for r in results) * 1000, 2),
                        "ttft_max_ms": round(max(r[0] for r in results) * 1000, 2)})
            for batching, measured in rounds.items():  # the median round by tokens/s
                out[batching]["by_concurrency"][str(n)] = sorted(measured, key=lambda r: r["tokens_per_s"])[
                    len(measured) // 2]
        for batching, engine in engines.items():
            out[batching]["weight_bytes"] = engine.weight_bytes
            out[batching]["batched_steps"] = (engine.batcher.steps if engine.batcher else 0) - steps[batching]
            out[batching]["batching_running"] = bool(engine.batcher and engine.batcher.running)
        return out
    finally:
        for engine in engines.values():
            await engine.close()


def _request() -> Any:
    from clearml_umem.engines.base import GenerationRequest

    return GenerationRequest(prompt=PROMPT, max_tokens=1, temperature=0.0)


def run_hot_path(weights: Path, device: str = "cpu", concurrency: Sequence[int] = (1, 8, 32), tokens: int = 32,
                 runs: int = 5, repeats: int = 3, ready_s: float = 120.0, temperature: float = 0.0) -> dict[str, Any]:
    """Both variants on one model, the bandwidth probe, and the ratios (batched / per-request; to the bound)."""
    report: dict[str, Any] = {"weights": str(weights), "device": device, "tokens": tokens, "runs": runs,
                              "repeats": repeats, "temperature": temperature,
                              "concurrency": list(concurrency)}
    report["variants"] = asyncio.run(_compare(weights, device, concurrency, tokens, runs, repeats, ready_s,
                                                      temperature))
    old, new = report["variants"]["off"], report["variants"]["auto"]
    weight_bytes = new["weight_bytes"]
    ratios: dict[str, Any] = {
        "ttft_old_over_new": _ratio(old["ttft_ms"], new["ttft_ms"]),
        "tokens_per_s_new_over_old": {n: _ratio(row["tokens_per_s"], old["by_concurrency"][n]["tokens_per_s"])
                                      for n, row in new["by_concurrency"].items()}}
    bandwidth = bandwidth_probe(device, min(weight_bytes, 4 << 30))
    if bandwidth:
        bound_s = weight_bytes / bandwidth
        report["bandwidth_gbps"] = round(bandwidth / 1e9, 1)
        report["bound_ttft_ms"] = round(bound_s * 1000, 3)
        for variant in report["variants"].values():
            variant["ttft_over_bound"] = round(variant["ttft_ms"] / 1000 / bound_s, 2)
            for n, row in variant["by_concurrency"].items():
                row["tokens_per_s_over_bound"] = round(row["tokens_per_s"] * bound_s / int(n), 3)
    report["ratios"] = ratios
    return report


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def markdown(report: dict[str, Any]) -> list[str]:
    """A table: one row per path, TTFT and tokens/s per concurrency (and ratios to the bound on a GPU)."""
    gpu = "bound_ttft_ms" in report
    conc = [str(n) for n in report["concurrency"]]
    head = ["path", "hot TTFT"] + [f"tok/s at {n}" for n in conc]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, label in (("off", "per-request generate()"), ("auto", "continuous batching")):
        v = report["variants"][name]
        cells = [label, f"{v['ttft_ms']:.1f} ms" + (f" ({v['ttft_over_bound']:.1f}x bound)" if gpu else "")]
        for n in conc:
            row = v["by_concurrency"][n]
            cells.append(f"{row['tokens_per_s']:.0f}" + (f" ({row['tokens_per_s_over_bound']:.2f} of bound)" if gpu
                                                          else ""))
        lines.append("| " + " | ".join(cells) + " |")
    r = report["ratios"]
    lines.append("")
    lines.append(f"Batched over per-request in this run: TTFT {r['ttft_old_over_new']}x faster; tokens/s "
                 + ", ".join(f"{r['tokens_per_s_new_over_old'][n]}x at {n}" for n in conc)
                 + f"; {report['variants']['auto']['batched_steps']} batched steps measured.")
    if gpu:
        lines.append(f"Weight-read bound: {report['bound_ttft_ms']:.2f} ms per forward (weights over "
                     f"{report['bandwidth_gbps']:.0f} GB/s, device-to-device copy probe in the same run).")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="", help="a model directory (default: the demo's tiny-llama, built once)")
    parser.add_argument("--models-dir", default=str(Path.home() / ".cache" / "clearml-umem" / "demo"))
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated request counts (default 1,8,32)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per request (default 32)")
    parser.add_argument("--runs", type=int, default=5, help="single requests per path timed for TTFT (default 5)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds per concurrency and path, alternating; the median is kept (default 3)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="the requests' temperature (default 0: greedy; 1 is OpenAI's default, sampled)")
    parser.add_argument("--json", default="", help="also write the report here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.weights:
        weights = Path(args.weights)
    else:
        from clearml_umem.tinymodels import ensure_tiny_models

        weights = ensure_tiny_models(args.models_dir)["tiny-llama"]
    concurrency = [int(n) for n in args.concurrency.split(",") if n.strip()]
    report = run_hot_path(weights, args.device, concurrency, args.tokens, args.runs, args.repeats,
                          temperature=args.temperature)
    print("\n".join(markdown(report)))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
