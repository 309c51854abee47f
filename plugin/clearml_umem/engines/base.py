"""The one small seam every engine sits behind.

The tier manager only ever asks an engine three things: how much memory it holds in a
tier, to move between two tiers, and to generate. Everything engine-specific (a vLLM
process, an in-process transformers model) stays behind this protocol.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from clearml_umem.errors import ServingError
from clearml_umem.spec import ModelSpec
from clearml_umem.tiers import Footprint, Tier


@dataclass
class GenerationRequest:
    """An OpenAI completion or chat request, already validated by the router.

    Exactly one of `prompt` and `messages` is set.
    """

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    """OpenAI sampling options this model's engine honours beyond the common ones
    (`engines.SAMPLING_OPTIONS`), passed through as the client sent them."""
    prompt_ids: list[int] | None = None
    """The prompt as the model's token ids, when the engine's own check before any move
    (`check_request`) already tokenized it: generation then does not tokenize it again."""

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass
class Delta:
    """A piece of generated text; the last one carries why generation ended and the token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """OpenAI's streamed `tool_calls` fragments (`index`, then `id`/`type`/`function.name` once,
    `function.arguments` in pieces), for the router to pass on or join."""
    logprobs: list[dict[str, Any]] | None = None
    """Per generated token, OpenAI's chat shape: `{"token", "logprob", "bytes", "top_logprobs"}`
    (the router turns them into the completions shape for /v1/completions)."""


@dataclass(frozen=True)
class MoveResult:
    """What one tier move did, for the swap metrics.

    `footprints` is set when the move taught the engine better numbers than it registered
    (device memory measured from the driver): the scheduler counts those from then on.
    """

    bytes_moved: int
    footprints: Mapping[Tier, Footprint] | None = None
    host_copy: str | None = None
    """For a swap-out (GPU -> RAM): 'kept' when the host copy was already there and only device
    memory was freed, 'copied' when the weights were copied off the device."""
    landing: concurrent.futures.Future[float] | None = None
    """A swap-in that ended with its copy still running (the transformers engine's pipelined swap-in):
    the model takes requests at once, each layer waiting for its own weights. Resolves (with the
    copy's seconds) once every weight is on the device, or with the copy's error."""


class EngineError(ServingError, RuntimeError):
    """An engine failed in a way the router should report, not crash on: a 503, a retry may work."""

    status = 503
    code = "engine_error"
    internal = True


class InvalidRequest(EngineError):
    """The request cannot be served as asked (prompt plus max_tokens over the context...): a 400, not a 5xx."""

    status = 400
    code = None


class EngineOutOfMemory(EngineError):
    """A move to the device failed for lack of device memory; the scheduler may make room and retry."""


@dataclass
class EngineContext:
    """What the serving process hands every engine it creates."""

    work_dir: Path
    device: str = "auto"
    device_budget_bytes: int | None = None
    host_budget_bytes: int | None = None
    log_dir: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    spec: ModelSpec

    @property
    def tiers(self) -> frozenset[Tier]:
        """Tiers this engine can be put in; GPU and COLD are always among them."""
        ...

    def footprint(self, tier: Tier) -> Footprint:
        """Memory held in `tier`; the scheduler budgets with it before any move."""
        ...

    @property
    def transits(self) -> Mapping[tuple[Tier, Tier], Tier]:
        """Moves with no direct path, (src, dst) -> the tier they pass through: the scheduler
        reserves that tier's footprint too while such a move runs."""
        ...

    async def move(self, src: Tier, dst: Tier) -> MoveResult:
        """Move from `src` to `dst`; both are in `tiers`. Raises EngineError on failure."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the answer; only called while in GPU. Closing the iterator cancels generation."""
        ...

    def describe(self) -> dict[str, Any]:
        """Engine-specific facts for the admin view (device, chosen KV cache size, log file...)."""
        ...

    async def close(self) -> None:
        """Release everything; safe to call in any tier and more than once."""
        ...
