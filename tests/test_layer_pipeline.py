"""Pipelined swap-in (engines/layer_pipeline.py) on the CPU: the copy thread plays the copy stream.

A gated copier (the test decides when each chunk lands) checks the ordering: a layer's forward
never starts before its own chunk landed, and the first layer runs while the last chunk is
still held back. Answers must equal the sequential path's; a swap-out or close while chunks
are in flight waits for them; a failed copy is the generation's and the next move's error.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from clearml_umem.config import parse_serve_args
from clearml_umem.engines import create_engine, layer_pipeline
from clearml_umem.engines.base import EngineContext, EngineError, GenerationRequest
from clearml_umem.engines.layer_pipeline import decoder_layers, forward_order, plan_stages
from clearml_umem.engines.transformers_engine import TransformersEngine
from clearml_umem.engines.weight_store import FlatLayout
from clearml_umem.spec import spec_from_mapping
from clearml_umem.tiers import Tier

GREEDY = GenerationRequest(prompt="The quick brown fox", max_tokens=8, temperature=0.0)
WAIT_S = 30.0
"""Bound on every wait for another thread here; only a broken build ever waits that long."""


def make_engine(weights: Path, device: str = "cpu", **options: Any) -> TransformersEngine:
    spec = spec_from_mapping({"name": weights.name, "weights": str(weights)})
    engine = create_engine(spec, EngineContext(work_dir=weights.parent, device=device,
                                               options={"host_copy": "keep", **options}))
    assert isinstance(engine, TransformersEngine)
    return engine


async def answer(engine: TransformersEngine) -> str:
    return "".join([d.text async for d in engine.generate(GREEDY)])


class GatedCopier:
    """Replaces `layer_pipeline.copy_piece`: chunk i of a swap-in lands only once the test opened gate i."""

    def __init__(self, fail_at: int | None = None) -> None:
        self._lock = threading.Lock()
        self.reset(fail_at)

    def reset(self, fail_at: int | None = None) -> None:
        """Close every gate again, for the next swap-in."""
        with self._lock:
            self._gates: dict[int, threading.Event] = {}
            self._open_below = 0
        self.landed = self._calls = 0
        self._fail_at = fail_at

    def _gate(self, i: int) -> threading.Event:
        with self._lock:
            gate = self._gates.setdefault(i, threading.Event())
            if i < self._open_below:
                gate.set()
            return gate

    def __call__(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        i = self._calls
        self._calls += 1
        if not self._gate(i).wait(WAIT_S):
            raise TimeoutError(f"gate {i} never opened")
        if i == self._fail_at:
            raise RuntimeError(f"DMA error on chunk {i}")
        dst.copy_(src)
        self.landed = i + 1

    def open(self, upto: int | None = None) -> None:
        """Open the gates of chunks 0 .. upto - 1 (all of them by default), now or when they come."""
        with self._lock:
            self._open_below = 10**9 if upto is None else upto
            for i, gate in self._gates.items():
                if i < self._open_below:
                    gate.set()


@pytest.fixture(scope="module")
def llama_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["tiny-llama"]


@pytest.fixture
def in_ram(llama_dir: Path) -> Iterator[TransformersEngine]:
    engine = make_engine(llama_dir)
    asyncio.run(engine.move(Tier.COLD, Tier.RAM))
    yield engine
    asyncio.run(engine.close())


def gated(monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> GatedCopier:
    copier = GatedCopier(fail_at)
    monkeypatch.setattr(layer_pipeline, "copy_piece", copier)
    return copier


def chunks(engine: TransformersEngine) -> int:
    stages = plan_stages(engine.model, engine._layout)
    assert stages is not None
    return len(stages)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_greedy_answers_are_the_same_pipelined_and_sequential(tiny_models: dict[str, Path], name: str) -> None:
    engine = make_engine(tiny_models[name])

    async def scenario() -> tuple[str, str]:
        await engine.move(Tier.COLD, Tier.RAM)
        await engine.move(Tier.RAM, Tier.GPU)
        assert engine._landing is not None, "the pipelined path was taken"
        pipelined = await answer(engine)
        await engine.move(Tier.GPU, Tier.RAM)
        engine.pipelined_swap_in = False
        await engine.move(Tier.RAM, Tier.GPU)
        assert engine._landing is None
        sequential = await answer(engine)
        await engine.close()
        return pipelined, sequential

    pipelined, sequential = asyncio.run(scenario())
    assert pipelined == sequential and pipelined


def test_a_layer_runs_only_once_its_chunk_landed_and_the_first_before_the_last_chunk(
        in_ram: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = in_ram
    copier = gated(monkeypatch)
    layers = decoder_layers(engine.model)
    assert layers is not None and len(layers) >= 2
    seen: list[tuple[str, int]] = []
    first_layer_ran = threading.Event()

    def record(name: str) -> Any:
        def hook(*_: Any) -> None:
            seen.append((name, copier.landed))
            if name == "layer 0":
                first_layer_ran.set()
        return hook

    handles = [layer.register_forward_pre_hook(record(f"layer {k}")) for k, layer in enumerate(layers)]
    handles.append(engine.model.get_output_embeddings().register_forward_pre_hook(record("head")))

    async def scenario() -> tuple[str, int]:
        await engine.move(Tier.RAM, Tier.GPU)
        copier.open(2)  # the embeddings and layer 0 only
        task = asyncio.ensure_future(answer(engine))
        assert await asyncio.to_thread(first_layer_ran.wait, WAIT_S)
        landed_when_layer_0_ran = copier.landed
        copier.open()
        return await task, landed_when_layer_0_ran

    pipelined, landed_at_first = asyncio.run(scenario())
    for handle in handles:
        handle.remove()
    total = chunks(engine)
    assert landed_at_first == 2 < total, "layer 0 computed while the later chunks were still held back"
    for name, landed in seen:
        needed = total if name == "head" else int(name.split()[1]) + 2
        assert landed >= needed, f"{name} started with {landed} of the {needed} chunks it needs"
    assert seen[-1][0] == "head"
    assert engine._landing is not None and engine._landing.done
    assert not engine._landing._handles, "the hooks are removed once every chunk landed"
    monkeypatch.undo()
    asyncio.run(engine.move(Tier.GPU, Tier.RAM))
    engine.pipelined_swap_in = False
    asyncio.run(engine.move(Tier.RAM, Tier.GPU))
    assert asyncio.run(answer(engine)) == pipelined


@pytest.mark.parametrize("then", ["swap-out", "close"])
def test_swap_out_or_close_waits_for_the_copies_in_flight(in_ram: TransformersEngine,
                                                          monkeypatch: pytest.MonkeyPatch, then: str) -> None:
    engine = in_ram
    total = chunks(engine)
    copier = gated(monkeypatch)
    copier.open(1)

    async def scenario() -> None:
        await engine.move(Tier.RAM, Tier.GPU)
        assert engine.tier is Tier.GPU and copier.landed <= 1, "the move ended with chunks still in flight"
        task = asyncio.ensure_future(engine.move(Tier.GPU, Tier.RAM) if then == "swap-out" else engine.close())
        await asyncio.sleep(0.3)
        assert not task.done(), f"the {then} must wait for the copies"
        copier.open()
        await task

    try:
        asyncio.run(scenario())
    finally:
        copier.open()
    assert copier.landed == total
    assert engine.tier is (Tier.RAM if then == "swap-out" else Tier.COLD)
    assert not [t for t in threading.enumerate() if t.name.startswith("umem-swap-in-")]


def test_a_copy_that_does_not_end_is_a_bounded_wait(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(llama_dir, stall_timeout_s=0.3)
    asyncio.run(engine.move(Tier.COLD, Tier.RAM))
    copier = gated(monkeypatch)
    asyncio.run(engine.move(Tier.RAM, Tier.GPU))
    with pytest.raises(EngineError, match="did not end within"):
        asyncio.run(engine.move(Tier.GPU, Tier.RAM))
    copier.open()
    asyncio.run(engine.close())
    assert engine.tier is Tier.COLD


def test_a_failed_copy_is_the_generations_error_and_the_next_moves(in_ram: TransformersEngine,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    engine = in_ram
    copier = gated(monkeypatch, fail_at=2)
    copier.open()

    async def scenario() -> None:
        await engine.move(Tier.RAM, Tier.GPU)
        pipeline = engine._landing
        assert pipeline is not None
        with pytest.raises(EngineError, match="DMA error on chunk 2"):
            await asyncio.wrap_future(pipeline.landing)
        # the copy is over, failed: a forward that starts now still meets the error
        with pytest.raises(EngineError, match="DMA error on chunk 2"):
            await answer(engine)
        with pytest.raises(EngineError, match="swap-in to the device failed.*DMA error"):
            await engine.move(Tier.GPU, Tier.RAM)
        await engine.close()

    asyncio.run(scenario())
    assert engine.tier is Tier.COLD


def test_evict_mode_and_the_setting_off_copy_sequentially(llama_dir: Path) -> None:
    for options in ({"host_copy": "evict"}, {"pipelined_swap_in": False}, {"pipelined_swap_in": "0"}):
        engine = make_engine(llama_dir, **options)
        asyncio.run(engine.move(Tier.COLD, Tier.GPU))
        assert engine._landing is None and engine.describe()["swap_in"] == "sequential", options
        asyncio.run(engine.close())


def test_the_setting_comes_from_the_flag_or_the_environment(tmp_path: Path) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text('{"models": []}')
    assert parse_serve_args(["--manifest", str(manifest)], env={}).pipelined_swap_in is True
    assert parse_serve_args(["--manifest", str(manifest), "--no-pipelined-swap-in"], env={}).pipelined_swap_in is False
    off = parse_serve_args(["--manifest", str(manifest)], env={"UMEM_PIPELINED_SWAP_IN": "0"})
    assert off.pipelined_swap_in is False


class _Toy(torch.nn.Module):
    """Registers its head before its layers' input: forward order needs the stages sorted."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(8, 4)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
        self.head = torch.nn.Linear(4, 8)


