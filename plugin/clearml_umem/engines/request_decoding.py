"""What one transformers request adds to plain decoding: logits processors for the OpenAI options
it sets (`engines.logits`, `engines.constrained`), its logprobs, and its answer shaped into tool
calls (`engines.tool_calls`). A request that sets none of them gets no processor and no shaper.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import torch
from transformers import LogitsProcessor

from clearml_umem.engines.base import Delta, GenerationRequest
from clearml_umem.engines.constrained import GrammarProcessor, GuidanceTokenizers, grammar
from clearml_umem.engines.logits import BiasProcessor, LogprobRecorder, PenaltyProcessor, check_logit_bias
from clearml_umem.engines.tool_calls import CallShaper


def check_options(name: str, request: GenerationRequest, vocab_size: int | None) -> None:
    """Everything a client can get wrong in these options, before any move: token ids in
    `logit_bias` beyond the vocabulary, a schema llguidance cannot enforce."""
    if vocab_size:
        check_logit_bias(name, request.options.get("logit_bias"), vocab_size)
    grammar(name, request.options)


class RequestDecoding:
    def __init__(self, name: str, request: GenerationRequest, tokenizer: Any, vocab_size: int, eos: list[int],
                 prompt_length: int, guidance: GuidanceTokenizers, device: torch.device) -> None:
        options = request.options
        check_logit_bias(name, options.get("logit_bias"), vocab_size)
        self.processors: list[LogitsProcessor] = []
        self.recorder: LogprobRecorder | None = None
        logprobs = options.get("logprobs")
        if logprobs is not None and logprobs is not False:
            top = options.get("top_logprobs", 0) if request.is_chat else int(logprobs)
            self.recorder = LogprobRecorder(tokenizer, int(top or 0))
            self.processors.append(self.recorder)
        frequency = float(options.get("frequency_penalty") or 0.0)
        presence = float(options.get("presence_penalty") or 0.0)
        if frequency or presence:
            self.processors.append(PenaltyProcessor(frequency, presence, prompt_length))
        if options.get("logit_bias"):
            self.processors.append(BiasProcessor(options["logit_bias"], vocab_size, device))
        text = grammar(name, options)
        if text is not None:
            self.processors.append(GrammarProcessor(guidance.get(tokenizer, eos), text, prompt_length))
        self._pending: list[dict[str, Any]] = []

    def record(self, token_ids: list[int]) -> None:
        if self.recorder is not None:
            self._pending.extend(self.recorder.entries(token_ids))

    def take_logprobs(self) -> list[dict[str, Any]] | None:
        if self.recorder is None:
            return None
        pending, self._pending = self._pending, []
        return pending


class AnswerShaper:
    """The engine's (text, logprobs) pieces as Deltas: tool calls where the request has tools."""

    def __init__(self, request: GenerationRequest) -> None:
        self._calls = CallShaper(request.options) if request.is_chat and request.options.get("tools") else None

    def piece(self, text: str, logprobs: list[dict[str, Any]] | None) -> Iterator[Delta]:
        deltas = self._calls.feed(text) if self._calls is not None else ([Delta(text=text)] if text else [])
        yield from _with_logprobs(deltas, logprobs)

    def end(self, last: Delta, logprobs: list[dict[str, Any]] | None) -> Iterable[Delta]:
        """The engine's finish Delta (with the text held back to the end) and what the shaper held."""
        if self._calls is None:
            if logprobs:
                last.logprobs = logprobs
            return [last]
        out = list(self.piece(last.text, logprobs))
        last.text = ""
        return [*out, *self._calls.finish(last)]


async def shaped(deltas: AsyncIterator[Delta], request: GenerationRequest) -> AsyncIterator[Delta]:
    """A server's plain-text answer shaped into tool calls (llama-server with a template without tools)."""
    shaper = AnswerShaper(request)
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            if delta.finish_reason is not None:
                for out in shaper.end(delta, delta.logprobs):
                    yield out
            else:
                for out in shaper.piece(delta.text, delta.logprobs):
                    yield out


def _with_logprobs(deltas: list[Delta], logprobs: list[dict[str, Any]] | None) -> Iterator[Delta]:
    if logprobs and not deltas:
        yield Delta(text="", logprobs=logprobs)
        return
    for i, delta in enumerate(deltas):
        if i == 0 and logprobs:
            delta.logprobs = logprobs
        yield delta
