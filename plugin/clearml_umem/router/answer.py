"""Tool calls and logprobs in OpenAI's answer shapes, from the pieces engines stream.

Engines stream tool calls as OpenAI does (`Delta.tool_calls`: fragments keyed by `index`, the
id and name once, the arguments in pieces) and logprobs per token in the chat shape
(`Delta.logprobs`). A streamed answer passes both on chunk by chunk; a whole answer joins
them here. /v1/completions gets its own, older logprobs shape.
"""

from __future__ import annotations

from typing import Any


class ToolCallJoin:
    """Joins streamed `tool_calls` fragments into whole calls, in index order."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}

    def add(self, fragments: list[dict[str, Any]]) -> None:
        for fragment in fragments:
            index = int(fragment.get("index", 0))
            call = self._calls.setdefault(index, {"id": "", "type": "function",
                                                  "function": {"name": "", "arguments": ""}})
            if fragment.get("id"):
                call["id"] = fragment["id"]
            function = fragment.get("function") or {}
            if function.get("name"):
                call["function"]["name"] += function["name"]
            if function.get("arguments"):
                call["function"]["arguments"] += function["arguments"]

    def calls(self) -> list[dict[str, Any]]:
        return [self._calls[i] for i in sorted(self._calls)]


def chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    return None if entries is None else {"content": entries, "refusal": None}


def completion_logprobs(entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """OpenAI's completions shape: parallel lists, the alternatives as {token: logprob} maps, and
    each token's character offset in the answer (from `offset`, for a streamed chunk)."""
    tokens: list[str] = []
    text_offset: list[int] = []
    for entry in entries:
        tokens.append(entry["token"])
        text_offset.append(offset)
        offset += len(entry["token"])
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{alt["token"]: alt["logprob"] for alt in e.get("top_logprobs") or ()} for e in entries],
            "text_offset": text_offset}


def chat_message(text: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant message; with tool calls and no text, `content` is null as OpenAI sends it."""
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message
