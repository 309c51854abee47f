"""Triton's gRPC protocol (`GRPCInferenceService`), served by grpc.aio in the router's own event loop.

Imported only when `--grpc-port` is set: grpc and tritonclient (the `[triton]` extra) are not
part of the base install. The servicer and messages are the ones `tritonclient.grpc` ships, so
the real client's requests are parsed by the same generated code. Requests reach the runtime
directly, through `Generation` as the OpenAI routes do (lease, bounded queue, tiers, TTFT),
never over HTTP. Keys follow the HTTP router's rule (router/keys.py): the `authorization`
metadata carries `Bearer <key>`; with an admin key, loading and unloading models takes it alone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceServicer, add_GRPCInferenceServiceServicer_to_server

from clearml_umem import __version__
from clearml_umem.errors import ServingError
from clearml_umem.metrics import Metrics
from clearml_umem.router.errors import APIError, api_error
from clearml_umem.router.generation import Generation, ServingRuntime, resolve_model
from clearml_umem.router.keys import Keys
from clearml_umem.router.triton_http import EXTENSIONS, SERVER_NAME
from clearml_umem.router.triton_request import (
    INPUTS,
    MODEL_VERSION,
    OUTPUTS,
    TritonInputError,
    TritonRequest,
    answer_text,
    build_request,
    check_tensor,
    decode_raw,
    output_values,
    raw_output,
    select_outputs,
)
from clearml_umem.spec import ModelSpec
from clearml_umem.tiers import Tier

log = logging.getLogger(__name__)

STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
                409: grpc.StatusCode.ABORTED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}
"""The HTTP status each error has on the OpenAI routes, as the gRPC status it means."""

SERVED_FROM = "served_from"
"""Response parameter: the tier the model was served from (the HTTP routes' x-umem-served-from)."""

FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"

MAX_STREAM_IN_FLIGHT = 64
"""Requests one ModelStreamInfer stream may have running at once; more get an error response
(each also waits in its model's bounded queue, like any other request)."""

STREAM_BUFFER = 256
"""Responses waiting for a slow stream reader; producers wait beyond it instead of piling up memory."""

MAX_CONCURRENT_RPCS = 4096
"""Beyond this many calls at once the server answers RESOURCE_EXHAUSTED before any work."""

DTYPES = {"BYTES": model_config_pb2.TYPE_STRING, "BOOL": model_config_pb2.TYPE_BOOL,
          "UINT32": model_config_pb2.TYPE_UINT32}


def _parameter(value: service_pb2.InferParameter) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


def _status_error(exc: APIError) -> tuple[grpc.StatusCode, str]:
    return STATUS_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message


def _rpc(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A unary RPC whose errors leave as the gRPC status they mean, the field named in the message;
    an unexpected one as INTERNAL with a reference to the log (exception text can hold secrets)."""

    @functools.wraps(method)
    async def wrapped(self: TritonServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise  # already a status (a refused key)
        except APIError as exc:
            await context.abort(*_status_error(exc))
        except ServingError as exc:
            await context.abort(*_status_error(api_error(exc)))
        except Exception:  # noqa: BLE001 - reported by reference, the details to the log
            reference = uuid.uuid4().hex[:12]
            log.exception("internal error %s in gRPC %s", reference, method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"Internal server error (reference {reference}); "
                                                          "the server log has the details.")

    return wrapped


class TritonServicer(GRPCInferenceServiceServicer):
    def __init__(self, runtime: ServingRuntime, metrics: Metrics, api_key: str | None,
                 admin_key: str | None) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.keys = Keys(api_key, admin_key)

    async def _authorize(self, context: grpc.aio.ServicerContext, admin: bool = False) -> None:
        """The HTTP router's rule (router/keys.py), the key in the `authorization` metadata."""
        header = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), "")
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        if not self.keys.allows(header, admin):
            which = "the admin key" if admin and self.keys.has_admin_key else "an API key"
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"Incorrect or missing API key: send metadata 'authorization: Bearer <key>' with "
                                f"{which}.")

    # -- lookups -----------------------------------------------------------------------------

    def _model(self, name: str, version: str = "") -> ModelSpec:
        """The model a request names, by its name or an alias (as on the OpenAI routes)."""
        served = resolve_model(self.runtime, name)
        if served is None:
            raise APIError(404, f"Request for unknown model: '{name}' is not found; RepositoryIndex lists the "
                                "models served here", param="model_name")
        if version not in ("", MODEL_VERSION):
            raise APIError(404, f"Request for unknown model: '{name}' has no version {version}; its only "
                                f"version is {MODEL_VERSION}", param="model_version")
        return self.runtime.spec(served)

    def _tiers(self) -> dict[str, str]:
        return {row["name"]: row["tier"] for row in self.runtime.admin_view()}

    # -- health and metadata ----------------------------------------------------------------

    @_rpc
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context)
        return service_pb2.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context)
        return service_pb2.ServerReadyResponse(ready=bool(self.runtime.model_names()))

    @_rpc
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context)
        ready = resolve_model(self.runtime, request.name) is not None and request.version in ("", MODEL_VERSION)
        return service_pb2.ModelReadyResponse(ready=ready)  # every tier serves: a cold model loads on request

    @_rpc
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context)
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    @_rpc
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context)
        spec = self._model(request.name, request.version)
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=spec.name, versions=[MODEL_VERSION], platform="vllm",
            inputs=[tensor(name=n, datatype=d, shape=[1]) for n, d in INPUTS.items()],
            outputs=[tensor(name=n, datatype=d, shape=[-1]) for n, d in OUTPUTS.items()])

    @_rpc
    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context)
        spec = self._model(request.name, request.version)
        config = model_config_pb2.ModelConfig(
            name=spec.name, backend="vllm", max_batch_size=0,
            model_transaction_policy=model_config_pb2.ModelTransactionPolicy(decoupled=True),
            input=[model_config_pb2.ModelInput(name=n, data_type=DTYPES[d], dims=[1], optional=n != "text_input")
                   for n, d in INPUTS.items()],
            output=[model_config_pb2.ModelOutput(name=n, data_type=DTYPES[d], dims=[-1]) for n, d in OUTPUTS.items()])
        return service_pb2.ModelConfigResponse(config=config)

    # -- repository: tiers -------------------------------------------------------------------

    @_rpc
    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Every model, READY in whatever tier it is (the reason says which)."""
        await self._authorize(context)
        index = service_pb2.RepositoryIndexResponse.ModelIndex
        return service_pb2.RepositoryIndexResponse(models=[
            index(name=name, version=MODEL_VERSION, state="READY", reason=f"tier {tier}")
            for name, tier in self._tiers().items()])

    @_rpc
    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Loading a model places it on the device (it stays evictable, as any placed model)."""
        await self._authorize(context, admin=True)
        await self.runtime.place(self._model(request.model_name).name, Tier.GPU)
        return service_pb2.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Unloading a model makes it cold (no engine); it stays listed and loads again on request."""
        await self._authorize(context, admin=True)
        await self.runtime.place(self._model(request.model_name).name, Tier.COLD)
        return service_pb2.RepositoryModelUnloadResponse()

    @_rpc
    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """From the router's counters (the same as /metrics): requests that ended well or not,
        and the time requests waited for their model (queue), per model."""
        await self._authorize(context)
        names = [self._model(request.name, request.version).name] if request.name else self.runtime.model_names()
        requests = self.metrics.summary()["requests"]
        queue_ns: dict[str, float] = {}
        queue_count: dict[str, float] = {}
        for family in self.metrics.queue_wait.collect():
            for sample in family.samples:
                model = sample.labels.get("model", "")
                if sample.name.endswith("_sum"):
                    queue_ns[model] = queue_ns.get(model, 0.0) + sample.value * 1e9
                elif sample.name.endswith("_count"):
                    queue_count[model] = queue_count.get(model, 0.0) + sample.value
        duration = service_pb2.StatisticDuration
        stats = []
        for name in names:
            counts = requests.get(name, {})
            ok, failed = int(counts.get("ok", 0)), int(counts.get("failed", 0))
            stats.append(service_pb2.ModelStatistics(
                name=name, version=MODEL_VERSION, inference_count=ok, execution_count=ok,
                inference_stats=service_pb2.InferStatistics(
                    success=duration(count=ok), fail=duration(count=failed),
                    queue=duration(count=int(queue_count.get(name, 0)), ns=int(queue_ns.get(name, 0))))))
        return service_pb2.ModelStatisticsResponse(model_stats=stats)

    # -- inference ---------------------------------------------------------------------------

    def _decode(self, request: Any, stream: bool | None) -> tuple[ModelSpec, TritonRequest, dict[str, Any]]:
        """The request checked before it waits for its model: a mistake costs no swap-in."""
        spec = self._model(request.model_name, request.model_version)
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise TritonInputError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: there must be "
                                   "one per input", param="raw_input_contents")
        inputs: dict[str, Any] = {}
        for i, tensor in enumerate(request.inputs):
            name, datatype = tensor.name, tensor.datatype
            if name in inputs:
                raise TritonInputError(f"input '{name}' is given twice", param=name)
            expected = INPUTS.get(name)
            if raw:
                values = decode_raw(name, datatype, raw[i]) if expected == datatype else []
            elif datatype == "BYTES" == expected:
                values = list(tensor.contents.bytes_contents)
            elif datatype == "BOOL" == expected:
                values = list(tensor.contents.bool_contents)
            else:
                values = []
            inputs[name] = check_tensor(name, datatype, list(tensor.shape), values)
        parameters = {key: _parameter(value) for key, value in request.parameters.items()}
        triton = build_request(spec, inputs, parameters, stream=stream)
        select_outputs([o.name for o in request.outputs], output_values(triton, "", None, {}))
        return spec, triton, parameters

    def _response(self, request: Any, triton: TritonRequest, gen: Generation, text: str | None,
                  finish_reason: str | None, final: bool | None) -> Any:
        """One ModelInferResponse; `text=None` makes the empty final response of a stream."""
        response = service_pb2.ModelInferResponse(model_name=request.model_name, model_version=MODEL_VERSION,
                                                  id=request.id)
        if text is not None:
            produced = output_values(triton, text, finish_reason, gen.usage())
            for name in select_outputs([o.name for o in request.outputs], produced):
                datatype, value = produced[name]
                response.outputs.add(name=name, datatype=datatype, shape=[1])
                response.raw_output_contents.append(raw_output(datatype, value))
        if gen.served_from is not None:
            response.parameters[SERVED_FROM].string_param = gen.served_from.value
        if final is not None:
            response.parameters[FINAL].bool_param = final
        return response

    @_rpc
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        arrived = time.monotonic()
        await self._authorize(context)
        spec, triton, _ = self._decode(request, stream=False)
        gen = Generation(self.runtime, spec.name, triton.generation, f"triton-{uuid.uuid4().hex}", arrived)
        text = await gen.collect()  # a client that cancels cancels this task: collect releases the lease
        return self._response(request, triton, gen, answer_text(triton, text), gen.finish_reason, None)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[Any],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """Requests on one stream run at once, each answered as it goes (Triton's decoupled mode);
        a request's failure is an error_message response and the stream goes on."""
        await self._authorize(context)
        out: asyncio.Queue[Any] = asyncio.Queue(maxsize=STREAM_BUFFER)
        done = object()
        tasks: set[asyncio.Task[None]] = set()
        running = [1]  # the reader and each request's task put `done` once when they end

        async def one(request: Any) -> None:
            try:
                await self._stream_one(request, out)
            finally:
                await out.put(done)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    if len(tasks) >= MAX_STREAM_IN_FLIGHT:
                        await out.put(service_pb2.ModelStreamInferResponse(
                            error_message=f"this stream already has {MAX_STREAM_IN_FLIGHT} requests running; "
                                          "wait for one to end or open another stream"))
                        continue
                    running[0] += 1
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:
                await out.put(done)

        reader = asyncio.create_task(read())
        try:
            while running[0]:
                item = await out.get()
                if item is done:
                    running[0] -= 1
                    continue
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    async def _stream_one(self, request: Any, out: asyncio.Queue[Any]) -> None:
        arrived = time.monotonic()

        async def send(response: Any) -> None:
            await out.put(service_pb2.ModelStreamInferResponse(infer_response=response))

        try:
            spec, triton, parameters = self._decode(request, stream=None)
            empty_final = parameters.get(EMPTY_FINAL) is True
            gen = Generation(self.runtime, spec.name, triton.generation, f"triton-{uuid.uuid4().hex}", arrived)
            if not triton.stream:
                text = await gen.collect()
                await send(self._response(request, triton, gen, answer_text(triton, text), gen.finish_reason,
                                          final=not empty_final))
            else:
                await gen.open()
                ok = False
                try:
                    while (delta := await gen.next_delta()) is not None:
                        # without the empty final response, the last response carries the final flag
                        # with whatever text is left ("" often): Triton's clients learn the end from it
                        last = delta.finish_reason is not None
                        if not delta.text and not (last and not empty_final):
                            continue
                        gen.first_token()
                        await send(self._response(request, triton, gen, delta.text, delta.finish_reason,
                                                  final=last and not empty_final))
                    ok = True
                finally:
                    await gen.close(ok)
            if empty_final:
                await send(self._response(request, triton, gen, None, None, final=True))
        except APIError as exc:
            await out.put(service_pb2.ModelStreamInferResponse(error_message=exc.message))
        except ServingError as exc:
            await out.put(service_pb2.ModelStreamInferResponse(error_message=api_error(exc).message))
        except Exception:  # noqa: BLE001 - the client gets a reference, the log the details
            reference = uuid.uuid4().hex[:12]
            log.exception("internal error %s in a ModelStreamInfer request", reference)
            await out.put(service_pb2.ModelStreamInferResponse(
                error_message=f"Internal server error (reference {reference}); the server log has the details."))


async def start_grpc_server(runtime: ServingRuntime, metrics: Metrics, host: str, port: int, api_key: str | None,
                            admin_key: str | None, max_message_bytes: int) -> tuple[grpc.aio.Server, int]:
    """Listening on `host:port` (0 picks a free port) in the running event loop; returns the port bound.

    Messages over `max_message_bytes` (the HTTP body limit) are refused by grpc itself with
    RESOURCE_EXHAUSTED before anything decodes them; SO_REUSEPORT is off, so a port in use is an error."""
    server = grpc.aio.server(maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS, options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max(max_message_bytes, 16 * 2**20)),
        ("grpc.so_reuseport", 0),
    ])
    add_GRPCInferenceServiceServicer_to_server(TritonServicer(runtime, metrics, api_key, admin_key), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen for gRPC on {address}: {exc}") from None
    if not bound:
        raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()
    return server, bound
