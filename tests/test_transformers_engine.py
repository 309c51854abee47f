"""The transformers engine on real tiny models: every tier move keeps the answers and copies real bytes."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from clearml_umem.engines import create_engine
from clearml_umem.engines.base import (
    Delta,
    Engine,
    EngineContext,
    EngineError,
    Footprint,
    GenerationRequest,
    InvalidRequest,
)
from clearml_umem.engines.transformers_engine import (
    ACTIVATION_MARGIN_FRACTION,
    GENERATIONS,
    TransformersEngine,
    _TextAssembler,
    checkpoint_files,
)
from clearml_umem.spec import spec_from_mapping
from clearml_umem.tiers import Tier
from clearml_umem.tinymodels import build_tokenizer

PROMPT = "The quick brown fox"
GREEDY = GenerationRequest(prompt=PROMPT, max_tokens=24, temperature=0.0)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def collect(engine: Engine, request: GenerationRequest) -> tuple[str, Delta, list[Delta]]:
    deltas = [d async for d in engine.generate(request)]
    return "".join(d.text for d in deltas), deltas[-1], deltas


def make_engine(weights: Path, device: str = "cpu", host_copy: str = "auto", **spec: Any) -> TransformersEngine:
    model_spec = spec_from_mapping({"name": weights.name, "weights": str(weights), **spec})
    context = EngineContext(work_dir=weights.parent, device=device, options={"host_copy": host_copy})
    engine = create_engine(model_spec, context)
    assert isinstance(engine, TransformersEngine)
    return engine


@pytest.fixture(scope="module")
def llama_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["tiny-llama"]


@pytest.fixture(scope="module")
def tied_sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen2 with tied embeddings saved in several shards: the reload paths the demo models do not take."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tied") / "tiny-qwen2-tied"
    build_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = AutoConfig.for_model(
        "qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="60KB")
    return out


@pytest.fixture(params=["keep", "evict"])
def engine(llama_dir: Path, request: pytest.FixtureRequest) -> Iterator[TransformersEngine]:
    """Both ways of leaving the GPU: the host copy kept while hot, or copied on eviction."""
    eng = make_engine(llama_dir, host_copy=request.param)
    run(eng.move(Tier.COLD, Tier.GPU))
    yield eng
    run(eng.close())


@pytest.fixture(scope="module")
def baseline(llama_dir: Path) -> str:
    """The greedy answer of a freshly loaded model, which every tier round trip must reproduce."""
    eng = make_engine(llama_dir)
    run(eng.move(Tier.COLD, Tier.GPU))
    text, last, _ = run(collect(eng, GREEDY))
    run(eng.close())
    assert last.completion_tokens == GREEDY.max_tokens and len(text) > 0
    return text


def param_bytes(engine: TransformersEngine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.model.parameters())


def generation_threads() -> int:
    """Generations still running in a worker (an idle worker holds nothing of its last one). A
    generation's handle ends as its call returns, a moment before its worker counts itself idle."""
    deadline = time.monotonic() + 2
    while GENERATIONS.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    return GENERATIONS.busy


def test_load_describe_and_protocol(engine: TransformersEngine, llama_dir: Path) -> None:
    assert isinstance(engine, Engine)
    assert engine.tiers == frozenset(Tier)
    assert engine.transits == {}
    info = engine.describe()
    assert info["device"] == "cpu" and info["dtype"] == "bfloat16" and info["tier"] == "gpu"
    assert info["weights"] == str(llama_dir)
    assert info["param_bytes"] == param_bytes(engine) > 0
    assert all(p.dtype == torch.bfloat16 for p in engine.model.parameters())



