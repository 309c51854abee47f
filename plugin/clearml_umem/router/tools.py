"""OpenAI's function calling, structured output and logprobs options: checked here, once, for
every engine, so that a client's mistake is a 400 naming the field before the request waits
for its model (a named tool that is not among `tools`, `top_logprobs` without `logprobs`, a
`json_schema` without a schema...).

What passes is handed to the engine as the client sent it (`GenerationRequest.options`):
vLLM and llama-server take OpenAI's shapes themselves, the transformers engine reads the same
shapes (`engines.constrained`, `engines.tool_calls`).
"""

from __future__ import annotations

import re
from typing import Any

from clearml_umem.router.errors import bad_request

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""OpenAI's rule for function names."""

MAX_TOOLS = 128
"""OpenAI's limit on `tools`."""

MAX_TOP_LOGPROBS = 20
"""OpenAI's limit for chat; completions take `logprobs` up to 5."""

MAX_COMPLETION_LOGPROBS = 5

TOOL_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "logprobs", "top_logprobs")
"""Chat options this module checks; all of them reach the engine in `GenerationRequest.options`."""


def check_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise bad_request("Invalid value for 'tools': must be a list of tools", param="tools")
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"Invalid value for 'tools': at most {MAX_TOOLS} tools, got {len(tools)}", param="tools")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request(f"Invalid value for '{where}.type': only 'function' tools are supported",
                              param=f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise bad_request(f"'{where}.function' is required", param=f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise bad_request(f"Invalid value for '{where}.function.name': {name!r}; names are 1-64 letters, "
                              "digits, underscores or dashes", param=f"{where}.function.name")
        if name in names:
            raise bad_request(f"Invalid value for '{where}.function.name': {name!r} is defined twice",
                              param=f"{where}.function.name")
        names.add(name)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise bad_request(f"Invalid value for '{where}.function.parameters': must be a JSON Schema object",
                              param=f"{where}.function.parameters")
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise bad_request(f"Invalid value for '{where}.function.description': must be a string",
                              param=f"{where}.function.description")
        if function.get("strict") is not None and not isinstance(function["strict"], bool):
            raise bad_request(f"Invalid value for '{where}.function.strict': must be a boolean",
                              param=f"{where}.function.strict")
    return tools


def check_tool_choice(choice: Any, tools: list[dict[str, Any]] | None) -> None:
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(f"Invalid value for 'tool_choice': {choice!r}; expected 'none', 'auto', 'required' "
                              "or {\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")
        if choice == "required" and not tools:
            raise bad_request("'tool_choice' is 'required' but no 'tools' were given", param="tool_choice")
        return
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(choice.get("function"),
                                                                                            dict):
        raise bad_request("Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
                          "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")
    name = choice["function"].get("name")
    known = [t["function"]["name"] for t in tools or ()]
    if name not in known:
        raise bad_request(f"Invalid value for 'tool_choice.function.name': {name!r} is not among 'tools' "
                          f"({', '.join(known) or 'none given'})", param="tool_choice.function.name")


def check_response_format(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        kind = value.get("type") if isinstance(value, dict) else value
        raise bad_request(f"Invalid value for 'response_format.type': {kind!r}; expected 'text', 'json_object' "
                          "or 'json_schema'", param="response_format.type")
    if value["type"] != "json_schema":
        return
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request("'response_format.json_schema' is required when 'response_format.type' is 'json_schema'",
                          param="response_format.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise bad_request(f"Invalid value for 'response_format.json_schema.name': {name!r}; names are 1-64 "
                          "letters, digits, underscores or dashes", param="response_format.json_schema.name")
    if not isinstance(spec.get("schema", {}), dict):
        raise bad_request("Invalid value for 'response_format.json_schema.schema': must be a JSON Schema object",
                          param="response_format.json_schema.schema")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise bad_request("Invalid value for 'response_format.json_schema.strict': must be a boolean",
                          param="response_format.json_schema.strict")


def check_chat_logprobs(logprobs: Any, top_logprobs: Any) -> None:
    if logprobs is not None and not isinstance(logprobs, bool):
        raise bad_request("Invalid value for 'logprobs': must be a boolean", param="logprobs")
    if top_logprobs is None:
        return
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) \
            or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise bad_request(f"Invalid value for 'top_logprobs': must be a whole number from 0 to {MAX_TOP_LOGPROBS}, "
                          f"got {top_logprobs!r}", param="top_logprobs")
    if top_logprobs and not logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")


def check_completion_logprobs(logprobs: Any) -> None:
    if logprobs is None:
        return
    if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
        raise bad_request(f"Invalid value for 'logprobs': must be a whole number from 0 to {MAX_COMPLETION_LOGPROBS} "
                          f"(the top alternatives per token), got {logprobs!r}", param="logprobs")


def check_messages(messages: list[dict[str, Any]]) -> None:
    """Tool calls in the conversation: an assistant's `tool_calls` in OpenAI's shape, and every
    `tool` message answering a call by its id."""
    for i, message in enumerate(messages):
        calls = message.get("tool_calls")
        if calls is not None:
            if message.get("role") != "assistant":
                raise bad_request(f"Invalid value for 'messages.{i}.tool_calls': only assistant messages carry "
                                  "tool calls", param=f"messages.{i}.tool_calls")
            if not isinstance(calls, list):
                raise bad_request(f"Invalid value for 'messages.{i}.tool_calls': must be a list",
                                  param=f"messages.{i}.tool_calls")
            for j, call in enumerate(calls):
                where = f"messages.{i}.tool_calls.{j}"
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(call, dict) or not isinstance(call.get("id"), str) or not isinstance(function, dict) \
                        or not isinstance(function.get("name"), str) or not isinstance(function.get("arguments"), str):
                    raise bad_request(f"Invalid value for '{where}': expected {{\"id\": str, \"type\": \"function\", "
                                      "\"function\": {\"name\": str, \"arguments\": str}}", param=where)
        if message.get("role") == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise bad_request(f"'messages.{i}.tool_call_id' is required for a tool message",
                              param=f"messages.{i}.tool_call_id")


def chat_options(extra: dict[str, Any]) -> dict[str, Any]:
    """The checked tool, format and logprob options that ask for something (defaults dropped, so a
    request that does not use them reaches the engine exactly as before)."""
    tools = extra.get("tools")
    if tools is not None:
        tools = check_tools(tools) or None
    choice = extra.get("tool_choice")
    check_tool_choice(choice, tools)
    if extra.get("parallel_tool_calls") is not None and not isinstance(extra["parallel_tool_calls"], bool):
        raise bad_request("Invalid value for 'parallel_tool_calls': must be a boolean", param="parallel_tool_calls")
    check_response_format(extra.get("response_format"))
    check_chat_logprobs(extra.get("logprobs"), extra.get("top_logprobs"))
    options: dict[str, Any] = {}
    if tools and choice != "none":
        options["tools"] = tools
        if choice is not None:
            options["tool_choice"] = choice
        if extra.get("parallel_tool_calls") is not None:
            options["parallel_tool_calls"] = extra["parallel_tool_calls"]
    fmt = extra.get("response_format")
    if fmt is not None and fmt["type"] != "text":
        options["response_format"] = fmt
    if extra.get("logprobs"):
        options["logprobs"] = True
        if extra.get("top_logprobs"):
            options["top_logprobs"] = extra["top_logprobs"]
    return options


def completion_options(extra: dict[str, Any]) -> dict[str, Any]:
    logprobs = extra.get("logprobs")
    check_completion_logprobs(logprobs)
    return {} if logprobs is None else {"logprobs": logprobs}
