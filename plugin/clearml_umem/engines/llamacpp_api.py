"""What llama-server (llama.cpp as vendored by llama-cpp-python 0.3.36) takes of OpenAI's tool,
structured-output and logprobs options, and how the rest is translated.

Read from its sources (`tools/server/server-common.cpp`, `server-task.cpp`):
- `tools` and `tool_choice` need its Jinja chat templates (`--jinja`, on by default there and
  passed explicitly here); the model's template renders the tools and the call format is
  parsed (with a grammar forcing the calls for `required`).
- `tool_choice` is read as a string only: a named function would silently become `auto`. It is
  sent as `required` with `tools` cut down to that one function, which is what naming means.
- `response_format` `json_object`/`json_schema` becomes a grammar (its JSON-schema converter
  refuses what it cannot express with a 400, which reaches the client).
- `logprobs` maps to `n_probs`, the number of alternatives, and 0 means none at all: OpenAI's
  `top_logprobs: 0` (the chosen token's logprob only) is sent as 1 and the alternatives cut.
  Without `top_logprobs` llama-server would send 20 alternatives; OpenAI sends none.
- logprobs together with tools are refused by llama-server when streaming, which is how the
  router always talks to it: such a request is refused naming the model and engine.
- A chat template that does not take tools (no `tools` in it) makes llama-server's template
  analysis ignore them: `tool_choice: required` would be answered as free text. For such a
  model the router does what the transformers engine does (`engines.tool_calls`): the tools
  are described in a system message, `required`/named become a `json_schema` grammar of the
  calls (`engines.constrained.constrained_schema`), and the answer is shaped into calls here.
"""

from __future__ import annotations

from typing import Any

from clearml_umem.engines.base import GenerationRequest, InvalidRequest
from clearml_umem.engines.constrained import constrained_schema
from clearml_umem.engines.tool_calls import plain_conversation


def check_options(name: str, request: GenerationRequest) -> None:
    options = request.options
    if options.get("tools") and options.get("logprobs") is not None:
        raise InvalidRequest(f"'logprobs' together with 'tools' is not supported by model {name!r} (engine llamacpp): "
                             "llama-server does not give logprobs while it parses tool calls", param="logprobs")


def template_takes_tools(template: object) -> bool:
    return "tools" in str(template or "")


def adapt_body(body: dict[str, Any], request: GenerationRequest, takes_tools: bool = True) -> tuple[int | None, bool]:
    """Rewrite `body` (OpenAI's, as sent) for llama-server in place. Returns how many alternatives
    per token the client asked for (None: no logprobs), to cut llama-server's down to, and
    whether the router shapes the answer into tool calls itself (a template without tools)."""
    choice = body.get("tool_choice")
    if request.is_chat and body.get("tools") and not takes_tools:
        options = request.options
        body["messages"] = plain_conversation(body["messages"], options["tools"])
        found = constrained_schema(options)
        if found is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "tool_calls", "schema": found[0]}}
        for name in ("tools", "tool_choice", "parallel_tool_calls"):
            body.pop(name, None)
        return _logprobs(body, request), True
    if request.is_chat and not takes_tools and any(m.get("tool_calls") or m.get("role") == "tool"
                                                   for m in body["messages"]):
        body["messages"] = plain_conversation(body["messages"], None)
    if isinstance(choice, dict):
        wanted = choice["function"]["name"]
        body["tools"] = [t for t in body.get("tools") or () if t["function"]["name"] == wanted]
        body["tool_choice"] = "required"
    return _logprobs(body, request), False


def _logprobs(body: dict[str, Any], request: GenerationRequest) -> int | None:
    if request.is_chat:
        if not body.get("logprobs"):
            return None
        top = int(body.get("top_logprobs") or 0)
        body["top_logprobs"] = max(1, top)
        return top
    if body.get("logprobs") is None:
        return None
    top = int(body["logprobs"])
    body["logprobs"] = max(1, top)
    return top
