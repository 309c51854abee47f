"""OpenAI request bodies as pydantic models, and their translation into an engine request.

Validation happens here, before a request waits for its model: a bad field must cost a
400 in microseconds, not a swap-in first. Unknown fields are ignored, as OpenAI-compatible
servers do, so newer clients that send extra options keep working; but OpenAI options this
router does not implement are refused when they ask for something (tools, logprobs, JSON
mode...): ignoring them would hand the client another answer than it asked for. Sampling
options that only some engines honour (penalties, logit_bias with vLLM) pass to those.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from clearml_umem.engines import SAMPLING_OPTIONS
from clearml_umem.engines.base import GenerationRequest, InvalidRequest
from clearml_umem.engines.prompt_check import PromptBound, refuse_if_cannot_fit
from clearml_umem.json_body import DEFAULT_MAX_MESSAGES, BodyProblem, load_body, load_object
from clearml_umem.keep_alive import parse_keep_alive
from clearml_umem.router.errors import api_error, bad_request
from clearml_umem.router.parser_wire import BodyKind
from clearml_umem.router.tools import chat_options, check_messages, completion_options
from clearml_umem.spec import ModelSpec

DEFAULT_COMPLETION_MAX_TOKENS = 16
"""OpenAI's default for /v1/completions."""

DEFAULT_CHAT_MAX_TOKENS = 512
"""OpenAI lets a chat answer run to the context's end; capped so a request without max_tokens
does not hold a model for minutes, and at half the context so that the prompt still fits."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # function calling: an assistant's calls, and the id a tool message answers (checked in router.tools)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        """Checked by hand: pydantic's union errors name its internal union branches, not the problem."""
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(f"must be a string or a list of text parts, got {type(value).__name__}")
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"part {i} is of type {kind!r}; only 'text' content parts are supported")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part {i} needs a string 'text'")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class _Sampling(_Body):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: int | None = 1
    user: str | None = None
    # typed as OpenAI documents them, so a wrong one is a 400 here, not passed on to an engine
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    keep_alive: float | None = None
    """An extension, as Ollama's API has it: how long the model may stay unused after this request
    before it moves down a tier (seconds or `5m`, `never`/negative: keep it); parsed to seconds."""
    # kept, not dropped: the OpenAI options below are read from the extra fields
    model_config = ConfigDict(extra="allow", strict=True)

    def _option(self, name: str) -> Any:
        if name in type(self).model_fields:
            return getattr(self, name)
        return (self.model_extra or {}).get(name)

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive_seconds(cls, value: Any) -> float | None:
        return None if value is None else parse_keep_alive(value)

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are between -100 and 100, got {bias} for token {token}")
        return value

    refused_options: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _unsupported_options(self) -> _Sampling:
        """The first option set to something no engine here honours; defaults pass. Options some
        engines honour are checked against the model's engine in `to_generation_request`."""
        for name in self.refused_options:
            value = self._option(name)
            if not _is_default(name, value):
                raise PydanticCustomError("unsupported", "'{option}' is not supported by this server (got {value}); "
                                          "leave it unset", {"option": name, "value": json.dumps(value)})
        return self

    def engine_options(self, spec: ModelSpec) -> dict[str, Any]:
        """The options set for this request that the model's engine takes; a 400 for the others."""
        honoured = SAMPLING_OPTIONS.get(spec.engine, frozenset())
        asked = {name: value for name in sorted(PENALTY_OPTIONS)
                 if not _is_default(name, value := self._option(name))}
        asked.update(self.api_options())
        options: dict[str, Any] = {}
        for name, value in asked.items():
            if name not in honoured:
                engines = ", ".join(sorted(e for e, names in SAMPLING_OPTIONS.items() if name in names))
                raise bad_request(f"'{name}' is not supported by model '{spec.name}' (engine {spec.engine}); "
                                  f"models served by {engines} take it", param=name)
            options[name] = value
        return options

    def api_options(self) -> dict[str, Any]:
        """Function calling, structured output and logprobs, checked (`router.tools`); defaults dropped."""
        return {}

    @field_validator("n")
    @classmethod
    def _single_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError(f"only n=1 is supported, got n={value}")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("must be a string or a list of strings")
        if len(value) > 4:
            raise ValueError(f"at most 4 stop sequences are supported, got {len(value)}")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


PENALTY_OPTIONS = frozenset({"frequency_penalty", "presence_penalty", "logit_bias"})