def test_stages_follow_forward_order_and_a_scrambled_layout_is_refused() -> None:
    model = _Toy()
    params = dict(model.named_parameters())
    scrambled = FlatLayout.of({n: (params[n].shape, params[n].dtype) for n in reversed(params)})
    assert plan_stages(model, scrambled) is None
    layout = forward_order(model)
    stages = plan_stages(model, layout)
    assert stages is not None
    assert [s.name for s in stages] == ["embeddings", "layer 0", "layer 1", "layer 2", "head"]
    assert stages[0].start == 0 and stages[-1].end == layout.total_bytes
    assert all(a.end == b.start for a, b in zip(stages, stages[1:], strict=False))
    assert stages[-1].after == (model.layers[2],) and model.head in stages[-1].modules


def test_the_scheduler_dispatches_at_once_and_reports_the_swap_when_the_weights_landed() -> None:
    from clearml_umem.events import MoveFinished
    from clearml_umem.scheduler import Dispatch, Move, Scheduler
    from tests.sched_harness import GB, footprints

    clock = [0.0]
    events: list[Any] = []
    sched = Scheduler(8 * GB, 100 * GB, clock=lambda: clock[0], emit=events.append)
    sched.add_model("a", footprints(4 * GB), list(Tier))
    assert sched.place("a", Tier.RAM, "p1") == [Move("a", Tier.COLD, Tier.RAM)]
    sched.on_move_done("a", Tier.COLD, Tier.RAM, 1.0, 4 * GB)
    assert sched.on_request("a", "a1") == [Move("a", Tier.RAM, Tier.GPU)]
    assert sched.on_move_done("a", Tier.RAM, Tier.GPU, 0.002, 4 * GB, landing=True) == [Dispatch("a", "a1", Tier.RAM)]
    finished = [e for e in events if isinstance(e, MoveFinished)]
    assert [(e.src, e.dst) for e in finished] == [(Tier.COLD, Tier.RAM)], "the swap-in is reported once landed"
    assert Tier.RAM not in sched._models["a"].swap_in_seconds
    clock[0] = 0.4
    assert sched.on_move_landed("a", Tier.RAM, 0.4, 4 * GB) == []
    landed = [e for e in events if isinstance(e, MoveFinished)][-1]
    assert (landed.src, landed.dst, landed.seconds, landed.bytes_moved) == (Tier.RAM, Tier.GPU, 0.4, 4 * GB)
    assert sched._models["a"].swap_in_seconds[Tier.RAM] == 0.4
    assert sched._models["a"].turn is not None and sched._models["a"].turn.until == 0.8, \
        "the turn is earned by the copy's time"
    assert sched.on_move_landed("gone", Tier.RAM, 0.1, 1) == []


