"""llama.cpp slots: concurrent requests with one server slot against the engine's default, in one run.

The llamacpp engine runs llama-server with `parallel` slots (`-np`, each with the whole served
context), and the router lets that many requests in at once. With one slot llama-server
queues them and decodes one at a time; with several it decodes them in one batch. This
drives the real `LlamaCppEngine` (one GGUF model, random weights, written locally) with N
concurrent greedy requests of a fixed length, for each slot count in turn, and reports the
wall time of the whole burst; ratios are to one slot, from the same run.

    python benchmarks/llamacpp_slots.py                    # about 20 s on 2 cores
    python benchmarks/llamacpp_slots.py --device cuda --hidden 2048 --layers 16
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from clearml_umem.engines.base import EngineContext, GenerationRequest
from clearml_umem.engines.llama_server import find_llama_server
from clearml_umem.engines.llamacpp_engine import DEFAULT_PARALLEL, LlamaCppEngine
from clearml_umem.spec import spec_from_mapping
from clearml_umem.tiers import Tier
from clearml_umem.tinygguf import TinyGGUF, write_tiny_gguf
from clearml_umem.units import fmt_median_of


async def one_request(engine: LlamaCppEngine, i: int, tokens: int) -> int:
    request = GenerationRequest(prompt=f"the tier {i} model", max_tokens=tokens, temperature=0.0,
                                options={"ignore_eos": True})
    produced = 0
    async for delta in engine.generate(request):
        if delta.completion_tokens is not None:
            produced = delta.completion_tokens
    return produced


async def burst_seconds(args: argparse.Namespace, model: Path, work: Path, slots: int) -> list[float]:
    spec = spec_from_mapping({"name": f"slots-{slots}", "weights": str(model)})
    ctx = EngineContext(work_dir=work, device=args.device,
                        options={"llama_server": args.llama_server, "max_context": 512, "parallel": slots})
    engine = LlamaCppEngine(spec, ctx)
    try:
        await engine.move(Tier.COLD, Tier.GPU)
        await one_request(engine, 0, 4)
        seconds = []
        for _ in range(args.runs):
            started = time.perf_counter()
            produced = await asyncio.gather(*(one_request(engine, i, args.tokens) for i in range(args.requests)))
            seconds.append(time.perf_counter() - started)
            if min(produced) != args.tokens:
                raise RuntimeError(f"asked for {args.tokens} tokens, got {produced}")
        return seconds
    finally:
        await engine.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", default=None, help="the binary (default: as the router finds it)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=DEFAULT_PARALLEL, help="concurrent requests per burst")
    parser.add_argument("--tokens", type=int, default=128, help="tokens each request generates")
    parser.add_argument("--runs", type=int, default=3, help="bursts per slot count; the median is reported")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args(argv)
    args.llama_server = find_llama_server(args.llama_server)
    if not args.llama_server:
        print("no llama-server: run scripts/install-llama-server.sh or pass --llama-server", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="umem-slots-") as tmp:
        work = Path(tmp)
        model = write_tiny_gguf(work / "m.gguf", TinyGGUF("m", "q8_0", hidden_size=args.hidden,
                                                          num_layers=args.layers, num_heads=8, num_kv_heads=4,
                                                          intermediate_size=3 * args.hidden, context_length=2048))
        results = {slots: statistics.median(asyncio.run(burst_seconds(args, model, work, slots)))
                   for slots in sorted({1, DEFAULT_PARALLEL})}
    base = results[1]
    print(f"{args.requests} concurrent requests x {args.tokens} tokens, {fmt_median_of(args.runs)} "
          f"({args.device}, hidden {args.hidden}, {args.layers} layers)")
    print(f"{'slots':>5}  {'burst (s)':>9}  {'x 1 slot':>8}")
    for slots, seconds in results.items():
        print(f"{slots:>5}  {seconds:>9.3f}  {seconds / base:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
