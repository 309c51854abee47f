"""What an operator sees of a running router, below HTTP: progress lines in a model's log, the
keep-alive timer, the processor named truthfully, the chunked copy's byte counts, log offsets
that add up, each engine's lines under its own logger, internal HTTP calls kept quiet."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from clearml_umem.engines.base import EngineContext
from clearml_umem.engines.start_gate import StartGate
from clearml_umem.engines.vllm_process import ProcessConfig, VLLMProcess
from clearml_umem.engines.weight_store import copy_in_chunks
from clearml_umem.log_setup import quiet_internal_http
from clearml_umem.model_logs import RouterModelLog, read_log_file
from clearml_umem.runtime import Runtime
from clearml_umem.spec import ModelSpec, spec_from_mapping
from clearml_umem.tiers import Tier
from tests.test_runtime import DEVICE_BUDGET, HOST_BUDGET, SIZE, GatedEngine, within


class ProgressEngine(GatedEngine):
    """A gated engine that says it is copying 1000 bytes, 400 of them done."""

    def progress(self) -> dict[str, Any] | None:
        if not self.moving:
            return None
        return {"stage": "copying to the device", "bytes_done": 400, "bytes_total": 1000, "percent": 40.0}


def runtime_with(tmp_path: Path, **kwargs: Any) -> tuple[Runtime, dict[str, ProgressEngine]]:
    engines: dict[str, ProgressEngine] = {}
    log: list[str] = []

    def build(spec: ModelSpec, ctx: EngineContext) -> ProgressEngine:
        engines[spec.name] = ProgressEngine(spec, log)
        return engines[spec.name]

    runtime = Runtime(DEVICE_BUDGET, HOST_BUDGET, EngineContext(work_dir=tmp_path, device="cpu"),
                      engine_factory=build, **kwargs)
    runtime.add_model(spec_from_mapping({"name": "m", "weights": str(tmp_path), "size_bytes": SIZE}))
    return runtime, engines


def test_a_long_moves_progress_lines_are_in_the_models_log(tmp_path: Path) -> None:
    model_log = RouterModelLog()
    package = logging.getLogger("clearml_umem")
    package.addHandler(model_log)
    old_level = package.level
    package.setLevel(logging.INFO)

    async def scenario() -> None:
        runtime, engines = runtime_with(tmp_path, progress_period_s=0.01)
        placing = asyncio.get_running_loop().create_task(runtime.place("m", Tier.GPU))
        gate = await engines["m"].next_gate(Tier.COLD, Tier.GPU)
        while "copying" not in model_log.read("m", None)["text"]:
            await asyncio.sleep(0.01)
        row = next(r for r in runtime.admin_view() if r["name"] == "m")
        assert row["move"]["stage"] == "copying to the device" and row["device_bytes"] == SIZE, \
            "mid-move the row shows its stage and the memory the move reserves"
        gate.open()
        await within(placing)

    try:
        asyncio.run(within(scenario(), timeout=10))
    finally:
        package.removeHandler(model_log)
        package.setLevel(old_level)
    text = model_log.read("m", None)["text"]
    assert "model m: cold -> gpu, " in text and ": copying to the device 400 B of 1.00 KB (40%)" in text, text
    assert "model m: cold -> gpu in " in text


def test_the_keep_alive_timer_moves_an_unused_model_down(tmp_path: Path) -> None:
    async def lease_first(runtime: Runtime) -> None:
        async with runtime.lease("m", "r1"):
            pass

    async def scenario_with_lease() -> None:
        runtime, engines = runtime_with(tmp_path, keep_alive_s=0.5)
        timer = asyncio.get_running_loop().create_task(runtime.expire_idle(period_s=0.01))
        request = asyncio.get_running_loop().create_task(lease_first(runtime))
        (await engines["m"].next_gate(Tier.COLD, Tier.GPU)).open()
        await within(request)
        row = next(r for r in runtime.admin_view() if r["name"] == "m")
        assert row["processor"] == "100% CPU", "a CPU-only machine's top tier is not called a GPU"
        assert row["keep_alive_s"] == 0.5 and row["expires_at"] is not None
        gate = await engines["m"].next_gate(Tier.GPU, Tier.RAM)
        gate.open()
        (await engines["m"].next_gate(Tier.RAM, Tier.DISK)).open()
        while runtime.state("m").tier is not Tier.DISK:
            await asyncio.sleep(0.01)
        assert next(r for r in runtime.admin_view() if r["name"] == "m")["processor"] is None
        timer.cancel()

    asyncio.run(within(scenario_with_lease(), timeout=10))


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_a_chunked_copy_reports_every_byte_and_copies_them_all(chunk: int) -> None:
    src = torch.randint(0, 255, (1000,), dtype=torch.uint8)
    dst = torch.zeros(1000, dtype=torch.uint8)
    seen: list[int] = []
    copy_in_chunks(dst, src, on_bytes=seen.append, chunk=chunk)
    assert torch.equal(dst, src) and sum(seen) == 1000 and len(seen) == -(-1000 // chunk)
    with pytest.raises(ValueError):
        copy_in_chunks(torch.zeros(10, dtype=torch.uint8), src)


def test_router_log_offsets_count_the_lines_returned() -> None:
    log = RouterModelLog(kept=3)
    logger = logging.getLogger("clearml_umem.test_operator_view")
    logger.addHandler(log)
    logger.setLevel(logging.INFO)
    try:
        for i in range(2):
            logger.info("model %s: line %d", "a", i)
            logger.info("model %s: other %d", "b", i)
        first = log.read("a", None)
        assert (first["offset"], first["next_offset"], first["text"].count("\n")) == (0, 2, 2)
        for i in range(2, 6):
            logger.info("model %s: line %d", "a", i)
        later = log.read("a", first["next_offset"])
        # lines 3..6 were logged, 3 are kept: the answer starts after line 3 and says so
        assert (later["offset"], later["next_offset"], later["text"].count("\n")) == (3, 6, 3)
        assert log.read("a", 6)["text"] == "" and log.read("a", 6)["next_offset"] == 6
        assert log.read("a", 99)["next_offset"] == 6, "a follower from before a restart starts over"
    finally:
        logger.removeHandler(log)


def test_log_file_reads_return_whole_lines_and_their_byte_count(tmp_path: Path) -> None:
    path = tmp_path / "engine.log"
    path.write_bytes("first line\nsecond — line\nhalf a li".encode())
    read = read_log_file(path, 0)
    assert read["text"] == "first line\nsecond — line\n"
    assert read["next_offset"] - read["offset"] == len(read["text"].encode())
    with path.open("ab") as fh:
        fh.write(b"ne\n")
    rest = read_log_file(path, read["next_offset"])
    assert rest["text"] == "half a line\n" and rest["next_offset"] == path.stat().st_size


def test_each_engine_process_logs_under_its_engines_name(tmp_path: Path) -> None:
    def config(label: str) -> ProcessConfig:
        return ProcessConfig(name="m", log_file=tmp_path / "x.log", command=lambda _: [], environment=dict,
                             label=label)

    gate = StartGate("cpu")
    assert VLLMProcess(config("llama-server"), gate)._log.name == "clearml_umem.engines.llamacpp_engine.process"
    assert VLLMProcess(config("vLLM"), gate)._log.name == "clearml_umem.engines.vllm_engine.process"


def test_internal_http_calls_are_logged_only_when_debugging() -> None:
    httpx_log = logging.getLogger("httpx")
    before = httpx_log.level
    try:
        quiet_internal_http("info")
        assert not httpx_log.isEnabledFor(logging.INFO)
        quiet_internal_http("debug")
        assert httpx_log.isEnabledFor(logging.INFO)
    finally:
        httpx_log.setLevel(before)


def test_ps_shows_a_moves_stage_and_who_holds_the_memory() -> None:
    from datetime import datetime, timedelta, timezone

    from clearml_umem.ops_cli import format_ps

    soon = (datetime.now(timezone.utc) + timedelta(seconds=60)).isoformat()
    rows = [{"name": "big", "tier": "cold", "moving_to": "gpu", "in_flight": 0, "waiting": 1,
             "size_bytes": 2_170_000_000,
             "device_bytes": 2_490_000_000, "host_bytes": 0, "engine": "transformers", "context_length": 4096,
             "processor": None, "keep_alive_s": None, "expires_at": None, "moves": 0, "last_used": None,
             "move": {"src": "cold", "dst": "gpu", "elapsed_s": 17.2, "stage": "copying to the device",
                      "percent": 45.0}},
            {"name": "small", "tier": "gpu", "moving_to": None, "in_flight": 0, "waiting": 0, "size_bytes": 5_000_000,
             "device_bytes": 5_700_000, "host_bytes": 5_000_000, "engine": "llamacpp", "context_length": 2048,
             "processor": "100% GPU", "keep_alive_s": 300.0, "expires_at": soon, "moves": 1, "last_used": None,
             "move": None}]
    text = format_ps({"data": rows, "device": "cuda", "memory": {"device_used": 2_495_700_000,
                                                               "device_budget": 2_600_000_000,
                                                               "host_used": 5_000_000, "host_budget": 10**10}})
    big, small = (line for line in text.splitlines() if line.startswith(("big ", "small ")))
    assert "-> gpu 17s copying to the device 45%" in big and "2.49 GB" in big, "stage, and the memory the move holds"
    assert "100% GPU" in small and re.search(r" in (59|60) s ", small), small
    assert text.splitlines()[-1] == "device (cuda) 2.50 GB of 2.60 GB, host 5.00 MB of 10.0 GB"