def test_through_the_runtime_a_request_runs_while_the_weights_arrive(llama_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from clearml_umem.events import MoveFinished
    from clearml_umem.runtime import Runtime

    copier = gated(monkeypatch)
    runtime = Runtime(2**30, 2**30, EngineContext(work_dir=llama_dir.parent, device="cpu",
                                                  options={"host_copy": "keep"}))
    events: list[Any] = []
    runtime.bus.subscribe(events.append)
    runtime.add_model(spec_from_mapping({"name": "m", "weights": str(llama_dir)}))

    def swap_ins() -> list[MoveFinished]:
        return [e for e in events if isinstance(e, MoveFinished) and e.dst is Tier.GPU]

    async def scenario() -> str:
        copier.open()  # the load from disk: every chunk of that swap-in lands at once
        await runtime.place("m", Tier.GPU)
        await runtime.place("m", Tier.RAM)
        copier.reset()
        before = len(swap_ins())
        async with runtime.lease("m", "r1") as lease:
            assert copier.landed == 0, "the request was dispatched before any chunk landed"
            assert len(swap_ins()) == before, "the swap-in is not reported before its weights landed"
            copier.open()
            text = "".join([d.text async for d in lease.engine.generate(GREEDY)])
        for _ in range(int(WAIT_S / 0.05)):
            if len(swap_ins()) > before:
                break
            await asyncio.sleep(0.05)
        await runtime.close()
        return text

    try:
        text = asyncio.run(scenario())
    finally:
        copier.open()
    swap = swap_ins()[-1]
    assert swap.src is Tier.RAM and swap.bytes_moved > 0 and swap.seconds > 0
    assert text



def test_through_the_runtime_a_failed_copy_fails_the_request_and_the_model_goes_cold(
        llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clearml_umem.events import EngineLost
    from clearml_umem.runtime import Runtime

    copier = gated(monkeypatch)
    runtime = Runtime(2**30, 2**30, EngineContext(work_dir=llama_dir.parent, device="cpu",
                                                  options={"host_copy": "keep"}))
    events: list[Any] = []
    runtime.bus.subscribe(events.append)
    runtime.add_model(spec_from_mapping({"name": "m", "weights": str(llama_dir)}))

    async def scenario() -> Tier:
        copier.open()
        await runtime.place("m", Tier.GPU)
        await runtime.place("m", Tier.RAM)
        copier.reset(fail_at=2)
        async with runtime.lease("m", "r1") as lease:
            copier.open()
            with pytest.raises(EngineError, match="DMA error on chunk 2"):
                await answer(lease.engine)
        for _ in range(int(WAIT_S / 0.05)):
            if runtime.scheduler.state("m").tier is Tier.COLD:
                break
            await asyncio.sleep(0.05)
        tier = runtime.scheduler.state("m").tier
        await runtime.close()
        return tier

    try:
        assert asyncio.run(scenario()) is Tier.COLD, "a model whose copy failed is closed, to reload when asked"
    finally:
        copier.open()
    assert any(isinstance(e, EngineLost) and "copy" in e.reason for e in events)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_cuda_pipelined_swap_in_answers_like_the_sequential_one(tiny_models: dict[str, Path], name: str) -> None:
    engine = make_engine(tiny_models[name], device="cuda")

    async def scenario() -> tuple[str, str, float]:
        await engine.move(Tier.COLD, Tier.RAM)
        await engine.move(Tier.RAM, Tier.GPU)
        pipeline = engine._landing
        assert pipeline is not None and pipeline._cuda
        pipelined = await answer(engine)
        copy_s = await asyncio.wrap_future(pipeline.landing)
        assert not pipeline._handles, "the hooks are removed once every chunk landed"
        await engine.move(Tier.GPU, Tier.RAM)
        engine.pipelined_swap_in = False
        await engine.move(Tier.RAM, Tier.GPU)
        sequential = await answer(engine)
        await engine.close()
        return pipelined, sequential, copy_s

    pipelined, sequential, copy_s = asyncio.run(scenario())
    assert pipelined == sequential and pipelined
    assert copy_s > 0
