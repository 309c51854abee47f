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

API_OPTIONS = frozenset({"frequency_penalty", "presence_penalty", "logit_bias", "tools", "tool_choice",
                         "parallel_tool_calls", "response_format", "logprobs", "top_logprobs"})
"""OpenAI options beyond max_tokens, temperature, top_p, stop and seed, passed in
`GenerationRequest.options` as the client sent them (docs/tools-and-structured-output.md)."""

SAMPLING_OPTIONS: dict[str, frozenset[str]] = {"transformers": API_OPTIONS, "vllm": API_OPTIONS,
                                               "llamacpp": API_OPTIONS}
"""Options each engine honours. Every engine takes them all: vLLM and llama-server as OpenAI
does, transformers through logits processors and constrained decoding. What one model cannot
honour (no tool-call parser for its family...) its engine refuses in `check_request`."""


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
