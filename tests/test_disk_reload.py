"""The transformers engine's reload from disk (overlapped reads and copies): the same weights and answers
after a round trip, a damaged file named in a clean error, and a close that cancels a reload under way."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from clearml_umem.engines.base import EngineError, GenerationRequest
from clearml_umem.engines.progress import MoveProgress
from clearml_umem.tiers import Tier
from clearml_umem.tinymodels import build_tokenizer
from tests.test_transformers_engine import GREEDY, collect, make_engine, run


@pytest.fixture
def model_dir(tiny_models: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the tiny Llama: these tests damage its weights file."""
    return Path(shutil.copytree(tiny_models["tiny-llama"], tmp_path / "tiny-llama"))


def weights_of(engine) -> dict[str, bytes]:  # noqa: ANN001 - a TransformersEngine
    return {name: p.detach().contiguous().view(torch.uint8).numpy().tobytes()
            for name, p in engine.model.named_parameters()}


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("umem-read-")]


SHORT = GenerationRequest(prompt=GREEDY.prompt, max_tokens=6, temperature=0.0)


@pytest.mark.parametrize("host_copy", ["keep", "evict"])
def test_a_reload_from_disk_gives_back_the_same_bytes_and_answers(model_dir: Path, host_copy: str) -> None:
    engine = make_engine(model_dir, host_copy=host_copy)
    run(engine.move(Tier.COLD, Tier.GPU))
    before = weights_of(engine)
    answer, _, _ = run(collect(engine, SHORT))
    for path in ((Tier.GPU, Tier.DISK, Tier.GPU), (Tier.GPU, Tier.DISK, Tier.RAM, Tier.GPU)):
        for src, dst in itertools.pairwise(path):
            run(engine.move(src, dst))
        assert weights_of(engine) == before, path
        assert (engine.host_buffer is not None) == (host_copy == "keep")
    assert run(collect(engine, SHORT))[0] == answer
    run(engine.close())
    assert reader_threads() == []


@pytest.mark.parametrize(("host_copy", "target"), [("keep", Tier.GPU), ("evict", Tier.GPU), ("keep", Tier.RAM)])
def test_a_truncated_weights_file_is_an_error_naming_it_and_the_model_stays_on_disk(
        model_dir: Path, host_copy: str, target: Tier) -> None:
    engine = make_engine(model_dir, host_copy=host_copy)
    run(engine.move(Tier.COLD, Tier.GPU))
    before = weights_of(engine)
    run(engine.move(Tier.GPU, Tier.DISK))
    weights = model_dir / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:len(whole) * 2 // 3])
    with pytest.raises(EngineError, match=f"{weights}: .* lies outside the file .* truncated or corrupt"):
        run(engine.move(Tier.DISK, target))
    assert engine.tier is Tier.DISK and engine.host_buffer is None
    weights.write_bytes(whole)
    run(engine.move(Tier.DISK, Tier.GPU))
    assert weights_of(engine) == before, "the engine recovers once the file is whole again"
    run(engine.close())


def test_a_tied_model_is_read_directly_not_through_from_pretrained(tmp_path: Path) -> None:
    """A model whose head shares the embedding's weights: its skeleton must tie them too, else the layout
    wants a tensor the checkpoint does not hold and the load falls back to `from_pretrained` (which holds a
    host copy even on disk) or is refused as not matching config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tied-llama"
    build_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, tie_word_embeddings=True,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(out)
    engine = make_engine(out)
    run(engine.move(Tier.COLD, Tier.DISK))
    assert engine.host_buffer is None, "the skeleton was built empty, not loaded by from_pretrained"
    run(engine.move(Tier.DISK, Tier.GPU))
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    run(engine.close())


def test_a_weights_file_damaged_before_the_first_load_is_refused_by_name(model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    engine = make_engine(model_dir)
    with pytest.raises(EngineError, match=f"{weights}: .* lies outside the file"):
        run(engine.move(Tier.COLD, Tier.GPU))
    assert engine.tier is Tier.COLD and engine.model is None


class _HeldProgress(MoveProgress):
    """Holds the first piece of a read until the engine is told to close, so the close lands mid-reload."""

    def __init__(self, engine) -> None:  # noqa: ANN001 - a TransformersEngine
        super().__init__()
        self.engine = engine
        self.reading = threading.Event()

    def add(self, nbytes: int) -> None:
        self.reading.set()
        deadline = time.monotonic() + 10
        while not self.engine._cancel_reads.is_set() and time.monotonic() < deadline:
            time.sleep(0.005)
        super().add(nbytes)


@pytest.mark.parametrize("host_copy", ["keep", "evict"])
def test_a_close_during_a_reload_cancels_it_and_leaves_nothing_behind(model_dir: Path, host_copy: str) -> None:
    engine = make_engine(model_dir, host_copy=host_copy)
    run(engine.move(Tier.COLD, Tier.DISK))
    held = _HeldProgress(engine)
    engine._progress = held

    async def reload_then_close() -> BaseException | None:
        move = asyncio.ensure_future(engine.move(Tier.DISK, Tier.GPU))
        assert await asyncio.to_thread(held.reading.wait, 10), "the reload started reading"
        await engine.close()
        try:
            await move
        except BaseException as exc:  # noqa: BLE001 - what the move ended with is the point
            return exc
        return None

    outcome = run(reload_then_close())
    assert isinstance(outcome, EngineError) and "cancelled" in str(outcome), outcome
    assert engine.tier is Tier.COLD and engine.model is None and engine.host_buffer is None
    assert reader_threads() == []
    engine._progress = MoveProgress()
    run(engine.move(Tier.COLD, Tier.GPU))  # a closed engine loads again: the cancel does not stick
    assert engine.tier is Tier.GPU
    run(engine.close())
