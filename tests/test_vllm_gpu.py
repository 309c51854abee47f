"""vLLM's sleep mode on a CUDA GPU: the round trips the ram and disk tiers rest on.

Run where vLLM (the CUDA build) is installed and a GPU is present:
`pytest -m "vllm and gpu" tests/test_vllm_gpu.py -s`. It skips, saying why, elsewhere. It has
not run in this project's sessions: the GPU machines lent here cannot hold vLLM (see the
README's vLLM section).

What it checks: greedy output identical before and after a level 1 (ram) and a level 2
(disk) round trip; the device memory a sleeping engine keeps, read from NVML, below what it
holds awake; and it prints the swap-in speed next to a host-to-device probe from the same
run (a ratio, not an assertion: speed belongs in benchmarks).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from clearml_umem.engines import EngineContext, GenerationRequest
from clearml_umem.engines.vllm_engine import VLLMEngine
from clearml_umem.spec import spec_from_mapping
from clearml_umem.tiers import Tier
from clearml_umem.tinymodels import TinyModel, ensure_tiny_models
from tests.vllm_env import find_vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.gpu, pytest.mark.slow]

# big enough that a swap moves real bytes (about 0.5 GB in bf16), small enough to build in seconds
GPU_MODEL = TinyModel("vllm-gpu-llama", "llama", hidden_size=2048, num_layers=8, num_heads=16, num_kv_heads=8,
                      intermediate_size=5632, seed=31)
PROMPT = [{"role": "user", "content": "Tell me about tiers."}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    python, why = find_vllm_python()
    if python is None:
        pytest.skip(why)
    cache = os.environ.get("UMEM_TEST_MODELS")
    root = Path(cache) if cache else tmp_path_factory.mktemp("vllm-gpu-models")
    return python, ensure_tiny_models(root, (GPU_MODEL,))[GPU_MODEL.name]


async def greedy(engine: VLLMEngine) -> str:
    deltas = [d async for d in engine.generate(GenerationRequest(messages=PROMPT, max_tokens=16, temperature=0.0))]
    return "".join(d.text for d in deltas)


def test_sleep_round_trips_keep_greedy_output(setup: tuple[str, Path], tmp_path: Path) -> None:
    from clearml_umem.bandwidth import probe_bandwidth

    python, weights = setup
    spec = spec_from_mapping({"name": GPU_MODEL.name, "weights": str(weights), "engine": "vllm", "dtype": "bfloat16"})
    engine = VLLMEngine(spec, EngineContext(work_dir=tmp_path, device="cuda", device_budget_bytes=8 * 2**30,
                                            options={"vllm_python": python}))
    assert engine.sleep_mode and engine.tiers == frozenset(Tier)
    probe = probe_bandwidth("cuda", spec.size_bytes)
    timings: dict[str, float] = {}

    async def scenario() -> None:
        await engine.move(Tier.COLD, Tier.GPU)
        before = await greedy(engine)
        assert before
        for level_tier in (Tier.RAM, Tier.DISK):
            await engine.move(Tier.GPU, level_tier)
            assert await engine.is_sleeping()
            started = time.perf_counter()
            await engine.move(level_tier, Tier.GPU)
            timings[f"{level_tier.value}->gpu s"] = time.perf_counter() - started
            assert not await engine.is_sleeping()
            assert await greedy(engine) == before, f"greedy output changed across a {level_tier.value} round trip"
        measured = engine.describe()["measured_device_bytes"]
        if measured:  # NVML sees the engine's processes (not behind another PID namespace)
            assert measured.get("ram", 0) > 0, measured
            assert all(measured[t] < measured["gpu"] for t in ("ram", "disk") if t in measured), measured
        await engine.close()

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(engine.close())
    move_gbps = spec.size_bytes / timings["ram->gpu s"] / 1e9
    print(f"\nvLLM sleep mode on {probe.path}: weights {spec.size_bytes / 1e9:.2f} GB; "
          f"probe {probe.gbps:.1f} GB/s; wake from ram {timings['ram->gpu s']:.3f} s ({move_gbps:.1f} GB/s, "
          f"{move_gbps / probe.gbps:.2f} of the probe); wake from disk {timings['disk->gpu s']:.3f} s; "
          f"measured device bytes {engine.describe()['measured_device_bytes']}")
