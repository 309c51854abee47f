"""Function calling for the transformers engine: the prompt with tools, and the answer as calls.

The prompt: the model's own chat template gets `tools=` (and the conversation's `tool_calls`
and `tool` messages) as Hugging Face's templates expect them. A template that does not mention
tools (a model not trained for them, the tiny test models) would silently drop them; for it,
the tools and the call format (Hermes' `<tool_call>{...}</tool_call>`, which Qwen and many
fine-tunes use) are described in a system message, and earlier calls are written in that format.

The answer (`CallShaper`), by `tool_choice`:
- a named function: decoding is constrained to its arguments (`engines.constrained`), so every
  piece of text is a piece of the arguments, streamed as OpenAI does: one fragment with the
  call's id and name, then `function.arguments` in pieces;
- `required`: constrained to a JSON list of `{"name", "arguments"}`; each call's header is sent
  once its name is complete, its arguments as they arrive;
- `auto`: free text; an answer that opens like a call (`<tool_call>`, `[TOOL_CALLS]`, or a JSON
  object/list naming a tool: the Hermes/Qwen, Mistral and Llama 3 forms) is held back and parsed
  at its end, anything else streams as content.
An answer that ends in calls has `finish_reason: "tool_calls"`.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from typing import Any

from clearml_umem.engines.base import Delta

FALLBACK_INSTRUCTIONS = (
    "You can call functions. To call one, answer with <tool_call>{\"name\": <function name>, \"arguments\": "
    "<arguments as a JSON object>}</tool_call>, one block per call. The functions:\n"
)


def chat_inputs(tokenizer: Any, messages: list[dict[str, Any]],
                options: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The conversation and tools for the chat template (or the fallback above, tools None)."""
    tools = options.get("tools") or None
    template = str(getattr(tokenizer, "chat_template", "") or "")
    if "tools" not in template and (tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)):
        return plain_conversation(messages, tools), None
    return [_with_arguments_parsed(m) for m in messages], tools


def _with_arguments_parsed(message: dict[str, Any]) -> dict[str, Any]:
    """Templates index `tool_call.function.arguments` as a mapping (Qwen, Llama 3); OpenAI sends a string."""
    if not message.get("tool_calls"):
        return {**message, "content": message.get("content") or ""}
    calls = []
    for call in message["tool_calls"]:
        function = dict(call.get("function") or {})
        with contextlib.suppress(json.JSONDecodeError):
            function["arguments"] = json.loads(function.get("arguments") or "{}")
        calls.append({**call, "function": function})
    return {**message, "content": message.get("content") or "", "tool_calls": calls}


def plain_conversation(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in messages:
        content = message.get("content") or ""
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            content += "<tool_call>" + json.dumps({"name": function.get("name"),
                                                   "arguments": _loads(function.get("arguments"))}) + "</tool_call>"
        out.append({"role": message["role"], "content": content})
    if tools:
        described = FALLBACK_INSTRUCTIONS + json.dumps([t["function"] for t in tools])
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": described + "\n\n" + out[0]["content"]}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def _loads(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError:
        return text


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _header(index: int, name: str) -> dict[str, Any]:
    return {"index": index, "id": call_id(), "type": "function", "function": {"name": name, "arguments": ""}}


def _arguments(index: int, text: str) -> dict[str, Any]:
    return {"index": index, "function": {"arguments": text}}


class CallShaper:
    """Turns the engine's text pieces into content and tool-call Deltas (see the module's docstring)."""

    def __init__(self, options: dict[str, Any]) -> None:
        tools = options.get("tools") or []
        self._names = {t["function"]["name"] for t in tools}
        choice = options.get("tool_choice", "auto")
        self.mode = "named" if isinstance(choice, dict) else "required" if choice == "required" else "auto"
        self._named = choice["function"]["name"] if isinstance(choice, dict) else None
        self.calls = 0
        self._text = ""
        self._cursor = 0  # required: where scanning continues in _text
        self._in_arguments = False
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._holding: bool | None = None  # auto: None until the first non-space character

    def feed(self, text: str) -> list[Delta]:
        if not text:
            return []
        if self.mode == "named":
            fragments = []
            if self.calls == 0:
                self.calls = 1
                fragments.append(_header(0, self._named or ""))
            fragments.append(_arguments(0, text))
            return [Delta(text="", tool_calls=fragments)]
        self._text += text
        if self.mode == "required":
            fragments = self._scan()
            return [Delta(text="", tool_calls=fragments)] if fragments else []
        if self._holding is None:
            start = self._text.lstrip()
            if not start:
                return []
            self._holding = start[0] in "<[{"
        if self._holding:
            return []
        out, self._text = self._text, ""
        return [Delta(text=out)]

    def finish(self, end: Delta) -> list[Delta]:
        """The last Deltas; `end` (the engine's finish Delta) comes last, its reason made
        `tool_calls` when the answer was calls."""
        out: list[Delta] = []
        if self.mode == "auto" and self._holding:
            calls, content = parse_calls(self._text, self._names)
            if calls:
                fragments = []
                for i, (name, arguments) in enumerate(calls):
                    fragments += [_header(i, name), _arguments(i, arguments)]
                self.calls = len(calls)
                out.append(Delta(text=content, tool_calls=fragments))
            else:
                out.append(Delta(text=self._text))
        if self.calls and end.finish_reason == "stop":
            end.finish_reason = "tool_calls"
        return [*out, end]

    _HEADER = re.compile(r'\s*\}?\s*[\[,]?\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*')

    def _scan(self) -> list[dict[str, Any]]:
        """`required`: headers as names complete, arguments as their characters arrive."""
        fragments: list[dict[str, Any]] = []
        while True:
            if not self._in_arguments:
                match = self._HEADER.match(self._text, self._cursor)
                if match is None:
                    return fragments
                fragments.append(_header(self.calls, match.group(1)))
                self.calls += 1
                self._cursor = match.end()
                self._in_arguments = True
                self._depth = 0
            start = self._cursor
            while self._cursor < len(self._text):
                ch = self._text[self._cursor]
                self._cursor += 1
                if self._in_string:
                    if self._escaped:
                        self._escaped = False
                    elif ch == "\\":
                        self._escaped = True
                    elif ch == '"':
                        self._in_string = False
                elif ch == '"':
                    self._in_string = True
                elif ch in "{[":
                    self._depth += 1
                elif ch in "}]":
                    self._depth -= 1
                    if self._depth == 0:
                        break
            piece = self._text[start:self._cursor]
            if piece:
                fragments.append(_arguments(self.calls - 1, piece))
            if self._depth != 0 or not piece.rstrip().endswith(("}", "]")):
                return fragments
            self._in_arguments = False  # the call object's "}" is skipped by the next header match


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_calls(text: str, names: set[str]) -> tuple[list[tuple[str, str]], str]:
    """(calls as (name, arguments JSON), remaining content) from a free-text answer; no calls if
    none parse or one names an unknown tool."""
    blocks = _HERMES.findall(text)
    if blocks:
        content = _HERMES.sub("", text).strip()
        candidates = [_loads(b) for b in blocks]
    else:
        stripped = text.strip().removeprefix("[TOOL_CALLS]").removeprefix("<|python_tag|>").strip()
        value = _loads(stripped)
        candidates = value if isinstance(value, list) else [value]
        content = ""
    calls = []
    for value in candidates:
        if not isinstance(value, dict) or value.get("name") not in names:
            return [], text
        arguments = value.get("arguments", value.get("parameters", {}))
        calls.append((value["name"], arguments if isinstance(arguments, str) else json.dumps(arguments)))
    return calls, content