def test_models_loaded_at_once_each_keep_one_dtype_and_the_default_dtype_is_left_alone(
        tiny_models: dict[str, Path]) -> None:
    """The first requests after a start load every model at once, each in a thread of its own. A
    module build changes process-wide torch state (the default dtype) for its length. Builds that
    overlapped mixed bfloat16 and float32 parameters inside a model, whose requests then failed
    ("mat1 and mat2 must have the same dtype"), and left the default dtype at bfloat16."""
    default = torch.get_default_dtype()
    for _ in range(3):  # the overlap is a race: every round of the old code hit it in a try of 10
        engines = [make_engine(path) for path in tiny_models.values()]

        async def load_all(engines: list[TransformersEngine]) -> None:
            await asyncio.gather(*(engine.move(Tier.COLD, Tier.GPU) for engine in engines))

        try:
            run(load_all(engines))
            assert torch.get_default_dtype() == default
            for engine in engines:
                dtypes = {param.dtype for param in engine._model.parameters()}
                assert dtypes == {engine.dtype}, (engine.spec.name, dtypes)
                _, last, _ = run(collect(engine, GenerationRequest(prompt=PROMPT, max_tokens=2, temperature=0.0)))
                assert last.completion_tokens == 2
        finally:
            for engine in engines:
                run(engine.close())


def test_footprint_known_before_loading(llama_dir: Path) -> None:
    cold = make_engine(llama_dir)
    estimate = cold.footprint(Tier.GPU)
    assert cold.model is None
    run(cold.move(Tier.COLD, Tier.GPU))
    exact = param_bytes(cold)
    assert estimate == cold.footprint(Tier.GPU)
    assert estimate.device_bytes == int(exact * (1 + ACTIVATION_MARGIN_FRACTION) + 0.999999)
    assert estimate.host_bytes == exact, "the kept host copy counts against the host budget"
    assert make_engine(llama_dir, host_copy="evict").footprint(Tier.GPU) == Footprint(estimate.device_bytes, 0)
    assert cold.footprint(Tier.RAM) == Footprint(device_bytes=0, host_bytes=exact)
    assert cold.footprint(Tier.DISK) == Footprint() == cold.footprint(Tier.COLD)
    run(cold.close())
    as_fp32 = make_engine(llama_dir, dtype="float32")
    assert as_fp32.footprint(Tier.RAM).host_bytes == 2 * exact


@pytest.mark.parametrize("path", [
    (Tier.GPU, Tier.RAM, Tier.GPU),
    (Tier.GPU, Tier.DISK, Tier.GPU),
    (Tier.GPU, Tier.COLD, Tier.GPU),
    (Tier.GPU, Tier.RAM, Tier.DISK, Tier.GPU),
    (Tier.GPU, Tier.COLD, Tier.RAM, Tier.GPU),
    (Tier.GPU, Tier.COLD, Tier.DISK, Tier.RAM, Tier.GPU),
    (Tier.GPU, Tier.RAM, Tier.COLD, Tier.DISK, Tier.COLD, Tier.GPU),
], ids=lambda p: "-".join(t.value for t in p))
def test_greedy_answer_survives_round_trip(engine: TransformersEngine, baseline: str, path: tuple[Tier, ...]) -> None:
    expected_bytes = param_bytes(engine)
    kept = engine.keep_host_copy
    for src, dst in itertools.pairwise(path):
        result = run(engine.move(src, dst))
        assert engine.tier is dst
        copies_weights = dst in (Tier.GPU, Tier.RAM) and not (kept and (src, dst) == (Tier.GPU, Tier.RAM))
        assert result.bytes_moved == (expected_bytes if copies_weights else 0), (src, dst)
        if (src, dst) == (Tier.GPU, Tier.RAM):
            assert result.host_copy == ("kept" if kept else "copied")
        assert (engine.host_buffer is not None) == (dst is Tier.RAM or dst is Tier.GPU and kept), (src, dst)
    text, last, _ = run(collect(engine, GREEDY))
    assert text == baseline
    assert last.finish_reason == "length"


