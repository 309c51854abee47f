"""What the OpenAI decoding options cost per token on the transformers engine, in one run.

Drives the real `TransformersEngine` (one tiny model, random weights, built locally) with
greedy chat requests of a fixed length: plain, then with logprobs (top 5), penalties and
logit_bias, and a json_schema (constrained decoding with llguidance). Reports the median
seconds per generated token of each and its ratio to plain, measured in the same run. Plain
requests build no logits processor, so "plain" is the engine's decoding loop as it was.

    python benchmarks/decoding_options.py            # about 30 s on 2 cores
    python benchmarks/decoding_options.py --device cuda --rounds 5
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
from typing import Any

from clearml_umem.engines.base import EngineContext, GenerationRequest
from clearml_umem.engines.transformers_engine import TransformersEngine
from clearml_umem.spec import spec_from_mapping
from clearml_umem.tiers import Tier
from clearml_umem.tinymodels import TinyModel, build_tiny_model

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}}},
          "required": ["items"], "additionalProperties": False}
CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "logprobs (top 5)": {"logprobs": True, "top_logprobs": 5},
    "penalties + logit_bias": {"frequency_penalty": 0.5, "presence_penalty": 0.5, "logit_bias": {"65": 5}},
    "json_schema (llguidance)": {"response_format": {"type": "json_schema",
                                                     "json_schema": {"name": "s", "schema": SCHEMA}}},
}


async def per_token(engine: TransformersEngine, options: dict[str, Any], tokens: int) -> float:
    request = GenerationRequest(messages=[{"role": "user", "content": "List the tiers."}], max_tokens=tokens,
                                temperature=0.0, options=options)
    produced = 0
    start = time.perf_counter()
    async for delta in engine.generate(request):
        if delta.completion_tokens is not None:
            produced = delta.completion_tokens
    return (time.perf_counter() - start) / max(1, produced)


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp) / "m", TinyModel("bench", "llama", hidden_size=args.hidden,
                                                           num_layers=args.layers))
        engine = TransformersEngine(spec_from_mapping({"name": "bench", "weights": str(path)}),
                                    EngineContext(work_dir=Path(tmp), device=args.device))
        await engine.move(Tier.COLD, Tier.GPU)
        try:
            for options in CASES.values():  # warm-up: first-use costs (llguidance's tokenizer view)
                await per_token(engine, options, 4)
            times: dict[str, list[float]] = {name: [] for name in CASES}
            for _ in range(args.rounds):
                for name, options in CASES.items():  # interleaved, so drift hits every case alike
                    times[name].append(await per_token(engine, options, args.tokens))
        finally:
            await engine.close()
    base = statistics.median(times["plain"])
    print(f"{'case':28} {'ms/token':>9} {'x plain':>8}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:28} {median * 1e3:9.2f} {median / base:8.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