REFUSED_OPTIONS = ("functions", "function_call", "echo", "best_of", "suffix")
"""OpenAI options no engine here honours (`functions` is the deprecated form of `tools`)."""

COMPLETION_REFUSED_OPTIONS = (*REFUSED_OPTIONS, "tools", "tool_choice", "response_format", "top_logprobs")
"""Chat options OpenAI's /v1/completions does not have either."""


def _is_default(name: str, value: Any) -> bool:
    """What a client sends when it does not use the option: unset, null, false, zero, empty,
    one best_of, the plain text response format, or a tool choice of none or auto (with no
    tools, auto chooses none; tools themselves are refused)."""
    if value is None or value is False or value == 0 or value in ([], {}, ""):
        return True
    if name == "best_of":
        return value == 1
    if name == "response_format":
        return isinstance(value, dict) and value.get("type") == "text"
    if name in ("tool_choice", "function_call"):
        return value in ("none", "auto")
    return False


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    refused_options: ClassVar[tuple[str, ...]] = COMPLETION_REFUSED_OPTIONS

    def api_options(self) -> dict[str, Any]:
        return completion_options(self.model_extra or {})

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise ValueError("must be a string or a list with one string (token ids are not supported)")
        if len(value) != 1:
            raise ValueError(f"exactly one prompt per request is supported, got a list of {len(value)}")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatSettings(_Sampling):
    """A chat request but its conversation: what the router validates itself of a big body whose
    conversation a parser process validated (`prepare_body`), once the model's defaults are in."""

    max_completion_tokens: int | None = Field(default=None, ge=1)
    refused_options: ClassVar[tuple[str, ...]] = REFUSED_OPTIONS

    def api_options(self) -> dict[str, Any]:
        return chat_options(self.model_extra or {})

    def requested_max_tokens(self) -> int | None:
        """OpenAI's newer name wins over the deprecated one when both are sent."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatRequest(ChatSettings):
    messages: list[ChatMessage] = Field(min_length=1)

    def api_options(self) -> dict[str, Any]:
        check_messages([m.model_dump(exclude_none=True) for m in self.messages])
        return super().api_options()

    def engine_messages(self) -> list[dict[str, Any]]:
        """The conversation as the engine gets it: text content, plus tool calls and the ids tool
        messages answer (an assistant message that only calls tools keeps `content: null`)."""
        out: list[dict[str, Any]] = []
        for m in self.messages:
            message: dict[str, Any] = {"role": m.role,
                                       "content": None if m.tool_calls and m.content is None else m.text()}
            if m.tool_calls:
                message["tool_calls"] = m.tool_calls
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if m.name is not None and m.role == "tool":
                message["name"] = m.name
            out.append(message)
        return out


GREEDY_BELOW = 1e-5
"""Temperatures this small sample greedily, as vLLM does: 1e-39 would overflow the logits into NaNs."""


def parse_json(raw: bytes) -> dict[str, Any]:
    """Any JSON body as an object, its shape checked (`json_body.load_object`); a problem is a 400."""
    try:
        return load_object(raw)
    except BodyProblem as problem:
        raise bad_request(problem.message, param=problem.param, code=problem.code) from None


def parse_body(raw: bytes, chat: bool, max_messages: int = DEFAULT_MAX_MESSAGES) -> dict[str, Any]:
    """Parse one inference body; its messages and values are counted before anything builds an
    object per message (`json_body.load_body`)."""
    try:
        return load_body(raw, chat, max_messages)
    except BodyProblem as problem:
        raise bad_request(problem.message, param=problem.param, code=problem.code) from None


def validate_request(data: dict[str, Any], chat: bool) -> ChatRequest | CompletionRequest:
    """`validate` for an inference body; a long conversation's messages in slices."""
    messages = data.get("messages")
    if chat and isinstance(messages, list) and len(messages) > MESSAGE_BATCH:
        data = {**data, "messages": _validated_messages(messages)}  # instances: the model takes them as they are
    return validate(ChatRequest if chat else CompletionRequest, data)


def validate_settings(data: dict[str, Any]) -> ChatSettings:
    """A prepared chat body's settings (`PreparedBody.data`, its conversation taken out)."""
    return validate(ChatSettings, data)  # type: ignore[no-any-return]


def parse_request(raw: bytes, chat: bool, max_messages: int = DEFAULT_MAX_MESSAGES) -> ChatRequest | CompletionRequest:
    return validate_request(parse_body(raw, chat, max_messages), chat)


