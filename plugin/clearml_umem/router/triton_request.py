"""A request as Triton's vLLM backend takes it, decoded once for both protocols (HTTP and gRPC).

Code written for that backend sends `text_input` (BYTES), optionally `stream`,
`exclude_input_in_output` and the `return_*` flags (BOOL) and `sampling_parameters` (a JSON
string of vLLM's SamplingParams), as tensors of one element; sampling options may also come as
request parameters. They become the engine request the OpenAI routes build, through the same
validation (`schemas.validate` / `to_generation_request`) and the model's own defaults
(`with_model_defaults`), so a bad value is refused with the same message whichever protocol
carried it. Pure: no HTTP, no gRPC, no tritonclient here.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clearml_umem.engines.base import GenerationRequest
from clearml_umem.errors import InvalidInput
from clearml_umem.router.errors import APIError
from clearml_umem.router.generation import with_model_defaults
from clearml_umem.router.schemas import CompletionRequest, to_generation_request, validate
from clearml_umem.spec import ModelSpec

MODEL_VERSION = "1"
"""Every model has one version here: the one the catalog lists."""

TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"

INPUTS: dict[str, str] = {
    TEXT_INPUT: "BYTES",
    "stream": "BOOL",
    "sampling_parameters": "BYTES",
    "exclude_input_in_output": "BOOL",
    "return_finish_reason": "BOOL",
    "return_num_input_tokens": "BOOL",
    "return_num_output_tokens": "BOOL",
}
"""The vLLM backend's inputs and their datatypes; all but text_input are optional."""

OUTPUTS: dict[str, str] = {
    TEXT_OUTPUT: "BYTES",
    "finish_reason": "BYTES",
    "num_input_tokens": "UINT32",
    "num_output_tokens": "UINT32",
}
"""Its outputs: text_output always, the others when the matching `return_*` input is true."""

FLAGS = ("stream", "exclude_input_in_output", "return_finish_reason", "return_num_input_tokens",
         "return_num_output_tokens")

RESERVED_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers",
                                 "binary_data_output"})
"""Request parameters Triton itself reads (the `triton_` prefix too); never sampling options."""

FLOAT_OPTIONS = frozenset({"temperature", "top_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
                           "min_p"})
INT_OPTIONS = frozenset({"max_tokens", "seed", "n", "best_of", "top_k", "min_tokens", "logprobs"})

VLLM_ONLY_DEFAULTS: dict[str, Any] = {"top_k": (-1, 0), "min_p": (0, 0.0), "repetition_penalty": (1, 1.0),
                                      "min_tokens": (0,), "ignore_eos": (False,), "use_beam_search": (False,)}
"""vLLM sampling options no engine here takes: their defaults pass, anything else is refused
(ignoring them would give another answer than the one asked for)."""

BYTES_PREFIX = struct.Struct("<I")


class TritonInputError(InvalidInput):
    """A client's mistake in a Triton request: 400 on HTTP, INVALID_ARGUMENT on gRPC."""


@dataclass
class TritonRequest:
    """One decoded request: the engine request plus what shapes the reply."""

    prompt: str
    generation: GenerationRequest
    stream: bool = False
    exclude_input: bool = False
    extra_outputs: list[str] = field(default_factory=list)


def element_count(name: str, shape: Sequence[int]) -> int:
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise TritonInputError(f"input '{name}': shape must be whole numbers >= 0, got {list(shape)}", param=name)
    return math.prod(shape)


def deserialize_bytes(name: str, raw: bytes) -> list[bytes]:
    """BYTES tensor contents as Triton lays them out: each element a 4-byte little-endian length, then its bytes."""
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise TritonInputError(f"input '{name}': BYTES data ends inside an element's 4-byte length prefix",
                                   param=name)
        (size,) = BYTES_PREFIX.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise TritonInputError(f"input '{name}': a BYTES element claims {size} bytes, only {len(raw) - offset} "
                                   "remain", param=name)
        items.append(raw[offset:offset + size])
        offset += size
    return items


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    return b"".join(BYTES_PREFIX.pack(len(item)) + item for item in items)


def decode_raw(name: str, datatype: str, raw: bytes) -> list[Any]:
    """Raw tensor contents (gRPC raw_input_contents, HTTP binary data) of the two datatypes inputs use."""
    if datatype == "BYTES":
        return list(deserialize_bytes(name, raw))
    if datatype == "BOOL":
        return [b != 0 for b in raw]
    raise TritonInputError(f"input '{name}': datatype {datatype} is not one this model takes", param=name)


def check_tensor(name: str, datatype: str, shape: Sequence[int], values: Sequence[Any]) -> Any:
    """The one element of an input tensor, after checking its name, datatype and shape."""
    expected = INPUTS.get(name)
    if expected is None:
        raise TritonInputError(f"unexpected inference input '{name}'; this model takes "
                               f"{', '.join(INPUTS)}", param=name)
    if datatype != expected:
        raise TritonInputError(f"input '{name}' must have datatype {expected}, got {datatype or 'none'}",
                               param=name)
    count = element_count(name, shape)
    if count != 1:
        raise TritonInputError(f"input '{name}' must hold exactly one element (shape [1] or [1, 1]: one prompt per "
                               f"request), got shape {list(shape)}", param=name)
    if len(values) != count:
        raise TritonInputError(f"input '{name}': shape {list(shape)} holds {count} element(s), the data "
                               f"{len(values)}", param=name)
    value = values[0]
    if expected == "BYTES":
        if isinstance(value, str):
            return value
        if not isinstance(value, bytes | bytearray):
            raise TritonInputError(f"input '{name}' must be text, got {type(value).__name__}", param=name)
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise TritonInputError(f"input '{name}' is not valid UTF-8 text", param=name) from None
    if not isinstance(value, bool):
        raise TritonInputError(f"input '{name}' must be true or false, got {value!r}", param=name)
    return value


