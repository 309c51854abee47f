"""Concurrent requests for one transformers model share forward passes (transformers' continuous
batching): greedy ones with the same answers as the per-request path, sampled ones each with its own
temperature and top-p; a seed or a per-token option still takes that path."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clearml_umem.engines import create_engine
from clearml_umem.engines.base import Delta, EngineContext, EngineError, GenerationRequest
from clearml_umem.engines.batching import (
    ANY_TOP_K,
    Batcher,
    batching_unavailable,
    samples_per_row,
    why_not_batched,
)
from clearml_umem.engines.transformers_engine import BATCHED_CPU_CONCURRENCY, TransformersEngine
from clearml_umem.spec import spec_from_mapping
from clearml_umem.tiers import Tier

PROMPTS = ("The quick brown fox", "hello there", "a b c d e f g", "zz top")


def make_engine(weights: Path, **options: Any) -> TransformersEngine:
    spec = spec_from_mapping({"name": weights.name, "weights": str(weights)})
    engine = create_engine(spec, EngineContext(work_dir=weights.parent, device="cpu", options=options))
    assert isinstance(engine, TransformersEngine)
    asyncio.run(engine.move(Tier.COLD, Tier.GPU))
    return engine


async def collect(engine: TransformersEngine, request: GenerationRequest) -> tuple[str, Delta]:
    text, deltas = await collect_all(engine, request)
    return text, deltas[-1]


async def collect_all(engine: TransformersEngine, request: GenerationRequest) -> tuple[str, list[Delta]]:
    deltas = [d async for d in engine.generate(request)]
    return "".join(d.text for d in deltas), deltas


def requests() -> list[GenerationRequest]:
    out = [GenerationRequest(prompt=p, max_tokens=12, temperature=0.0) for p in PROMPTS[:3]]
    out.append(GenerationRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0.0))
    return out


@pytest.fixture(scope="module")
def batched(tiny_models: dict[str, Path]) -> Iterator[TransformersEngine]:
    engine = make_engine(tiny_models["tiny-llama"])
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def sampling(tiny_models: dict[str, Path]) -> Iterator[TransformersEngine]:
    """Sampled requests batched on the CPU too (`auto` batches them on a GPU only)."""
    engine = make_engine(tiny_models["tiny-llama"], batching="all")
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def solo(tiny_models: dict[str, Path]) -> Iterator[TransformersEngine]:
    engine = make_engine(tiny_models["tiny-llama"], batching="off")
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def solo_answers(solo: TransformersEngine) -> list[tuple[str, Delta]]:
    return [asyncio.run(collect(solo, r)) for r in requests()]


def test_what_takes_the_per_request_path() -> None:
    assert why_not_batched(GenerationRequest(prompt="x", temperature=0.0)) is None
    assert why_not_batched(GenerationRequest(prompt="x", temperature=0.0, stop=["a"], max_tokens=3)) is None
    assert "seed" in why_not_batched(GenerationRequest(prompt="x", temperature=0.7, seed=1))
    assert samples_per_row()  # transformers 5.24 has per-request warpers: sampled requests share forwards
    assert why_not_batched(GenerationRequest(prompt="x", temperature=0.7, top_p=0.9)) is None
    assert "--batching all" in why_not_batched(GenerationRequest(prompt="x", temperature=0.7), sampled=False)
    for options, why in (({"logprobs": True}, "logprobs"), ({"frequency_penalty": 0.5}, "penalty"),
                         ({"presence_penalty": 0.5}, "penalty"), ({"logit_bias": {"5": 3}}, "logit_bias"),
                         ({"response_format": {"type": "json_object"}}, "constrained")):
        assert why in why_not_batched(GenerationRequest(prompt="x", temperature=0.0, options=options))


def test_an_older_transformers_serves_from_the_per_request_path(
        tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """transformers 5.17 (a GPU machine's image) renamed the manager's fields and lacks internals the
    batcher drives: starting it there failed every hot model's batching with a TypeError. The version
    is checked first, the engine says so once and answers every request on its own."""
    assert batching_unavailable("5.25.0") is None and batching_unavailable("6.1.0.dev0") is None
    assert "older than 5.25" in (batching_unavailable("5.17.0") or "")
    assert "older than 5.25" in (batching_unavailable("4.57.1+cu130") or "")
    assert "unreadable" in (batching_unavailable("five") or "")
    import transformers

    from clearml_umem.engines import batching

    batching.installed_batching_unavailable.cache_clear()
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    try:
        engine = make_engine(tiny_models["tiny-llama"], batching="all")
        try:
            assert not Batcher.supports(engine._model)
            async def together() -> list[tuple[str, Delta]]:
                return await asyncio.gather(*[collect(engine, r) for r in requests()])

            answers = asyncio.run(together())
            assert all(last.completion_tokens > 0 and last.finish_reason for _, last in answers)
            assert engine.batcher is None, "no manager was started"
            said = [r.getMessage() for r in caplog.records if "continuous batching is off" in r.getMessage()]
            assert len(said) == 1 and "transformers 5.17.0" in said[0] and "transformers>=5.25" in said[0]
        finally:
            asyncio.run(engine.close())
    finally:
        batching.installed_batching_unavailable.cache_clear()


def test_concurrent_greedy_answers_match_the_per_request_path_and_share_forwards(
        batched: TransformersEngine, solo: TransformersEngine, solo_answers: list[tuple[str, Delta]]) -> None:
    before = batched.batcher.steps if batched.batcher else 0

    async def together() -> list[tuple[str, Delta]]:
        return await asyncio.gather(*[collect(batched, r) for r in requests()])

    answers = asyncio.run(together())
    assert [a[0] for a in answers] == [s[0] for s in solo_answers]
    for (_, last), (_, expected) in zip(answers, solo_answers, strict=True):
        assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (
            expected.finish_reason, expected.prompt_tokens, expected.completion_tokens)
    batcher = batched.batcher
    assert batcher is not None and batcher.running
    tokens = sum(last.completion_tokens for _, last in answers)
    assert batcher.steps - before < tokens, "every token its own forward: nothing was shared"
    assert batcher.widest_step >= 2
    assert solo.batcher is None, "batching off: no manager at all"
    assert batched.active_generations == 0 and batcher.in_flight() == 0


def test_sampled_requests_share_forwards_each_with_its_own_settings(sampling: TransformersEngine) -> None:
    """One batch of rows that sample and rows that do not, each row's settings passed to the manager's
    per-request warpers. (Greedy answers are not compared with the per-request path here: with a
    random tiny model's near-equal logits, which requests share a step decides some argmaxes, as in
    any batched engine; the test above keeps its batch the same each run.)"""
    greedy = requests()
    hot = [GenerationRequest(prompt=PROMPTS[0], max_tokens=12, temperature=1.8, top_p=0.95) for _ in range(2)]
    narrow = GenerationRequest(prompt=PROMPTS[1], max_tokens=12, temperature=1.5, top_p=1e-6)
    asyncio.run(collect(sampling, greedy[0]))  # the manager is running
    manager = sampling.batcher._manager if sampling.batcher else None
    assert manager is not None
    rows: list[dict[str, Any]] = []
    real_add = manager.add_request

    def add_request(*args: Any, **kwargs: Any) -> Any:
        rows.append({k: kwargs[k] for k in ("temperature", "top_k", "top_p")})
        return real_add(*args, **kwargs)

    manager.add_request = add_request
    before = sampling.batcher.steps
    try:
        async def together() -> list[tuple[str, Delta]]:
            return await asyncio.gather(*[collect(sampling, r) for r in [*greedy, *hot, narrow]])

        answers = asyncio.run(together())
    finally:
        del manager.add_request
    assert sorted(map(str, rows)) == sorted(map(str, [
        *[{"temperature": 1.0, "top_k": 1, "top_p": 1.0}] * len(greedy),
        *[{"temperature": 1.8, "top_k": ANY_TOP_K, "top_p": 0.95}] * 2,
        {"temperature": 1.5, "top_k": ANY_TOP_K, "top_p": 1e-6}]))
    assert all(last.completion_tokens > 0 for _, last in answers)
    # two rows of one prompt at temperature 1.8 over a random model's vocabulary: the same twelve
    # tokens twice would mean they did not draw at all
    assert answers[len(greedy)][0] != answers[len(greedy) + 1][0]
    tokens = sum(last.completion_tokens for _, last in answers)
    assert sampling.batcher.steps - before < tokens, "sampled requests took the per-request path"
    assert sampling.active_generations == 0 and sampling.batcher.in_flight() == 0


def test_a_request_closed_mid_batch_frees_its_slot_and_the_others_go_on(batched: TransformersEngine) -> None:
    async def scenario() -> None:
        streams = [batched.generate(GenerationRequest(prompt=p, max_tokens=400, temperature=0.0))
                   for p in PROMPTS[:3]]
        for stream in streams:
            await stream.__anext__()
        assert batched.batcher.in_flight() == 3
        await streams[0].aclose()
        assert batched.batcher.in_flight() == 2, "the closed request still holds its KV blocks"
        assert batched.active_generations == 2
        for stream in streams[1:]:
            delta = await stream.__anext__()
            assert delta.finish_reason is None
            await stream.aclose()
        assert batched.batcher.in_flight() == 0 and batched.active_generations == 0

    asyncio.run(scenario())


def test_a_first_token_does_not_wait_for_a_long_answer(batched: TransformersEngine) -> None:
    async def scenario() -> None:
        long = batched.generate(GenerationRequest(prompt=PROMPTS[0], max_tokens=1500, temperature=0.0))
        await long.__anext__()
        text, last = await collect(batched, GenerationRequest(prompt=PROMPTS[1], max_tokens=3, temperature=0.0))
        assert last.completion_tokens == 3
        assert batched.batcher.in_flight() == 1, "the short answer waited for the long one"
        assert (await long.__anext__()).finish_reason is None
        await long.aclose()

    asyncio.run(scenario())


def test_stop_strings_end_a_batched_request(batched: TransformersEngine,
                                            solo_answers: list[tuple[str, Delta]]) -> None:
    full = solo_answers[0][0]
    stop = full[5:8]
    request = GenerationRequest(prompt=PROMPTS[0], max_tokens=12, temperature=0.0, stop=[stop])
    text, last = asyncio.run(collect(batched, request))
    assert text == full[:full.index(stop)] and last.finish_reason == "stop"
    assert batched.batcher.in_flight() == 0 and batched.active_generations == 0


def test_requests_with_options_take_the_per_request_path_beside_the_batch(
        batched: TransformersEngine, solo: TransformersEngine, solo_answers: list[tuple[str, Delta]]) -> None:
    """On a CPU with `auto`, a sampled request too (a seed takes that path anywhere)."""
    sampled = GenerationRequest(prompt=PROMPTS[0], max_tokens=10, temperature=1.2, seed=4)
    unseeded = GenerationRequest(prompt=PROMPTS[1], max_tokens=6, temperature=1.2)
    with_logprobs = GenerationRequest(prompt=PROMPTS[0], max_tokens=4, temperature=0.0,
                                      options={"logprobs": True, "top_logprobs": 2})
    before = batched.batcher.steps

    async def mixed() -> list[Any]:
        return await asyncio.gather(collect(batched, sampled), collect_all(batched, with_logprobs),
                                    collect(batched, unseeded))

    answers = asyncio.run(mixed())
    unseeded_end = answers[2][1]  # sampled without a seed: it may draw the end-of-text token early
    assert (unseeded_end.completion_tokens, unseeded_end.finish_reason) == (6, "length") \
        or (1 <= unseeded_end.completion_tokens < 6 and unseeded_end.finish_reason == "stop"), unseeded_end
    assert batched.batcher.steps == before, "a request with options went through the batch"
    assert answers[0][0] == asyncio.run(collect(solo, sampled))[0], "a seed reproduces its answer"
    text, deltas = answers[1]
    assert text == asyncio.run(collect(solo, with_logprobs))[0]
    assert len([entry for d in deltas for entry in d.logprobs or ()]) == 4


def test_per_request_generations_run_one_per_core_on_a_cpu(batched: TransformersEngine) -> None:
    assert batched.max_concurrency == BATCHED_CPU_CONCURRENCY
    real = batched._generate_sync
    inside, most = 0, 0
    lock = threading.Lock()

    def counted(*args: Any) -> Any:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        try:
            return real(*args)
        finally:
            with lock:
                inside -= 1

    batched._generate_sync = counted  # type: ignore[method-assign]
    batched._solo_slots = threading.BoundedSemaphore(1)
    try:
        async def three() -> None:
            await asyncio.gather(*[collect(batched, GenerationRequest(prompt=p, max_tokens=4, temperature=1.0))
                                   for p in PROMPTS[:3]])

        asyncio.run(three())
    finally:
        del batched._generate_sync
    assert most == 1


def test_leaving_the_device_stops_batching_and_it_restarts(tiny_models: dict[str, Path],
                                                           solo_answers: list[tuple[str, Delta]]) -> None:
    engine = make_engine(tiny_models["tiny-llama"], host_copy="keep")
    try:
        assert asyncio.run(collect(engine, requests()[0]))[0] == solo_answers[0][0]
        assert engine.batcher.running
        asyncio.run(engine.move(Tier.GPU, Tier.RAM))
        assert not engine.batcher.running
        asyncio.run(engine.move(Tier.RAM, Tier.GPU))
        assert asyncio.run(collect(engine, requests()[0]))[0] == solo_answers[0][0]
        engine.weights_ready()  # while a pipelined swap-in lands, requests take the per-request path
        assert asyncio.run(collect(engine, requests()[0]))[0] == solo_answers[0][0]
        assert engine.batcher.running
    finally:
        asyncio.run(engine.close())
    assert not engine.batcher.running


def test_a_stuck_batched_step_errors_its_client_and_counts_as_hung(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["tiny-llama"], stall_timeout_s=0.5)
    gate, stuck = threading.Event(), threading.Event()
    engine.model.model.layers[0].register_forward_pre_hook(lambda *_: gate.wait(30) if stuck.is_set() else None)

    async def scenario() -> None:
        await collect(engine, GenerationRequest(prompt="Hello", max_tokens=2, temperature=0.0))
        assert await engine.hung() is None
        stuck.set()
        with pytest.raises(EngineError, match="no progress for 0.5 s"):
            await collect(engine, GenerationRequest(prompt="Hello", max_tokens=2, temperature=0.0))
        assert "made no progress" in (await engine.hung() or "")
        gate.set()
        await engine.close()

    try:
        asyncio.run(scenario())
    finally:
        gate.set()
    assert engine.active_generations == 0


def test_a_batching_failure_answers_from_the_per_request_path(tiny_models: dict[str, Path],
                                                               solo_answers: list[tuple[str, Delta]]) -> None:
    engine = make_engine(tiny_models["tiny-llama"])

    def boom(*_: Any) -> None:
        raise RuntimeError("boom")

    async def scenario() -> None:
        assert (await collect(engine, requests()[0]))[0] == solo_answers[0][0]
        engine.batcher._manager.batch_processor._generation_step = boom
        assert (await collect(engine, requests()[0]))[0] == solo_answers[0][0]
        assert engine.batcher.broken
        steps = engine.batcher.steps
        assert (await collect(engine, requests()[1]))[0] == solo_answers[1][0]
        assert engine.batcher.steps == steps, "a broken batcher is not used again"
        await engine.close()

    asyncio.run(scenario())
