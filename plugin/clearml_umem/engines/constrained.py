"""Constrained decoding for the transformers engine: `response_format` and `tool_choice`
`required`/named are enforced token by token, so the answer parses and matches its schema
even from a model that would not comply by itself.

The library is llguidance (Microsoft's guidance-ai, MIT; also a structured-output backend of
vLLM and of llama.cpp). Why it over xgrammar, outlines and lm-format-enforcer:
- speed on a CPU: a token mask costs ~0.1 ms here (measured on the tiny models' tokenizer,
  2 shared cores), and a schema needs no ahead-of-time compilation (a matcher is ready in
  under 1 ms), so a request with a new schema does not wait for one;
- a small Rust wheel with no torch or transformers pin (xgrammar and outlines pin torch-era
  versions; lm-format-enforcer walks Python token trees and is slower per token);
- it reports what it cannot enforce (an unknown `format`, a regex look-around, a remote
  `$ref`) as an error naming the keyword, which becomes a 400 here instead of an answer that
  silently ignores part of the schema.
Its own `apply_token_bitmask_inplace` is a `torch.compile`d kernel that took 200 ms per token
on this CPU; the mask is applied here with two tensor ops instead.

Nothing here runs for a request without a grammar: the processor is only added when asked.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from transformers import LogitsProcessor

from clearml_umem.engines.base import EngineError, InvalidRequest

JSON_COMPILE_OPTIONS = {"whitespace_flexible": False}
"""Compact JSON: no token is spent on indentation a random model might loop in."""


def constrained_schema(options: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The JSON schema the answer must match and the request field it comes from; None: free text.

    `tool_choice` `required`: a list of calls (one unless `parallel_tool_calls`), each
    `{"name": one of the tools, "arguments": its parameters}`; a named function: its arguments
    alone (the router knows the name). Tools win over `response_format`, as in vLLM.
    """
    tools = options.get("tools") or []
    choice = options.get("tool_choice")
    if tools and choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                   "arguments": parameters_schema(t)},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                                  "minItems": 1}
        if options.get("parallel_tool_calls") is False:
            schema["maxItems"] = 1
        return schema, "tools"
    if tools and isinstance(choice, dict):
        tool = next(t for t in tools if t["function"]["name"] == choice["function"]["name"])
        return parameters_schema(tool), "tools"
    fmt = options.get("response_format")
    if fmt and fmt["type"] == "json_schema":
        return fmt["json_schema"].get("schema") or {"type": "object"}, "response_format.json_schema.schema"
    if fmt and fmt["type"] == "json_object":
        return {"type": "object"}, "response_format"
    return None


def parameters_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """A function's parameters; none given means it takes none (OpenAI's reading)."""
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def grammar(name: str, options: dict[str, Any]) -> str | None:
    """The llguidance grammar for this request, checked; a schema it cannot enforce is a 400
    naming the field and, in llguidance's words, the keyword."""
    found = constrained_schema(options)
    if found is None:
        return None
    import llguidance

    schema, param = found
    try:
        text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_COMPILE_OPTIONS)
    except ValueError as exc:
        raise InvalidRequest(f"the JSON schema in '{param}' is not valid: {exc}", param=param) from None
    error = llguidance.LLMatcher.validate_grammar(text)
    if error:
        raise InvalidRequest(f"the JSON schema in '{param}' cannot be enforced by model {name!r} (engine transformers, "
                             f"llguidance): {error.strip()}", param=param)
    return text


class GuidanceTokenizers:
    """llguidance's view of the engine's tokenizer, built on first use (about a second for a large
    vocabulary) and kept while that tokenizer is the engine's (a reload brings a new one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._built: Any = None

    def get(self, tokenizer: Any, eos: list[int]) -> Any:
        """The tokenizer's own vocabulary (a model's logits may be wider: `GrammarProcessor` bans the rest)."""
        import llguidance.hf

        with self._lock:
            if self._tokenizer is not tokenizer:
                self._built = llguidance.hf.from_tokenizer(tokenizer, eos_token=eos[0] if eos else None)
                self._tokenizer = tokenizer
            return self._built


BIT_VALUES = torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32)
"""Bit i of an int32 word, for unpacking llguidance's token bitmask."""


class GrammarProcessor(LogitsProcessor):
    """Masks every token the grammar does not allow next; feeds the grammar each chosen token."""

    def __init__(self, ll_tokenizer: Any, grammar_text: str, prompt_length: int) -> None:
        import llguidance

        self._matcher = llguidance.LLMatcher(ll_tokenizer, grammar_text)
        if self._matcher.is_error():
            raise EngineError(f"the grammar could not start: {self._matcher.get_error()}")
        words = (ll_tokenizer.vocab_size + 31) // 32
        self._mask = torch.zeros((words,), dtype=torch.int32)
        self._vocab = ll_tokenizer.vocab_size
        self._seen = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        new = input_ids[0, self._seen:].tolist()
        self._seen = input_ids.shape[1]
        if new and not self._matcher.consume_tokens(new):
            raise EngineError(f"constrained decoding lost its place: {self._matcher.get_error()}")
        self._matcher.unsafe_compute_mask_ptr(self._mask.data_ptr(), self._mask.numel() * 4)
        allowed = ((self._mask.unsqueeze(1) & BIT_VALUES) != 0).reshape(-1)[:self._vocab]
        width = min(self._vocab, scores.shape[-1])
        scores[:, :width] = scores[:, :width].masked_fill(~allowed[:width].to(scores.device), float("-inf"))
        if scores.shape[-1] > width:
            scores[:, width:] = float("-inf")
        return scores
