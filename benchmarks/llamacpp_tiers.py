"""llama.cpp tiers: swap-in from RAM against a cold start and a disk reload of the same model, in one run.

One GGUF model (random weights, written locally; `--hidden`/`--layers` size it, about 1 GB
in f16 by default) is driven through the real `LlamaCppEngine` and a real `llama-server`:
each run moves it to the GPU tier from one source tier and streams one greedy token, and
the time to that first token is taken from the start of the move. Sources, each run in
turn so that machine noise hits all of them alike:

- ram: the router held the file mapped and locked; the server starts from those pages.
- disk: the file was dropped from the page cache (`posix_fadvise(DONTNEED)`); the server
  reads it from disk.
- cold: as disk, plus a new engine (its GGUF header read and checked) as after a restart.
- page cache: the disk tier where the kernel happened to keep the file cached (no drop):
  what the RAM tier guarantees, shown for reference.
- gpu (hot): the same request to the running server, for reference: the forward pass alone.

Ratios are to the RAM tier's median from the same run. On a CPU the "GPU" is the CPU, so the
start maps pages rather than copying them to a device; the ratio is then what the RAM tier
saves in reading the disk. Needs llama-server (scripts/install-llama-server.sh) and the
`gguf` package.

    python benchmarks/llamacpp_tiers.py                 # about a minute on 2 cores
    python benchmarks/llamacpp_tiers.py --runs 5 --hidden 2048 --layers 8 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from clearml_umem.engines.base import EngineContext, GenerationRequest
from clearml_umem.engines.llama_server import find_llama_server
from clearml_umem.engines.llamacpp_engine import LlamaCppEngine
from clearml_umem.engines.resident_file import cached_bytes, drop_from_page_cache
from clearml_umem.spec import spec_from_mapping
from clearml_umem.tiers import Tier
from clearml_umem.tinygguf import TinyGGUF, write_tiny_gguf
from clearml_umem.units import fmt_bytes, fmt_median_of

SOURCES = ("ram", "page cache", "disk", "cold")


async def first_token_s(engine: LlamaCppEngine, src: Tier, started: float) -> float:
    await engine.move(src, Tier.GPU)
    request = GenerationRequest(prompt="once upon a time", max_tokens=1, temperature=0.0)
    async for _ in engine.generate(request):
        return time.monotonic() - started
    raise RuntimeError("no token")


async def run(args: argparse.Namespace, model: Path, work: Path) -> dict[str, list[float]]:
    spec = spec_from_mapping({"name": "bench", "weights": str(model)})
    ctx = EngineContext(work_dir=work, device=args.device,
                        options={"llama_server": args.llama_server, "max_context": 512})
    engine = LlamaCppEngine(spec, ctx)
    times: dict[str, list[float]] = {s: [] for s in (*SOURCES, "hot")}
    resident: dict[str, list[float]] = {s: [] for s in SOURCES}
    locked: list[bool] = []
    try:
        await engine.move(Tier.COLD, Tier.GPU)  # warm-up: the first start of a binary is slower
        await engine.move(Tier.GPU, Tier.COLD)
        for _ in range(args.runs):
            for source in SOURCES:
                if source == "ram":
                    await engine.move(Tier.COLD, Tier.RAM)
                    locked.append(bool(engine.describe()["ram_tier"]["locked"]))
                    src = Tier.RAM
                elif source == "page cache":
                    await engine.move(Tier.COLD, Tier.DISK)
                    await asyncio.to_thread(model.read_bytes)  # cached, as a recent use would leave it
                    src = Tier.DISK
                elif source == "disk":
                    await engine.move(Tier.COLD, Tier.DISK)
                    drop_from_page_cache(model)
                    src = Tier.DISK
                else:
                    drop_from_page_cache(model)
                    src = Tier.COLD
                resident[source].append((cached_bytes(model) or 0) / model.stat().st_size)
                started = time.monotonic()
                if source == "cold":
                    await engine.close()
                    engine = LlamaCppEngine(spec_from_mapping({"name": "bench", "weights": str(model)}), ctx)
                times[source].append(await first_token_s(engine, src, started))
                started = time.monotonic()
                times["hot"].append(await first_token_s(engine, Tier.GPU, started))
                await engine.move(Tier.GPU, Tier.COLD)
    finally:
        await engine.close()
    times["_resident"] = [statistics.median(resident[s]) for s in SOURCES]
    times["_hold"] = [float(all(locked))]
    return times


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--quantization", default="f16", choices=("f16", "q8_0"))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--llama-server", default=None, help="binary (default: UMEM_LLAMA_SERVER, PATH, install cache)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    args = p.parse_args(argv)
    args.llama_server = args.llama_server or find_llama_server()
    if not args.llama_server:
        print("llamacpp_tiers: no llama-server; run scripts/install-llama-server.sh", file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="umem-llamacpp-bench-"))
    shape = TinyGGUF("bench", args.quantization, hidden_size=args.hidden, num_layers=args.layers,
                     num_heads=max(1, args.hidden // 64), num_kv_heads=max(1, args.hidden // 256),
                     intermediate_size=4 * args.hidden, context_length=2048, seed=5)
    model = work / f"bench-{args.hidden}x{args.layers}-{args.quantization}.gguf"
    if not model.is_file():
        write_tiny_gguf(model, shape)
    size = model.stat().st_size
    times = asyncio.run(run(args, model, work))
    ram = statistics.median(times["ram"])
    print(f"llama.cpp swap-in to {args.device} by source tier: {fmt_bytes(size)} GGUF ({args.quantization}), "
          f"time to the first token from the start of the move ({fmt_median_of(args.runs)})")
    print(f"{'source':12s} {'median ms':>10s} {'min ms':>9s} {'x RAM':>7s} {'GB/s':>7s} {'cached before':>14s}")
    for source, cached in zip(SOURCES, times["_resident"], strict=True):
        med = statistics.median(times[source])
        print(f"{source:12s} {med * 1000:10.1f} {min(times[source]) * 1000:9.1f} {med / ram:7.2f} "
              f"{size / med / 1e9:7.2f} {cached * 100:13.0f}%")
    hot = statistics.median(times["hot"])
    print(f"{'gpu (hot)':12s} {hot * 1000:10.1f} {min(times['hot']) * 1000:9.1f} {hot / ram:7.2f} {'-':>7s} "
          f"{'(a running server: the forward pass alone)':>14s}")
    print(f"RAM tier held the file {'locked (mlock)' if times['_hold'][0] else 'mapped and touched (no mlock)'}; "
          f"ratios are to the RAM tier of the same run")
    if args.json:
        print(json.dumps({k: v for k, v in times.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
