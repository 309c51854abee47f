"""Triton's HTTP protocol on the router's app: health, metadata, the generate extension and KServe v2 infer.

`tritonclient.http` and code written for Triton's vLLM backend reach every model here as if
it were a vLLM-backend model in a Triton repository, through the same runtime as the OpenAI
routes (`Generation`: lease, queue, tiers, TTFT). Routes raise the OpenAI routes' errors (same
statuses, the field named in the message); `TritonErrorShape` answers them as Triton does,
`{"error": "<message>"}`.
No tritonclient is needed: the binary tensor extension is a length-prefixed layout decoded here.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clearml_umem import __version__
from clearml_umem.router.body_handoff import Body
from clearml_umem.router.disconnect import ClientGone, until_disconnect
from clearml_umem.router.errors import CLIENT_CLOSED, APIError, bad_request
from clearml_umem.router.generation import Generation, ServingRuntime, resolve_model
from clearml_umem.router.schemas import refuse_triton_prompt
from clearml_umem.router.sse import EventStreamResponse, event
from clearml_umem.router.triton_request import (
    INPUTS,
    MODEL_VERSION,
    OUTPUTS,
    TEXT_OUTPUT,
    TritonInputError,
    TritonRequest,
    answer_text,
    build_request,
    check_tensor,
    decode_raw,
    model_metadata,
    output_values,
    raw_output,
    select_outputs,
)
from clearml_umem.spec import ModelSpec

SERVER_NAME = "clearml-umem"
EXTENSIONS = ["classification", "model_repository", "statistics", "binary_tensor_data", "generate"]
HEADER_LENGTH = "inference-header-content-length"
SERVED_FROM_HEADER = "x-umem-served-from"
"""The same header as the OpenAI routes' (router/app.py), named here: that module imports this one."""

BODY_PATHS = re.compile(r"/v2/models/.+/(?:generate|generate_stream|infer)")
"""The routes whose big bodies the connection leaves for the body reader (`body_handoff.py`), as
OpenAI's inference routes: their bytes never cross the event loop."""

ReadBody = Callable[[Request], Awaitable[Body]]
"""The router's read of an inference body (`app.read_request_body`): a big one read by the body reader."""
ParseBody = Callable[[Request, Body, str], Awaitable[dict[str, Any]]]
"""The router's parse of a body for a model (`app.parse_request_body`): a big one never parsed on
the event loop, and its JSON `text_input` refused there when it cannot fit that model's context."""


class TritonErrorShape:
    """Every error under `/v2` in Triton's shape, `{"error": "<message>"}`, whichever layer answered
    (a route, the keys, a body limit, an unknown route): tritonclient cannot show OpenAI's nested
    error object (`str()` of its exception fails on it). Pure ASGI: only JSON error responses are
    held back and rewritten (they are small); everything else, streams included, passes as sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v2"):
            await self.app(scope, receive, send)
            return
        held: list[Message] = []
        chunks: list[bytes] = []

        async def reshape(message: Message) -> None:
            if message["type"] == "http.response.start":
                media = Headers(raw=message.get("headers", [])).get("content-type", "")
                if message["status"] >= 400 and media.startswith("application/json"):
                    held.append(message)
                    return
            elif message["type"] == "http.response.body" and held:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = _triton_body(b"".join(chunks))
                headers = MutableHeaders(raw=list(held[0]["headers"]))
                headers["content-length"] = str(len(body))
                await send({**held[0], "headers": headers.raw})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, reshape)


def _triton_body(body: bytes) -> bytes:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return body
    if isinstance(error, dict):
        return json.dumps({"error": str(error.get("message") or "error")}).encode()
    return body


def split_version(path: str) -> tuple[str, str]:
    """`NAME` or `NAME/versions/V` (model names may hold slashes) into the name and the version."""
    name, sep, version = path.rpartition("/versions/")
    return (name, version) if sep and version and "/" not in version else (path, "")


def triton_routes(runtime: ServingRuntime, read_body: ReadBody,
                  parse_body: ParseBody) -> APIRouter:
    routes = APIRouter()

    def model(path: str) -> ModelSpec:
        """The model a path names, by its name or an alias (as on the OpenAI routes)."""
        name, version = split_version(path)
        served = resolve_model(runtime, name)
        if served is None:
            raise APIError(404, f"Request for unknown model: '{name}' is not found; GET /v2/repository/index "
                                "lists the models served here", param="model")
        if version not in ("", MODEL_VERSION):
            raise APIError(404, f"Request for unknown model: '{name}' has no version {version}; its only "
                                f"version is {MODEL_VERSION}", param="model_version")
        return runtime.spec(served)

    @routes.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @routes.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200 if runtime.model_names() else 503)

    @routes.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    @routes.post("/v2/repository/index")
    async def repository_index() -> list[dict[str, Any]]:
        return [{"name": row["name"], "version": MODEL_VERSION, "state": "READY", "reason": f"tier {row['tier']}"}
                for row in runtime.admin_view()]

    @routes.get("/v2/models/{path:path}/ready")
    async def model_ready(path: str) -> Response:
        model(path)
        return Response(status_code=200)  # every tier serves: a request for a cold model waits for its load

    @routes.get("/v2/models/{path:path}/config")
    async def model_config(path: str) -> Response:
        spec = model(path)
        return JSONResponse({"name": spec.name, "backend": "vllm", "max_batch_size": 0,
                             "model_transaction_policy": {"decoupled": True},
                             "input": [{"name": n, "data_type": f"TYPE_{'STRING' if d == 'BYTES' else d}",
                                        "dims": [1], "optional": n != "text_input"} for n, d in INPUTS.items()],
                             "output": [{"name": n, "data_type": f"TYPE_{'STRING' if d == 'BYTES' else d}",
                                         "dims": [-1]} for n, d in OUTPUTS.items()]})

    @routes.post("/v2/models/{path:path}/generate")
    async def generate(path: str, request: Request) -> Response:
        spec = model(path)
        data = await parse_body(request, await read_body(request), spec.name)
        return await _generate(runtime, spec, request, data, stream=False)

    @routes.post("/v2/models/{path:path}/generate_stream")
    async def generate_stream(path: str, request: Request) -> Response:
        spec = model(path)
        data = await parse_body(request, await read_body(request), spec.name)
        return await _generate(runtime, spec, request, data, stream=True)

    @routes.post("/v2/models/{path:path}/infer")
    async def infer(path: str, request: Request) -> Response:
        return await _infer(runtime, model(path), request, await read_body(request), parse_body)

    @routes.get("/v2/models/{path:path}")
    async def metadata(path: str) -> Response:
        return JSONResponse(model_metadata(model(path).name))

    return routes


def _served_from(gen: Generation) -> dict[str, str]:
    return {"served_from": gen.served_from.value} if gen.served_from is not None else {}


def _served_from_header(gen: Generation) -> dict[str, str]:
    """The tier the model was served from, in the header the OpenAI routes send."""
    return {SERVED_FROM_HEADER: gen.served_from.value} if gen.served_from is not None else {}


def _generate_inputs(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The generate extension's body: top-level keys are inputs by name, `parameters` the request's."""
    parameters = data.get("parameters", {})
    if not isinstance(parameters, dict):
        raise bad_request("'parameters' must be a JSON object", param="parameters")
    inputs: dict[str, Any] = {}
    for name, value in data.items():
        if name == "parameters":
            continue
        if name == "sampling_parameters" and isinstance(value, dict):
            parameters = {**value, **parameters}
            continue
        values = _flatten(value)
        inputs[name] = check_tensor(name, INPUTS.get(name, ""), [len(values)], values)
    return inputs, parameters


