"""Progress of long moves: bytes counted as weights land, shown in the admin view and logged while the move runs."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clearml_umem.engines.overlapped_read import read_checkpoint
from clearml_umem.engines.progress import MoveProgress, describe_progress, last_log_line
from clearml_umem.engines.weight_store import READ_CHUNK, FlatLayout
from clearml_umem.tiers import Tier
from tests.test_runtime import World, run, within


def test_read_checkpoint_reports_every_byte_it_reads_from_its_threads(tmp_path: Path) -> None:
    # bigger than one read chunk, so several pieces land from several threads; one tensor needs a conversion
    big = torch.zeros(READ_CHUNK // 2 + 1000, 3, dtype=torch.float16)
    save_file({"big": big, "small": torch.ones(7, dtype=torch.float32)}, tmp_path / "w.safetensors")
    layout = FlatLayout.of({"big": (big.shape, torch.float16), "small": (torch.Size([7]), torch.float16)})
    seen: list[tuple[int, str]] = []
    lock = threading.Lock()

    def on_bytes(n: int) -> None:
        with lock:
            seen.append((n, threading.current_thread().name))

    flat = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    assert read_checkpoint([tmp_path / "w.safetensors"], layout, flat, on_bytes=on_bytes) == layout.param_bytes
    assert sum(n for n, _ in seen) == layout.param_bytes
    assert len(seen) >= 3 and any(name.startswith("umem-read") for _, name in seen)


def test_progress_counts_a_stage_and_says_it_in_one_line() -> None:
    progress = MoveProgress()
    assert progress.snapshot() is None, "no move, no progress"
    progress.begin()
    progress.stage("reading weights", 16 * 10**9)
    progress.add(4 * 10**9)
    snap = progress.snapshot()
    assert snap is not None
    assert (snap["stage"], snap["bytes_done"], snap["bytes_total"], snap["percent"]) == \
        ("reading weights", 4 * 10**9, 16 * 10**9, 25.0)
    assert describe_progress("cold", "gpu", 12.0, snap) == \
        "cold -> gpu, 12.0 s: reading weights 4.00 GB of 16.0 GB (25%)"
    assert describe_progress("cold", "gpu", 3.0, None) == "cold -> gpu, 3.0 s so far"
    progress.end()
    assert progress.snapshot() is None


def test_last_log_line_is_the_engines_latest_stage(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    log.write_text("starting\nLoading weights took 3.1 s\n\n")
    assert last_log_line(log) == "Loading weights took 3.1 s"
    assert last_log_line(tmp_path / "missing.log") is None


def test_a_move_under_way_shows_its_progress_in_the_admin_view_and_logs_it(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="clearml_umem.runtime")

    async def scenario() -> None:
        world = World(tmp_path, "big")
        world.runtime.progress_period_s = 0.01
        engine = world.engines["big"]
        progress = MoveProgress()
        engine.progress = progress.snapshot  # type: ignore[attr-defined]
        placing = asyncio.get_running_loop().create_task(world.runtime.place("big", Tier.GPU))
        gate = await engine.next_gate(Tier.COLD, Tier.GPU)
        progress.begin()
        progress.stage("reading weights", 16 * 10**9)
        progress.add(4 * 10**9)
        move = world.runtime.admin_view()[0]["move"]
        assert (move["src"], move["dst"], move["stage"], move["percent"]) == ("cold", "gpu", "reading weights", 25.0)

        async def logged() -> None:
            while not any("reading weights 4.00 GB of 16.0 GB (25%)" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.01)

        await within(logged())
        progress.end()
        gate.open()
        await within(placing)
        row = world.runtime.admin_view()[0]
        assert row["move"] is None and row["moves"] == 1 and row["tier"] == "gpu"

    run(scenario)


class RecordingProgress(MoveProgress):
    """Keeps the bytes each stage reached, as a move ends it."""

    def __init__(self) -> None:
        super().__init__()
        self.reached: list[tuple[str, int, int]] = []

    def stage(self, name: str, total_bytes: int = 0) -> None:
        self._keep()
        super().stage(name, total_bytes)

    def end(self) -> None:
        self._keep()
        super().end()

    def _keep(self) -> None:
        snap = self.snapshot()
        if snap is not None and snap["stage"]:
            self.reached.append((snap["stage"], snap["bytes_done"], snap["bytes_total"] or 0))


def test_the_transformers_engine_counts_its_stages_on_a_real_model(tiny_models: dict[str, Path]) -> None:
    from clearml_umem.engines import EngineContext, create_engine
    from clearml_umem.spec import spec_from_mapping

    engine = create_engine(spec_from_mapping({"name": "tiny", "weights": str(tiny_models["tiny-llama"])}),
                           EngineContext(work_dir=tiny_models["tiny-llama"].parent, device="cpu",
                                         options={"host_copy": "evict"}))
    recording = RecordingProgress()
    engine._progress = recording  # type: ignore[attr-defined]

    async def moves() -> None:
        await engine.move(Tier.COLD, Tier.RAM)
        await engine.move(Tier.RAM, Tier.GPU)
        await engine.close()

    asyncio.run(moves())
    weights = engine.weight_bytes
    stages = {name: (done, total) for name, done, total in recording.reached}
    assert stages["reading weights"] == (weights, weights), recording.reached
    assert stages["copying to the device"] == (weights, weights), recording.reached
    assert "building the model" in stages
    assert engine.progress() is None, "no move, no progress"  # type: ignore[attr-defined]
