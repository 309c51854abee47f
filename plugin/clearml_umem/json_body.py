"""A request body's JSON, parsed with its shape bounded: the one place that decides whether a body
is an object the layers behind the router can take, and what a client is told when it is not.

The router parses small bodies with it on its event loop; big ones are parsed with it in a parser
process (`parser_child.py`, `router/schemas.prepare_body`), so that what a client sends never costs
the router more than these limits allow.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

MAX_JSON_DEPTH = 32
"""Deeper than any OpenAI request (content parts are 4 levels); deeper bodies are refused before
anything walks them recursively (Python's json and pydantic would hit the recursion limit: a 500)."""

DEFAULT_MAX_MESSAGES = 10000
"""Messages per chat request: far more than any context window holds turns of (a 128k context
is ~30k four-token turns, and each message costs template tokens too), so a real conversation
never meets it, while a body of 200,000 one-character messages is refused before pydantic builds
200,000 objects for it."""

VALUES_PER_MESSAGE = 10
"""JSON values (keys included) a body may hold per message the router takes (`--max-messages`):
100,000 by default. A chat message is 5 (`{"role": ..., "content": ...}`), an assistant's tool call
about 15, so any real conversation fits; what the parse of a body costs follows its number of values
more than its bytes (an 8 MB body of 200,000 one-character messages holds a million, and costs ten
times an 8 MB prompt), so this bounds the cost of any body the router parses itself."""


class BodyProblem(Exception):
    """Why a body is refused: the client's 400, with the field to name as OpenAI's `param`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def as_dict(self) -> dict[str, str | None]:
        return {"message": self.message, "param": self.param, "code": self.code}


def max_values(max_messages: int) -> int:
    return VALUES_PER_MESSAGE * max_messages


def load_body(raw: bytes, chat: bool, max_messages: int = DEFAULT_MAX_MESSAGES) -> dict[str, Any]:
    """One inference body as a JSON object, refused (`BodyProblem`) when it holds more messages
    than `max_messages` or more values than `max_values(max_messages)`."""
    data = _parse(raw)
    messages = data.get("messages")
    if chat and isinstance(messages, list) and len(messages) > max_messages:
        raise BodyProblem(f"'messages' holds {len(messages)} messages; this server takes at most {max_messages} "
                          "per request (--max-messages)", param="messages", code="too_many_messages")
    total, heaviest = _measure(data)
    limit = max_values(max_messages)
    if total > limit:
        raise BodyProblem(f"The JSON body holds {total} values (keys included), most of them in '{heaviest}'; "
                          f"this server takes at most {limit} per request ({VALUES_PER_MESSAGE} x --max-messages)",
                          param=heaviest, code="too_many_values")
    return data


def load_object(raw: bytes) -> dict[str, Any]:
    """Any other JSON body (an admin call's, a Triton request's): an object, its shape checked."""
    data = _parse(raw)
    _measure(data)
    return data


def _parse(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, checked for what would break the layers behind it: numbers no
    field can hold, and strings that are not valid Unicode (a lone surrogate, which JSON's escapes
    allow and every tokenizer refuses); `_measure` then refuses nesting beyond `MAX_JSON_DEPTH`.

    orjson parses several times faster than `json` and refuses, in the parser, what the stdlib
    lets through: lone surrogates, NaN, integers past 64 bits as exact values, nesting past 1024.
    The stdlib only re-reads a body orjson refused for a surrogate, to name the field."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        reason = str(exc)
        if "surrogate" in reason:
            _name_bad_string(raw)
        if "recursion" in reason:
            raise BodyProblem(f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep") from None
        if reason.startswith("number"):
            raise BodyProblem(f"A number in the JSON body is out of range ({reason}); integers must fit in 64 bits"
                              ) from None
        raise BodyProblem(f"We could not parse the JSON body of your request: {reason}") from None
    if not isinstance(data, dict):
        raise BodyProblem(f"The request body must be a JSON object, got {type(data).__name__}")
    return data


def _measure(data: dict[str, Any]) -> tuple[int, str]:
    """Every JSON value in the body (objects, arrays, scalars, and keys: a unique key costs a parse
    more than a value), and the top-level field that holds the most of them; nesting beyond
    `MAX_JSON_DEPTH` is refused on the way. One walk without recursion, before pydantic or anything
    else walks it recursively."""
    total = 1
    heaviest, most = "", -1
    for key, top in data.items():
        count = 2
        stack: list[tuple[Any, int]] = [(top, 2)] if isinstance(top, (dict, list)) else []
        while stack:
            value, depth = stack.pop()
            if depth > MAX_JSON_DEPTH:
                raise BodyProblem(f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep")
            children = value.values() if isinstance(value, dict) else value
            count += 2 * len(children) if isinstance(value, dict) else len(children)
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
        total += count
        if count > most:
            heaviest, most = str(key)[:100], count
    return total, heaviest


def _name_bad_string(raw: bytes) -> None:
    """A 400 naming the field whose text holds a lone surrogate (orjson only gives a position)."""
    try:
        data = json.loads(raw if isinstance(raw, (bytes, bytearray)) else bytes(raw))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in value.items())
            bad_key = next((k for k in value if isinstance(k, str) and not _is_unicode(k)), None)
            if bad_key is not None:
                raise BodyProblem(f"A key in '{path or 'the body'}' is not valid Unicode (a lone surrogate)",
                                  param=path or None)
        elif isinstance(value, list):
            stack.extend((v, f"{path}.{i}") for i, v in enumerate(value))
        elif isinstance(value, str) and not _is_unicode(value):
            raise BodyProblem(f"Invalid value for '{path}': the text is not valid Unicode (a lone surrogate such as "
                              "\\ud800 without its pair)", param=path)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
