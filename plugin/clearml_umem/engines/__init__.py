"""Engines and the factory that picks one by the name in a model's spec."""

from __future__ import annotations

from collections.abc import Callable

from clearml_umem.engines.base import (
    Delta,
    Engine,
    EngineContext,
    EngineError,
    EngineOutOfMemory,
    Footprint,
    GenerationRequest,
    InvalidRequest,
    MoveResult,
)
from clearml_umem.spec import ModelSpec

EngineFactory = Callable[[ModelSpec, EngineContext], Engine]


def _transformers(spec: ModelSpec, ctx: EngineContext) -> Engine:
    try:
        from clearml_umem.engines.transformers_engine import TransformersEngine
    except ImportError as exc:
        raise EngineError(f"the transformers engine needs torch and transformers, which this Python lacks "
                          f"({exc}): pip install -e '.[transformers]'") from None

    return TransformersEngine(spec, ctx)


def _vllm(spec: ModelSpec, ctx: EngineContext) -> Engine:
    from clearml_umem.engines.vllm_engine import VLLMEngine

    return VLLMEngine(spec, ctx)


def _llamacpp(spec: ModelSpec, ctx: EngineContext) -> Engine:
    from clearml_umem.engines.llamacpp_engine import LlamaCppEngine

    return LlamaCppEngine(spec, ctx)


FACTORIES: dict[str, EngineFactory] = {"transformers": _transformers, "vllm": _vllm, "llamacpp": _llamacpp}

SAMPLING_OPTIONS: dict[str, frozenset[str]] = {
    "transformers": frozenset(),
    "vllm": frozenset({"frequency_penalty", "presence_penalty", "logit_bias"}),
    "llamacpp": frozenset({"frequency_penalty", "presence_penalty", "logit_bias"}),
}
"""OpenAI options each engine honours beyond max_tokens, temperature, top_p, stop and seed.
Only options that leave the answer's shape as it is: vLLM and llama-server take them as OpenAI does."""


def create_engine(spec: ModelSpec, ctx: EngineContext) -> Engine:
    try:
        factory = FACTORIES[spec.engine]
    except KeyError:
        raise EngineError(f"model {spec.name!r}: unknown engine {spec.engine!r}") from None
    return factory(spec, ctx)


__all__ = [
    "Delta",
    "Engine",
    "EngineContext",
    "EngineError",
    "EngineOutOfMemory",
    "Footprint",
    "GenerationRequest",
    "InvalidRequest",
    "SAMPLING_OPTIONS",
    "MoveResult",
    "create_engine",
]