def test_hot_parameters_are_views_into_one_buffer(engine: TransformersEngine) -> None:
    params = dict(engine.model.named_parameters())
    storages = {p.untyped_storage().data_ptr() for p in params.values()}
    assert len(storages) == 1, "one device buffer, so a swap is one copy"
    base = min(p.data_ptr() for p in params.values())
    assert all((p.data_ptr() - base) % 512 == 0 for p in params.values())


def test_offload_to_ram_releases_device_storage(engine: TransformersEngine) -> None:
    params = dict(engine.model.named_parameters())
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in params.items()}
    kept_buffer = engine.host_buffer
    result = run(engine.move(Tier.GPU, Tier.RAM))
    host = engine.host_buffer
    assert host is not None and host.nbytes >= result.bytes_moved
    assert (host is kept_buffer) == engine.keep_host_copy, "a kept copy is reused, not made again"
    views = engine._layout.views(host.tensor)
    assert set(views) == set(params)
    for name, p in params.items():
        assert p.numel() == 0, name
        assert torch.equal(views[name], before[name][1])
    buffers = dict(engine.model.named_buffers())
    assert buffers["model.rotary_emb.inv_freq"].numel() > 0
    run(engine.move(Tier.RAM, Tier.GPU))
    assert (engine.host_buffer is host) == engine.keep_host_copy
    for name, p in params.items():
        assert torch.equal(p.data, before[name][1])
        assert p.data_ptr() != views[name].data_ptr(), "the device copy is its own memory"


def test_host_copy_mode_is_validated_and_auto_follows_the_budgets(llama_dir: Path) -> None:
    from clearml_umem.engines.transformers_engine import keep_host_copy

    def ctx(**kw: Any) -> EngineContext:
        return EngineContext(work_dir=llama_dir.parent, **kw)

    assert keep_host_copy(ctx())
    assert keep_host_copy(ctx(device_budget_bytes=10, host_budget_bytes=10))
    assert not keep_host_copy(ctx(device_budget_bytes=10, host_budget_bytes=9))
    assert keep_host_copy(ctx(device_budget_bytes=10, host_budget_bytes=1, options={"host_copy": "keep"}))
    assert not keep_host_copy(ctx(options={"host_copy": "evict"}))
    with pytest.raises(EngineError, match="host_copy must be one of auto, keep, evict"):
        keep_host_copy(ctx(options={"host_copy": "sometimes"}))


def test_disk_tier_keeps_skeleton_and_tokenizer_only(engine: TransformersEngine) -> None:
    run(engine.move(Tier.GPU, Tier.RAM))
    run(engine.move(Tier.RAM, Tier.DISK))
    assert engine.host_buffer is None
    assert all(p.numel() == 0 for p in engine.model.parameters())
    assert engine.describe()["tier"] == "disk"
    run(engine.move(Tier.DISK, Tier.COLD))
    assert engine.model is None