async def _generate(runtime: ServingRuntime, spec: ModelSpec, request: Request, data: dict[str, Any],
                    stream: bool) -> Response:
    arrived = time.monotonic()
    inputs, parameters = _generate_inputs(data)
    triton = build_request(spec, inputs, parameters, stream=stream)
    gen = Generation(runtime, spec.name, triton.generation, f"triton-{uuid.uuid4().hex}", arrived)
    if stream:
        try:
            await until_disconnect(request.receive, gen.open)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        return EventStreamResponse(_events(gen, triton, spec.name), headers=_served_from_header(gen))
    try:
        text = await until_disconnect(request.receive, gen.collect)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    reply: dict[str, Any] = {"model_name": spec.name, "model_version": MODEL_VERSION}
    for name, (_, value) in output_values(triton, answer_text(triton, text), gen.finish_reason, gen.usage()).items():
        reply[name] = value
    return JSONResponse(reply, headers=_served_from_header(gen))


async def _events(gen: Generation, triton: TritonRequest, name: str) -> AsyncGenerator[bytes, None]:
    """One SSE event per piece of the answer; a failure after the first event is an `error` event."""
    ok = False
    try:
        sent = False
        while (delta := await gen.next_delta()) is not None:
            if not delta.text and not (delta.finish_reason and triton.extra_outputs):
                continue
            gen.first_token()
            reply: dict[str, Any] = {"model_name": name, "model_version": MODEL_VERSION}
            for out, (_, value) in output_values(triton, delta.text, delta.finish_reason, gen.usage()).items():
                reply[out] = value
            sent = True
            yield event(reply)
        if not sent:
            gen.first_token()
            yield event({"model_name": name, "model_version": MODEL_VERSION, TEXT_OUTPUT: ""})
        ok = True
    except APIError as exc:
        yield event({"error": exc.message})
    finally:
        await gen.close(ok)


def _flatten(value: Any) -> list[Any]:
    if not isinstance(value, list):
        return [value]
    out: list[Any] = []
    for item in value:
        out.extend(_flatten(item))
    return out