def build_request(spec: ModelSpec, inputs: Mapping[str, Any], parameters: Mapping[str, Any],
                  stream: bool | None = None) -> TritonRequest:
    """From checked input values (`check_tensor`) and request parameters to the engine's request.

    `stream` forces the mode where the route decides it (HTTP generate / generate_stream)."""
    if TEXT_INPUT not in inputs:
        raise TritonInputError(f"input '{TEXT_INPUT}' is required", param=TEXT_INPUT)
    prompt = inputs[TEXT_INPUT]
    options: dict[str, Any] = {}
    raw_options = inputs.get("sampling_parameters")
    if raw_options not in (None, ""):
        try:
            parsed = json.loads(raw_options)
        except json.JSONDecodeError as exc:
            raise TritonInputError(f"input 'sampling_parameters' is not valid JSON: {exc}",
                                   param="sampling_parameters") from None
        if not isinstance(parsed, dict):
            raise TritonInputError("input 'sampling_parameters' must be a JSON object", param="sampling_parameters")
        options.update(parsed)
    flags = {name: inputs[name] for name in FLAGS if name in inputs}
    for key, value in parameters.items():
        if key in RESERVED_PARAMETERS or key.startswith("triton_"):
            continue
        if key in FLAGS:
            if not isinstance(value, bool):
                raise TritonInputError(f"parameter '{key}' must be true or false, got {value!r}", param=key)
            flags.setdefault(key, value)
        else:
            options[key] = value
    want_stream = bool(flags.get("stream", False))
    if stream is not None and want_stream and not stream:
        raise TritonInputError("'stream' is true: this route answers once; use generate_stream (or gRPC "
                               "ModelStreamInfer) for a streamed answer", param="stream")
    body = with_model_defaults({"model": spec.name, "prompt": prompt,
                                **{k: _coerced(k, v) for k, v in options.items()}}, spec)
    for name, defaults in VLLM_ONLY_DEFAULTS.items():
        if name in body and body[name] not in defaults:
            raise TritonInputError(f"'{name}' is not supported by this server (got {body[name]!r}); leave it unset",
                                   param=name)
        body.pop(name, None)
    body.pop("stream", None)
    if body.get("logprobs") is not None:
        raise TritonInputError("'logprobs' cannot be returned over Triton's protocol (its answer is text_output "
                               "only); leave it unset, or ask the OpenAI route /v1/completions", param="logprobs")
    try:
        generation = to_generation_request(validate(CompletionRequest, body), spec)
    except APIError as exc:
        raise TritonInputError(exc.message, param=exc.param) from None
    extra = [out for out in OUTPUTS if out != TEXT_OUTPUT and flags.get(f"return_{out}", False)]
    return TritonRequest(prompt=prompt, generation=generation, stream=want_stream if stream is None else stream,
                         exclude_input=bool(flags.get("exclude_input_in_output", False)), extra_outputs=extra)


def _coerced(name: str, value: Any) -> Any:
    """vLLM backend clients often send numbers as strings (`{"temperature": "0.1"}`): the backend
    converts the ones it knows, and so does this."""
    if not isinstance(value, str):
        return value
    try:
        if name in FLOAT_OPTIONS:
            return float(value)
        if name in INT_OPTIONS:
            return int(value)
    except ValueError:
        raise TritonInputError(f"Invalid value for '{name}': {value!r} is not a number", param=name) from None
    return value


def answer_text(request: TritonRequest, generated: str) -> str:
    """A reply sent in one piece starts with the prompt, as the vLLM backend's does, unless
    `exclude_input_in_output`; streamed pieces never carry it."""
    return generated if request.exclude_input or request.stream else request.prompt + generated


def output_values(request: TritonRequest, text: str, finish_reason: str | None,
                  usage: Mapping[str, int]) -> dict[str, tuple[str, Any]]:
    """Each output's (datatype, value) for one response."""
    values: dict[str, tuple[str, Any]] = {TEXT_OUTPUT: ("BYTES", text)}
    for name in request.extra_outputs:
        if name == "finish_reason":
            values[name] = ("BYTES", finish_reason or "")
        elif name == "num_input_tokens":
            values[name] = ("UINT32", usage.get("prompt_tokens", 0))
        elif name == "num_output_tokens":
            values[name] = ("UINT32", usage.get("completion_tokens", 0))
    return values


def select_outputs(requested: Sequence[str], produced: Mapping[str, Any]) -> list[str]:
    """The outputs a reply carries: those named in the request (all produced ones when none are)."""
    if not requested:
        return list(produced)
    for name in requested:
        if name not in OUTPUTS:
            raise TritonInputError(f"unexpected inference output '{name}'; this model produces "
                                   f"{', '.join(OUTPUTS)}", param="outputs")
        if name not in produced:
            raise TritonInputError(f"output '{name}' is produced only when input 'return_{name}' is true",
                                   param="outputs")
    return list(dict.fromkeys(requested))


def raw_output(datatype: str, value: Any) -> bytes:
    """One output element in Triton's raw layout (BYTES length-prefixed, UINT32 little-endian)."""
    return serialize_bytes([str(value).encode()]) if datatype == "BYTES" else struct.pack("<I", int(value))


def model_metadata(name: str) -> dict[str, Any]:
    """KServe v2 model metadata, as Triton describes a vLLM backend model."""
    return {"name": name, "versions": [MODEL_VERSION], "platform": "vllm",
            "inputs": [{"name": n, "datatype": d, "shape": [1]} for n, d in INPUTS.items()],
            "outputs": [{"name": n, "datatype": d, "shape": [-1]} for n, d in OUTPUTS.items()]}