@dataclass(frozen=True)
class PreparedBody:
    """A body as far as it can be taken without knowing the model: parsed with its shape bounded
    and, for a chat or completion request, validated as sent. A big body is prepared in a parser
    process (`router/parser_pool.py`), so that the router only unpickles it; its chat conversation
    then comes apart from the settings (`messages`, as the engine takes it), which the router
    validates again once the model's defaults are filled in (`ChatSettings`)."""

    data: dict[str, Any]
    messages: list[dict[str, Any]] | None = None


def prepare_body(raw: bytes, kind: BodyKind, max_messages: int = DEFAULT_MAX_MESSAGES,
                 bounds: Mapping[str, PromptBound] | None = None) -> PreparedBody:
    """What a parser process does with a big body; a client's mistake raises its `APIError`.

    With the `bounds` of the models served (`Runtime.prompt_bounds`), a prompt that cannot fit
    its model's context even at its fewest possible tokens is refused here, so that a body of
    megabytes costs the router a small error instead of its whole prepared conversation."""
    data = parse_body(raw, kind == "chat", max_messages)
    if kind == "object":
        return PreparedBody(data)
    if kind == "triton":
        for name, bound in (bounds or {}).items():  # the path's model's only
            refuse_triton_prompt(name, bound, data)
        return PreparedBody(data)
    body = validate_request(data, kind == "chat")
    body.api_options()
    messages = body.engine_messages() if isinstance(body, ChatRequest) else None
    bound = (bounds or {}).get(body.model)
    if bound is not None:
        if messages is not None:
            text_bytes = sum(len(str(m.get("content") or "").encode("utf-8")) for m in messages)
        else:
            text_bytes = len(body.prompt_text().encode("utf-8"))  # type: ignore[union-attr]
        try:
            refuse_if_cannot_fit(body.model, bound, text_bytes, body.requested_max_tokens(),
                                 "messages" if messages is not None else "prompt")
        except InvalidRequest as refused:
            raise api_error(refused) from None
    if messages is not None:
        return PreparedBody({k: v for k, v in data.items() if k != "messages"}, messages)
    return PreparedBody(data)