def _infer_inputs(data: dict[str, Any], binary: bytes) -> dict[str, Any]:
    """KServe v2 `inputs`, each from JSON `data` or from its slice of the binary tail."""
    listed = data.get("inputs")
    if not isinstance(listed, list) or not listed:
        raise TritonInputError("'inputs' is required: a list of tensors, one named 'text_input'", param="inputs")
    inputs: dict[str, Any] = {}
    offset = 0
    for i, tensor in enumerate(listed):
        if not isinstance(tensor, dict):
            raise TritonInputError(f"'inputs[{i}]' must be an object with name, datatype, shape and data",
                                   param="inputs")
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not isinstance(name, str) or not name:
            raise TritonInputError(f"'inputs[{i}].name' is required", param="inputs")
        if name in inputs:
            raise TritonInputError(f"input '{name}' is given twice", param=name)
        if not isinstance(datatype, str):
            raise TritonInputError(f"input '{name}': 'datatype' is required", param=name)
        if not isinstance(shape, list):
            raise TritonInputError(f"input '{name}': 'shape' is required, a list of whole numbers", param=name)
        params = tensor.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise TritonInputError(f"input '{name}': binary_data_size {size!r} does not fit the "
                                       f"{len(binary) - offset} bytes of binary data left", param=name)
            # decoded only as the datatype the input takes: any other is refused by check_tensor, by name
            values = decode_raw(name, datatype, binary[offset:offset + size]) if INPUTS.get(name) == datatype \
                else []
            offset += size
        elif "data" in tensor:
            values = _flatten(tensor["data"])
        else:
            raise TritonInputError(f"input '{name}' has neither 'data' nor a binary_data_size parameter",
                                   param=name)
        inputs[name] = check_tensor(name, datatype, shape, values)
    if offset != len(binary):
        raise TritonInputError(f"{len(binary) - offset} bytes of binary data follow the inputs that no input claims",
                               param="inputs")
    return inputs


def _requested_outputs(data: dict[str, Any], produced: dict[str, tuple[str, Any]]) -> dict[str, bool]:
    """Output name -> sent as binary data, as asked (all produced outputs when none are named)."""
    params = data.get("parameters") or {}
    default_binary = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    listed = data.get("outputs")
    if listed is None:
        listed = []
    if not isinstance(listed, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                               for o in listed):
        raise TritonInputError("'outputs' must be a list of objects with a 'name'", param="outputs")
    binary: dict[str, bool] = {}
    for out in listed:
        out_params = out.get("parameters")
        binary[out["name"]] = bool(out_params.get("binary_data", default_binary)) \
            if isinstance(out_params, dict) else default_binary
    return {name: binary.get(name, default_binary)
            for name in select_outputs([o["name"] for o in listed], produced)}


def _validate_outputs(data: dict[str, Any], triton: TritonRequest) -> None:
    """Checked before the request waits for its model: a bad `outputs` must not cost a swap-in."""
    _requested_outputs(data, output_values(triton, "", None, {}))


async def _part(raw: Body, start: int, end: int) -> bytes:
    """Bytes `start:end` of a body: the binary tensor extension's JSON header, or the binary data
    after it. A big body's are read from its memory file in a thread, not copied on the event loop."""
    if isinstance(raw, bytes):
        return raw[start:end]
    return await asyncio.to_thread(raw.read, start, end)


async def _infer(runtime: ServingRuntime, spec: ModelSpec, request: Request, raw: Body,
                 parse_body: ParseBody) -> Response:
    arrived = time.monotonic()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise bad_request(f"Content-Encoding {encoding!r} is not supported; send the request uncompressed",
                          param="content-encoding")
    declared = request.headers.get(HEADER_LENGTH)
    if declared is not None:
        if not declared.strip().isdigit() or int(declared) > len(raw):
            raise bad_request(f"Inference-Header-Content-Length {declared!r} is not a length within the "
                              f"{len(raw)}-byte body", param=HEADER_LENGTH)
        head: Body = await _part(raw, 0, int(declared))
    else:
        head = raw
    data = await parse_body(request, head, spec.name)
    bound = runtime.prompt_bounds().get(spec.name)
    if bound is not None:  # a binary text_input's size is known from the header: refused before it is read
        refuse_triton_prompt(spec.name, bound, data, len(raw) - int(declared) if declared is not None else 0)
    binary = await _part(raw, int(declared), len(raw)) if declared is not None else b""
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad_request("'parameters' must be a JSON object", param="parameters")
    triton = build_request(spec, _infer_inputs(data, binary), params, stream=False)
    _validate_outputs(data, triton)
    gen = Generation(runtime, spec.name, triton.generation, f"triton-{uuid.uuid4().hex}", arrived)
    try:
        text = await until_disconnect(request.receive, gen.collect)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    produced = output_values(triton, answer_text(triton, text), gen.finish_reason, gen.usage())
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary_out in _requested_outputs(data, produced).items():
        datatype, value = produced[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": [1]}
        if binary_out:
            blob = raw_output(datatype, value)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [value]
        outputs.append(entry)
    reply: dict[str, Any] = {"model_name": spec.name, "model_version": MODEL_VERSION, "outputs": outputs,
                             "parameters": _served_from(gen)}
    if isinstance(data.get("id"), str):
        reply["id"] = data["id"]
    headers = _served_from_header(gen)
    if not blobs:
        return JSONResponse(reply, headers=headers)
    header = JSONResponse(reply).body
    headers["Inference-Header-Content-Length"] = str(len(header))
    return Response(bytes(header) + b"".join(blobs), media_type="application/octet-stream", headers=headers)
