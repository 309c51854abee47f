"""Counting a prompt's tokens in the router, so a request over the context window is refused
before any move: a 400 in milliseconds instead of a swap (or an engine start) first.

Each engine keeps a tokenizer of its model for this, loaded once and kept in every tier (it
is small). Engines whose tokenizer cannot be loaded here (no `transformers` in the router's
environment, no tokenizer files) skip the check; the engine itself still refuses later.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from clearml_umem.engines.base import GenerationRequest, InvalidRequest
from clearml_umem.engines.tool_calls import render_chat


class PromptCounter:
    """Thread-safe token counts for one model's prompts (tokenizers are not safe to share across threads)."""

    def __init__(self, name: str, weights: Path) -> None:
        self.name = name
        self.weights = weights
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._unavailable = False

    def ids(self, request: GenerationRequest) -> list[int] | None:
        """The prompt's token ids as the model sees them (chat template applied); None when unknown."""
        with self._lock:
            tokenizer = self._load()
            if tokenizer is None:
                return None
            return prompt_ids(self.name, request, tokenizer)

    def count(self, request: GenerationRequest) -> int | None:
        ids = self.ids(request)
        return None if ids is None else len(ids)

    def _load(self) -> Any:
        if self._tokenizer is None and not self._unavailable:
            try:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.weights)
            except Exception:  # noqa: BLE001 - no tokenizer here: the engine checks later instead
                self._unavailable = True
        return self._tokenizer


def prompt_ids(name: str, request: GenerationRequest, tokenizer: Any) -> list[int]:
    if request.is_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest(f"model {name!r} has no chat template; use /v1/completions", param="messages")
        text = render_chat(name, tokenizer, request.messages or [], request.options)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(request.prompt or "")["input_ids"])


def check_fits(name: str, context_length: int | None, prompt_tokens: int, request: GenerationRequest) -> None:
    """A 400 naming the prompt's field when prompt plus max_tokens exceed the context window."""
    param = "messages" if request.is_chat else "prompt"
    if prompt_tokens == 0:
        raise InvalidRequest("the prompt is empty", param=param)
    if context_length and prompt_tokens + request.max_tokens > context_length:
        raise InvalidRequest(
            f"model {name!r} has a context length of {context_length} tokens; the request has "
            f"{prompt_tokens} prompt tokens and asks for max_tokens={request.max_tokens} "
            f"({prompt_tokens + request.max_tokens} in all). Shorten the prompt or lower max_tokens.",
            param=param, code="context_length_exceeded")