def _triton_input(data: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """A KServe v2 body's input tensor of that name (the first: a name given twice is the router's 400)."""
    listed = data.get("inputs")
    tensors = listed if isinstance(listed, list) else ()
    return next((t for t in tensors if isinstance(t, dict) and t.get("name") == name), None)


def _single(value: Any) -> Any:
    """A JSON value out of any nesting of one-element lists (a tensor's `data`, `[["text"]]`)."""
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value


def triton_text_input(data: Mapping[str, Any]) -> str | None:
    """The one text of a Triton body's `text_input` when it comes as JSON: the generate extension's
    key, or the KServe v2 input of that name (None when it comes as binary data, after the JSON)."""
    value = data.get("text_input")
    if value is None:
        tensor = _triton_input(data, "text_input")
        value = tensor.get("data") if tensor is not None else None
    value = _single(value)
    return value if isinstance(value, str) else None


def triton_text_bytes(data: Mapping[str, Any], binary_bytes: int = 0) -> int | None:
    """The bytes of the one text a Triton body's `text_input` holds, as JSON or as binary data
    after the JSON (its `binary_data_size` less the 4-byte length before the text): known from the
    JSON alone, before any binary data is read. A size over the `binary_bytes` the body has counts
    for nothing: the router's check of the binary data names that lie."""
    text = triton_text_input(data)
    if text is not None:
        return len(text.encode("utf-8"))
    tensor = _triton_input(data, "text_input")
    if tensor is None or tensor.get("shape") != [1]:
        return None
    params = tensor.get("parameters")
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size > binary_bytes:
        return None
    return max(0, size - 4)


def refuse_triton_prompt(name: str, bound: PromptBound, data: Mapping[str, Any], binary_bytes: int = 0) -> None:
    """A 400 naming `text_input` when a Triton body's prompt (in its JSON, or in the `binary_bytes`
    after it) cannot fit model `name`'s context even at its fewest possible tokens; nothing when it
    may fit or its text is not where it should be (the router's own checks name that)."""
    text_bytes = triton_text_bytes(data, binary_bytes)
    if text_bytes is None:
        return
    try:
        refuse_if_cannot_fit(name, bound, text_bytes, triton_max_tokens(data), "text_input")
    except InvalidRequest as refused:
        raise api_error(refused) from None


def triton_max_tokens(data: Mapping[str, Any]) -> int | None:
    """The `max_tokens` a Triton body asks for as JSON: in its `parameters`, or its sampling
    parameters (the generate extension's object, or the infer input's JSON text); None when
    unknown (binary data, say)."""
    places: list[Any] = [data.get("parameters"), data.get("sampling_parameters")]
    tensor = _triton_input(data, "sampling_parameters")
    text = _single(tensor.get("data")) if tensor is not None else None
    if isinstance(text, str) and len(text) < 65536:
        with contextlib.suppress(ValueError):  # the router's own check names it
            places.append(json.loads(text))
    for place in places:
        asked = place.get("max_tokens") if isinstance(place, dict) else None
        if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0:
            return asked
    return None


def validate(model_cls: type[_Sampling], data: dict[str, Any]) -> Any:
    """Pydantic errors become one 400 naming the first bad field as OpenAI's `param`."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise _bad_request_from(exc) from None


def _bad_request_from(exc: ValidationError, prefix: tuple[str | int, ...] = (), offset: int = 0) -> Exception:
    """The first error as a 400; `prefix` and `offset` place an error found in a slice of a list."""
    err = exc.errors(include_url=False)[0]
    loc = list(err["loc"])
    if prefix:
        loc = [*prefix, int(loc[0]) + offset, *loc[1:]] if loc else list(prefix)
    param = ".".join(str(part) for part in loc) or None
    if err["type"] == "unsupported":
        return bad_request(err["msg"], param=err["ctx"]["option"])
    if err["type"] == "missing":
        message = f"'{param}' is required"
    else:
        message = f"Invalid value for '{param}': {err['msg'].removeprefix('Value error, ')}"
    extra = len(exc.errors()) - 1
    if extra > 0:
        message += f" (and {extra} more problem{'s' if extra > 1 else ''})"
    return bad_request(message, param=param)


MESSAGE_BATCH = 1000
"""Messages validated per call: pydantic holds the GIL for a whole call, so a big conversation
is validated in slices, and the event loop's thread gets its turn between them."""

_MESSAGE_LIST = TypeAdapter(list[ChatMessage], config=ConfigDict(strict=True))


def _validated_messages(messages: list[Any]) -> list[ChatMessage]:
    checked: list[ChatMessage] = []
    for start in range(0, len(messages), MESSAGE_BATCH):
        try:
            checked.extend(_MESSAGE_LIST.validate_python(messages[start:start + MESSAGE_BATCH]))
        except ValidationError as exc:
            raise _bad_request_from(exc, ("messages",), start) from None
    return checked


def resolve_max_tokens(body: _Sampling, spec: ModelSpec, chat: bool) -> int:
    """The budget the engine gets; one that can never fit the model's context is a 400 at once."""
    asked = body.requested_max_tokens()
    param = "max_completion_tokens" if isinstance(body, ChatSettings) and body.max_completion_tokens else "max_tokens"
    context = spec.context_length
    if asked is not None:
        if context is not None and asked > context:
            raise bad_request(f"'{param}' is {asked}, more than the context length of model '{spec.name}' "
                              f"({context} tokens)", param=param)
        return asked
    if not chat:
        return DEFAULT_COMPLETION_MAX_TOKENS if context is None else min(DEFAULT_COMPLETION_MAX_TOKENS, context)
    return DEFAULT_CHAT_MAX_TOKENS if context is None else max(1, min(DEFAULT_CHAT_MAX_TOKENS, context // 2))


def to_generation_request(body: CompletionRequest | ChatSettings, spec: ModelSpec,
                          messages: list[dict[str, Any]] | None = None) -> GenerationRequest:
    """`messages`: a prepared conversation (`PreparedBody.messages`), for settings without one."""
    chat = isinstance(body, ChatSettings)
    common: dict[str, Any] = {
        "max_tokens": resolve_max_tokens(body, spec, chat),
        "temperature": 1.0 if body.temperature is None else 0.0 if body.temperature < GREEDY_BELOW
        else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "stop": body.stop_list(),
        "seed": body.seed,
        "options": body.engine_options(spec),
    }
    if isinstance(body, ChatSettings):
        if messages is None:
            if not isinstance(body, ChatRequest):
                raise TypeError("chat settings need their prepared conversation")
            messages = body.engine_messages()
        return GenerationRequest(messages=messages, **common)
    return GenerationRequest(prompt=body.prompt_text(), **common)