def test_tied_and_sharded_checkpoint(tied_sharded_dir: Path) -> None:
    assert len(checkpoint_files(tied_sharded_dir)) > 1
    index = json.loads((tied_sharded_dir / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    eng = make_engine(tied_sharded_dir)
    estimate = eng.footprint(Tier.RAM).host_bytes
    run(eng.move(Tier.COLD, Tier.GPU))
    model = eng.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    exact = param_bytes(eng)
    assert estimate == exact
    expected, _, _ = run(collect(eng, GREEDY))
    for src, dst in [(Tier.GPU, Tier.DISK), (Tier.DISK, Tier.GPU), (Tier.GPU, Tier.RAM), (Tier.RAM, Tier.DISK),
                     (Tier.DISK, Tier.RAM), (Tier.RAM, Tier.GPU)]:
        result = run(eng.move(src, dst))
        assert result.bytes_moved in (0, exact)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert run(collect(eng, GREEDY))[0] == expected
    run(eng.close())


def test_chat_template_applied(engine: TransformersEngine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    chat_text, chat_last, _ = run(collect(engine, GenerationRequest(messages=messages, max_tokens=12,
                                                                    temperature=0.0)))
    rendered = "<|system|>Be brief.<|end|><|user|>Hello there<|end|><|assistant|>"
    plain_text, plain_last, _ = run(collect(engine, GenerationRequest(prompt=rendered, max_tokens=12,
                                                                      temperature=0.0)))
    assert chat_text == plain_text
    rendered_tokens = len(engine._tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert chat_last.prompt_tokens == plain_last.prompt_tokens == rendered_tokens
    raw_text, raw_last, _ = run(collect(engine, GenerationRequest(prompt="Hello there", max_tokens=12,
                                                                  temperature=0.0)))
    assert raw_last.prompt_tokens == len("Hello there") < chat_last.prompt_tokens


def test_usage_and_streaming_in_pieces(engine: TransformersEngine, baseline: str) -> None:
    text, last, deltas = run(collect(engine, GREEDY))
    assert text == baseline
    assert len(deltas) > 5, "text must stream as it is produced, not arrive at the end"
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert last.finish_reason == "length"
    assert last.prompt_tokens == len(PROMPT)
    assert last.completion_tokens == GREEDY.max_tokens


def test_stop_strings(engine: TransformersEngine, baseline: str) -> None:
    stop = baseline[8:11]
    cut = baseline.index(stop)
    text, last, deltas = run(collect(engine, GenerationRequest(prompt=PROMPT, max_tokens=24, temperature=0.0,
                                                               stop=["never-produced", stop])))
    assert text == baseline[:cut]
    assert all(stop not in d.text for d in deltas)
    assert last.finish_reason == "stop"
    assert last.completion_tokens == cut + len(stop)


def test_eos_finishes_with_stop(engine: TransformersEngine, baseline: str) -> None:
    """Make EOS the model's favourite right where the baseline's 4th token would be, by editing real weights."""
    tokenizer = engine._tokenizer
    fourth = tokenizer(baseline[3])["input_ids"][0]
    head = engine.model.get_output_embeddings().weight
    with torch.no_grad():
        head[tokenizer.eos_token_id] = head[fourth] * 4
    text, last, _ = run(collect(engine, GREEDY))
    assert last.finish_reason == "stop"
    assert text == baseline[:baseline.index(baseline[3])]
    assert "<|end|>" not in text
    assert last.completion_tokens == len(text) + 1


def test_seeded_sampling_is_reproducible(engine: TransformersEngine) -> None:
    def sample(seed: int, top_p: float = 1.0) -> str:
        req = GenerationRequest(prompt=PROMPT, max_tokens=16, temperature=1.5, top_p=top_p, seed=seed)
        return run(collect(engine, req))[0]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(5, top_p=0.3) == sample(5, top_p=0.3)


def test_early_close_cancels_generation(engine: TransformersEngine) -> None:
    forwards = 0

    def count_and_slow(*_: Any) -> None:
        nonlocal forwards
        forwards += 1
        time.sleep(0.01)

    hook = engine.model.register_forward_hook(count_and_slow)
    try:
        async def read_two_then_close() -> float:
            stream = engine.generate(GenerationRequest(prompt=PROMPT, max_tokens=1000, temperature=0.0))
            await stream.__anext__()
            await stream.__anext__()
            started = time.perf_counter()
            await stream.aclose()
            return time.perf_counter() - started

        close_s = run(read_two_then_close())
    finally:
        hook.remove()
    assert close_s < 1.0
    assert engine.active_generations == 0
    assert not generation_threads()
    assert forwards < 10, f"{forwards} forward passes for a request closed after 2 tokens"


def test_too_long_request_is_invalid(engine: TransformersEngine) -> None:
    with pytest.raises(InvalidRequest, match="context length of 2048"):
        run(collect(engine, GenerationRequest(prompt=PROMPT, max_tokens=2040)))
    with pytest.raises(InvalidRequest):
        run(collect(engine, GenerationRequest(prompt="x" * 2000, max_tokens=100)))
    assert engine.active_generations == 0
    # greedy: sampled at temperature 1, a random model may end the text at the first token
    answer = run(collect(engine, GenerationRequest(prompt=PROMPT, max_tokens=2, temperature=0.0)))
    assert answer[1].completion_tokens == 2


def test_context_length_from_spec_wins(llama_dir: Path) -> None:
    eng = make_engine(llama_dir, context_length=16)
    run(eng.move(Tier.COLD, Tier.GPU))
    with pytest.raises(InvalidRequest, match="context length of 16"):
        run(collect(eng, GenerationRequest(prompt=PROMPT, max_tokens=8)))
    run(eng.close())


def test_concurrent_generates(engine: TransformersEngine, baseline: str) -> None:
    async def many() -> list[tuple[str, Delta, list[Delta]]]:
        chat = GenerationRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=10, temperature=0.0)
        sampled = GenerationRequest(prompt=PROMPT, max_tokens=10, temperature=1.0, seed=3)
        return await asyncio.gather(*[collect(engine, r) for r in (GREEDY, chat, sampled, GREEDY, chat, sampled)])

    started = time.perf_counter()
    results = run(many())
    assert time.perf_counter() - started < 30
    assert results[0][0] == results[3][0] == baseline
    assert results[1][0] == results[4][0]
    assert results[2][0] == results[5][0]
    assert all(r[1].finish_reason == "length" for r in results)
    assert engine.active_generations == 0


def test_generate_needs_the_model_hot(engine: TransformersEngine, llama_dir: Path) -> None:
    run(engine.move(Tier.GPU, Tier.RAM))
    with pytest.raises(EngineError, match="tier ram"):
        run(collect(engine, GREEDY))
    cold = make_engine(llama_dir)
    with pytest.raises(EngineError, match="tier cold"):
        run(collect(cold, GREEDY))


def test_cannot_leave_device_with_generation_in_flight(engine: TransformersEngine) -> None:
    async def scenario() -> None:
        stream = engine.generate(GenerationRequest(prompt=PROMPT, max_tokens=200, temperature=0.0))
        await stream.__anext__()
        with pytest.raises(EngineError, match="in flight"):
            await engine.move(Tier.GPU, Tier.RAM)
        await stream.aclose()
        await engine.move(Tier.GPU, Tier.RAM)

    run(scenario())
    assert engine.tier is Tier.RAM


def test_wrong_source_tier_and_idempotent_close(engine: TransformersEngine) -> None:
    with pytest.raises(EngineError, match="not ram"):
        run(engine.move(Tier.RAM, Tier.GPU))
    run(engine.close())
    run(engine.close())
    assert engine.tier is Tier.COLD and engine.model is None


def test_incremental_decoding_never_splits_characters(llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    text = "naïve café — 日本語 ok"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text), "multi-byte characters must span several tokens for this test to mean anything"
    assembler = _TextAssembler(tokenizer, stop=["語 o"])
    pieces = [assembler.add([i]) for i in ids]
    pieces.append(assembler.flush())
    assert "".join(pieces) == "naïve café — 日本"
    assert all("\ufffd" not in p for p in pieces)
    assert assembler.stopped


def test_held_back_text_is_flushed_at_the_end(llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    assembler = _TextAssembler(tokenizer, stop=["xyz"])
    assert [assembler.add([i]) for i in tokenizer("abx")["input_ids"]] == ["a", "b", ""]
    assert assembler.flush() == "x" and not assembler.stopped
    unfinished = _TextAssembler(tokenizer, stop=[])
    first_byte_of_e_acute = tokenizer("é")["input_ids"][0]
    assert unfinished.add(tokenizer("a")["input_ids"]) == "a"
    assert unfinished.add([first_byte_of_e_acute]) == ""
    assert unfinished.flush() == "\ufffd"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("host_copy", ["keep", "evict"])
def test_gpu_memory_is_released_and_restored(llama_dir: Path, host_copy: str) -> None:
    eng = make_engine(llama_dir, device="cuda", host_copy=host_copy)
    run(eng.move(Tier.COLD, Tier.GPU))
    expected, _, _ = run(collect(eng, GREEDY))
    torch.cuda.synchronize()
    hot = torch.cuda.memory_allocated()
    weights = param_bytes(eng)
    assert (eng.host_buffer is not None) == (host_copy == "keep")
    result = run(eng.move(Tier.GPU, Tier.RAM))
    assert result.host_copy == ("kept" if host_copy == "keep" else "copied")
    warm = torch.cuda.memory_allocated()
    assert hot - warm >= weights * 0.99
    assert eng.host_buffer.pinned and eng.host_buffer.tensor.is_pinned()
    run(eng.move(Tier.RAM, Tier.GPU))
    assert torch.cuda.memory_allocated() - warm >= weights * 0.99
    assert run(collect(eng, GREEDY))[0] == expected
    run(eng.move(Tier.GPU, Tier.DISK))
    assert hot - torch.cuda.memory_allocated() >= weights * 0.99
    assert eng.host_buffer is None
    run(eng.move(Tier.DISK, Tier.GPU))
    assert run(collect(eng, GREEDY))[0] == expected
    run(eng.move(Tier.GPU, Tier.COLD))
    run(eng.move(Tier.COLD, Tier.RAM))
    run(eng.move(Tier.RAM, Tier.GPU))
    assert run(collect(eng, GREEDY))[0] == expected
    run(eng.close())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_greedy_answer_matches_across_every_round_trip(tied_sharded_dir: Path) -> None:
    """Bit-identical greedy output on the GPU after each kind of move, for a tied, sharded checkpoint."""
    eng = make_engine(tied_sharded_dir, device="cuda")
    run(eng.move(Tier.COLD, Tier.GPU))
    expected, _, _ = run(collect(eng, GREEDY))
    for path in [(Tier.GPU, Tier.RAM, Tier.GPU), (Tier.GPU, Tier.DISK, Tier.GPU), (Tier.GPU, Tier.DISK, Tier.RAM,
                 Tier.GPU), (Tier.GPU, Tier.COLD, Tier.DISK, Tier.GPU)]:
        for src, dst in itertools.pairwise(path):
            run(eng.move(src, dst))
        assert run(collect(eng, GREEDY))[0] == expected, path
    model = eng.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    run(eng.close())


@pytest.mark.parametrize("how", ["anyio-scope", "task-cancel"])
def test_a_cancelled_consumer_returns_only_once_the_generation_has_stopped(llama_dir: Path, how: str) -> None:
    """A client that hangs up cancels the request's task (an anyio scope in the router); the engine's
    generator must not end before its thread has, or the model counts as idle while it still generates
    and the next move fails with 'in flight'."""
    import anyio

    eng = make_engine(llama_dir)
    run(eng.move(Tier.COLD, Tier.GPU))
    request = GenerationRequest(prompt=PROMPT, max_tokens=1500, temperature=0.0)

    async def scenario() -> int:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in eng.generate(request):
                started.set()

        if how == "anyio-scope":
            async with anyio.create_task_group() as group:
                group.start_soon(consume)
                await started.wait()
                group.cancel_scope.cancel()
        else:
            task = asyncio.ensure_future(consume())
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return eng.active_generations

    assert run(scenario()) == 0
    assert not generation_threads()
    run(eng.move(Tier.GPU, Tier.RAM))
    run(eng.close())


def test_the_check_before_any_move_tokenizes_once_for_generation(engine: TransformersEngine, baseline: str) -> None:
    request = GenerationRequest(prompt=PROMPT, max_tokens=24, temperature=0.0)
    assert engine.check_request(request) == len(request.prompt_ids or []) > 0
    assert request.prompt_ids == engine._prompt_ids(request, engine._tokenizer)
    text, last, _ = run(collect(engine, request))
    assert text == baseline and last.prompt_tokens == len(request.prompt_ids)
