"""Counting a prompt's tokens in the router, so a request over the context window is refused
before any move: a 400 in milliseconds instead of a swap (or an engine start) first.

Each engine keeps tokenizers of its model for this, loaded once and kept in every tier (they
are small). Engines whose tokenizer cannot be loaded here (no `transformers` in the router's
environment, no tokenizer files) skip the check; the engine itself still refuses later.

Two rules keep one long prompt from holding its model (an 8 MB prompt took 25 s to tokenize,
under a lock every other request for the model waited on):
- a prompt that cannot fit is refused from its byte length before it is tokenized: no token
  covers more bytes than its own text has, so bytes / the longest token's bytes is a lower
  bound of its tokens (as llama.cpp's check does from the GGUF vocabulary);
- no lock is held across a tokenization: each concurrent check borrows its own tokenizer
  from a small pool (a fast tokenizer must not be shared across threads).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clearml_umem.engines.base import EngineError, GenerationRequest, InvalidRequest
from clearml_umem.engines.tool_calls import chat_inputs

NORMALIZER_SLACK = 4
"""A Unicode normalizer (NFKC...) can shrink text, at most from a 4-byte character to a 1-byte
one ("𝐀" -> "A"): with one, the byte bound is divided by this to stay a lower bound."""

TOKENIZERS_PER_MODEL = 4
"""Most tokenizers one model's checks hold (each a copy of the vocabulary); a fifth check at once
waits for one to be free, which the byte bound keeps short."""

_EXPANDING_NORMALIZERS = frozenset({"Prepend", "Replace"})
"""Normalizers of SentencePiece-converted tokenizers that only add bytes (a leading `▁`,
spaces written `▁`), checked per instance for Replace."""


def prompt_text(request: GenerationRequest) -> str:
    """The text the client sent as its prompt (the chat template only adds to it)."""
    if request.is_chat:
        return "".join(str(m.get("content") or "") for m in request.messages or ())
    return request.prompt or ""


@dataclass(frozen=True)
class PromptBound:
    """How long a model's prompts may be in bytes, known without its tokenizer: the router hands
    these to its parser processes, so that a multi-megabyte prompt that cannot fit is refused
    where it was parsed and never comes back into the router's process."""

    context_length: int
    bytes_per_token: int
    """The most bytes of a prompt one token may cover: the longest token's bytes, times the
    normalizer's slack where one may shrink text."""

    def tokens_at_least(self, text_bytes: int) -> int:
        """A lower bound of a prompt's tokens from its bytes alone (no tokenizing)."""
        return -(-text_bytes // self.bytes_per_token)


def refuse_if_cannot_fit(name: str, bound: PromptBound, text_bytes: int, max_tokens: int | None, param: str) -> None:
    """A 400 naming the prompt's field when even its fewest possible tokens and `max_tokens` (one,
    when not yet known: the model's defaults fill it in later) cannot fit the context window."""
    at_least = bound.tokens_at_least(text_bytes)
    if at_least + (max_tokens or 1) > bound.context_length:
        asked = (f"the request asks for max_tokens={max_tokens}. Shorten the prompt or lower max_tokens."
                 if max_tokens else "no room is left for even one generated token. Shorten the prompt.")
        raise InvalidRequest(
            f"model {name!r} is served with a context of {bound.context_length} tokens; the prompt has at least "
            f"{at_least} tokens and {asked}", param=param, code="context_length_exceeded")


def refuse_by_length(name: str, context_length: int | None, request: GenerationRequest,
                     longest_token_bytes: int | None, slack: int = 1) -> None:
    """A 400 naming the prompt when even its fewest possible tokens cannot fit the context window."""
    if not context_length or not longest_token_bytes:
        return
    refuse_if_cannot_fit(name, PromptBound(context_length, longest_token_bytes * slack),
                         len(prompt_text(request).encode("utf-8")), request.max_tokens,
                         "messages" if request.is_chat else "prompt")


def byte_bound(tokenizer: Any) -> tuple[int, int] | None:
    """(longest token's bytes, slack) when every byte of any text is covered by some token of a
    fast tokenizer (byte-level BPE, or BPE with byte fallback); None when a token may stand for
    unbounded text (an unknown token, whitespace that is dropped, accents stripped)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except (ValueError, AttributeError):
        return None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    if not (byte_level or model.get("byte_fallback")):
        return None
    slack = 1
    for norm in _flatten(spec.get("normalizer")):
        kind = norm.get("type")
        if kind in ("Strip", "StripAccents"):
            return None
        pattern = norm.get("pattern") or {}
        content = str(norm.get("content", "")).encode()
        shrinks = kind == "Replace" and ("String" not in pattern or len(content) < len(str(pattern["String"]).encode()))
        if shrinks or kind not in _EXPANDING_NORMALIZERS:
            slack = NORMALIZER_SLACK
    longest = max((len(t.encode("utf-8")) for t in tokenizer.get_vocab()), default=0)
    return (longest, slack) if longest else None


def _flatten(normalizer: Any) -> list[dict[str, Any]]:
    if not isinstance(normalizer, dict):
        return []
    if normalizer.get("type") == "Sequence":
        return [n for child in normalizer.get("normalizers") or () for n in _flatten(child)]
    return [normalizer]


def _load_tokenizer(weights: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(weights)


class PromptCounter:
    """Token counts for one model's prompts, safe from any thread, with no lock held while tokenizing:
    each check borrows a tokenizer of its own (at most `TOKENIZERS_PER_MODEL`)."""

    def __init__(self, name: str, weights: Path, loader: Callable[[Path], Any] = _load_tokenizer) -> None:
        self.name = name
        self.weights = weights
        self._loader = loader
        self._lock = threading.Condition()
        self._free: list[Any] = []
        self._loaded = 0
        self._loading = 0
        self._unavailable = False
        self._bound: tuple[int, int] | None = None

    def ids(self, request: GenerationRequest, context_length: int | None = None) -> list[int] | None:
        """The prompt's token ids as the model sees them (chat template applied); None when unknown.

        With `context_length`, a prompt that cannot fit is refused from its length first (before
        it waits for a tokenizer, once the first one was loaded)."""
        if self._bound is not None:
            refuse_by_length(self.name, context_length, request, *self._bound)
        tokenizer = self._borrow()
        if tokenizer is None:
            return None
        try:
            if self._bound is not None:
                refuse_by_length(self.name, context_length, request, *self._bound)
            return prompt_ids(self.name, request, tokenizer)
        finally:
            with self._lock:
                self._free.append(tokenizer)
                self._lock.notify()

    def count(self, request: GenerationRequest, context_length: int | None = None) -> int | None:
        ids = self.ids(request, context_length)
        return None if ids is None else len(ids)

    def learn(self) -> None:
        """Load the first tokenizer now, if none was: the router asks at start, in the background,
        so that its parser processes know this model's byte bound before its first request."""
        tokenizer = self._borrow()
        if tokenizer is not None:
            with self._lock:
                self._free.append(tokenizer)
                self._lock.notify()

    def bound(self, context_length: int | None) -> PromptBound | None:
        """The byte bound of this model's prompts, once its first tokenizer was loaded (None before,
        or for a tokenizer whose tokens may stand for unbounded text)."""
        if not context_length or self._bound is None:
            return None
        longest, slack = self._bound
        return PromptBound(context_length, longest * slack)

    @property
    def tokenizers(self) -> int:
        """How many tokenizers the pool holds: as many as checks ran at once, at most `TOKENIZERS_PER_MODEL`."""
        return self._loaded

    def _borrow(self) -> Any:
        """A tokenizer nobody else uses now: a free one, else a new one (loaded outside the lock), else
        the next one given back."""
        with self._lock:
            while True:
                if self._unavailable:
                    return None
                if self._free:
                    return self._free.pop()
                if self._loaded + self._loading < TOKENIZERS_PER_MODEL:
                    self._loading += 1
                    break
                self._lock.wait()
        try:
            tokenizer = self._loader(self.weights)
        except Exception:  # noqa: BLE001 - no tokenizer here: the engine checks later instead
            with self._lock:
                self._unavailable = True
                self._loading -= 1
                self._lock.notify_all()
            return None
        bound = byte_bound(tokenizer) if self._loaded == 0 else self._bound
        with self._lock:
            self._bound = bound
            self._loaded += 1
            self._loading -= 1
        return tokenizer


def apply_template(name: str, tokenizer: Any, messages: list[dict[str, Any]],
                   tools: list[dict[str, Any]] | None = None) -> str:
    """The chat template applied; a template that refuses the conversation (Mistral's and Llama-2's
    `raise_exception` for a system message or roles that do not alternate) is the client's 400,
    with the template's own message, as vLLM answers."""
    from jinja2.exceptions import TemplateError, TemplateSyntaxError

    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest(f"model {name!r} has no chat template; use /v1/completions", param="messages")
    try:
        return str(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False))
    except TemplateSyntaxError as exc:
        raise EngineError(f"model {name!r}: its chat template is broken: {exc}") from None
    except TemplateError as exc:
        raise InvalidRequest(f"model {name!r}'s chat template refused the messages: {exc}",
                             param="messages", code="invalid_chat_template_input") from None


def prompt_ids(name: str, request: GenerationRequest, tokenizer: Any) -> list[int]:
    if request.is_chat:
        messages, tools = chat_inputs(tokenizer, request.messages or [], request.options)
        text = apply_template(name, tokenizer, messages, tools)
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
