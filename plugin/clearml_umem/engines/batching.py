"""Concurrent requests for one transformers model share forward passes: transformers' own continuous
batching (`model.init_continuous_batching`, a `ContinuousBatchingManager` with a paged KV cache).

One manager per hot model runs one background thread; every step is one forward over the new
tokens of all its requests (a new request's prompt is prefilled in the same step as the others'
decoding, in chunks of at most `max_batch_tokens`), so a request's first token never waits for
other requests' whole answers, and on a GPU, where a short forward is bound by reading the
weights, N requests decode for about the price of one. It also removes the per-request cost of
`generate()`: profiled on the CPU (tiny-llama), a one-token answer took 12.7 ms through it against
a 7.6 ms forward (config validation and copies, `inspect.signature` of model kwargs, processor and
stopping-criteria lists, a thread start); a manager step costs what a plain decoding forward
does (6.9 ms), with 0.3 ms of batch preparation and 0.14 ms of update around it.

Only what the manager honours exactly goes through it (`why_not_batched`): greedy requests, and
sampled ones without a seed (OpenAI's default temperature is 1: most requests sample), with no
other per-token option. Each row carries its own temperature and top-p through the manager's
per-request warpers (transformers' `per_request_processors`), and a greedy row is top-k 1 among
them; where the installed transformers lacks those, the manager is greedy-only. A seed needs the
request's own generator, and logprobs, penalties, `logit_bias` and grammars are per-request logits
processors the manager cannot run per row: those requests take the engine's per-request path.

Tokens come back through the manager's output router, replaced here so that each step hands its
outputs to each event loop in one call (not one call per request); text assembly, stop strings
and cancellation happen on the event loop side, so the batching thread only computes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from clearml_umem.engines.base import EngineError, GenerationRequest
from clearml_umem.engines.constrained import constrained_schema
from clearml_umem.engines.graph_capture import gate_for, gate_of_this_step

log = logging.getLogger(__name__)

PAGE_SIZE = 64
"""Tokens per KV-cache block: small, so a short request holds little cache."""

MAX_BATCH_TOKENS = 512
"""Most tokens one step computes: a longer prompt is prefilled in chunks of this size, between which the
other requests' decoding steps run (their tokens keep flowing while a long prompt is read)."""

KV_PADDING_TOKENS = 1024
"""With CUDA graphs, the KV length a step reads is padded up to a multiple of this (one graph per multiple):
transformers' preset, 16384 tokens, would make every short request attend over the whole cache."""

KV_SHARE_OF_MARGIN = 0.5
"""Part of the device bytes budgeted on top of the weights (the activation margin) given to the paged KV
cache; the rest stays for activations and the per-request path's caches."""

_BATCHABLE_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "paged|eager")


ANY_TOP_K = 2**31 - 1
"""A sampled row's top-k: every token (the warper clamps it to the vocabulary)."""


BATCHING_TRANSFORMERS = (5, 25)
"""The oldest transformers whose continuous batching this module drives: it reaches into the manager
(`output_router`, `_generation_step`, `_wake_up_loop`, the `page_size` field), which moved between
releases. 5.17 renamed fields and has no `_wake_up_loop`; its top-k does not clamp. An older one
serves every request from the per-request path."""


def batching_unavailable(version: str) -> str | None:
    """Why this transformers version cannot batch here, or None."""
    try:
        release = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    except ValueError:
        return f"transformers {version} has an unreadable version"
    if release < BATCHING_TRANSFORMERS:
        need = ".".join(str(n) for n in BATCHING_TRANSFORMERS)
        return f"transformers {version} is older than {need}, the oldest whose continuous batching this engine drives"
    return None


@functools.cache
def installed_batching_unavailable() -> str | None:
    """`batching_unavailable` for the installed transformers, said once in the log."""
    import transformers

    reason = batching_unavailable(transformers.__version__)
    if reason is not None:
        log.warning("continuous batching is off: %s; each request runs its own generate() (pip install "
                    "'transformers>=%s' to batch)", reason, ".".join(str(n) for n in BATCHING_TRANSFORMERS))
    return reason


@functools.cache
def samples_per_row() -> bool:
    """Whether the installed transformers runs temperature and top-p per request in its batching."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    return "per_request_processors" in getattr(ContinuousBatchingConfig, "__dataclass_fields__", {})


@functools.cache
def gate_captures() -> bool:
    """Make every CUDA-graph capture of transformers' batching take its device's `CaptureGate` alone (once per
    process); False where the installed transformers captures elsewhere (then no model may capture)."""
    try:
        from transformers.generation.continuous_batching import model_runner
    except ImportError:
        return False
    runner = getattr(model_runner, "ModelRunner", None)
    original = getattr(runner, "_capture_graph", None)
    stream_context = getattr(model_runner, "stream_context", None)
    if original is None or stream_context is None:
        return False

    def capture_alone(self: Any, forward_fn: Callable[..., None], compute_stream: Any, *args: Any) -> None:
        gate = gate_of_this_step()
        if gate is None:
            original(self, forward_fn, compute_stream, *args)
            return
        with gate.capture() as alone:
            if alone:
                original(self, forward_fn, compute_stream, *args)
                return
        log.warning("a CUDA graph capture waited %g s for other models' steps: this step runs without it",
                    gate.wait_s)
        with stream_context(compute_stream):
            forward_fn(*args)

    runner._capture_graph = capture_alone
    return True


def why_not_batched(request: GenerationRequest, sampled: bool = True) -> str | None:
    """Why this request cannot share forwards (it takes the per-request path), or None when it can;
    `sampled`: whether sampled requests are batched at all (`Batcher.sampled`)."""
    if request.temperature > 0:
        if request.seed is not None:
            return "a seed: sampling draws from the request's own seeded generator, to reproduce its answer"
        if not sampled:
            return "sampling (temperature > 0): batched on a GPU, or with --batching all"
        if not samples_per_row():
            return "sampling (temperature > 0): this transformers' batching has no per-request temperature"
    options = request.options
    logprobs = options.get("logprobs")
    if logprobs is not None and logprobs is not False:
        return "logprobs"
    if options.get("frequency_penalty") or options.get("presence_penalty"):
        return "frequency or presence penalty"
    if options.get("logit_bias"):
        return "logit_bias"
    if constrained_schema(options) is not None:
        return "constrained decoding"
    return None


@dataclass(frozen=True)
class BatchingLimits:
    """How big the paged cache and each step may be, fixed from the engine's budget (never from free memory:
    the manager's default takes 90% of what the device has free, which other models need)."""

    max_requests: int
    cache_tokens: int
    max_batch_tokens: int = MAX_BATCH_TOKENS
    page_size: int = PAGE_SIZE
    cuda_graphs: bool = False


def kv_bytes_per_token(config: dict[str, Any], itemsize: int) -> int:
    layers = int(config.get("num_hidden_layers") or 1)
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size") or heads) // heads)
    return 2 * layers * kv_heads * head_dim * itemsize


class _Router:
    """Stands in for the manager's `OutputRouter`: outputs go to `sink` in the batching thread, a step's
    outputs at once."""

    def __init__(self, sink: Callable[[list[Any]], None]) -> None:
        import queue

        self._sink = sink
        self.output_queue: Any = queue.Queue()
        self.result_handlers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def deliver(self, output: Any) -> None:
        self._sink([output])

    def deliver_batch(self, outputs: list[Any]) -> None:
        self._sink(outputs)

    def fail_and_deliver(self, state: Any, error: Exception) -> None:
        from transformers.generation.continuous_batching.requests import RequestStatus

        state.status = RequestStatus.FAILED
        state.error = str(error)
        self.deliver(state.to_generation_output())


@dataclass(frozen=True)
class BatchOutput:
    """What a request got from one step: every token so far (the manager sends the whole list), and
    whether it is over (finished, or failed with `error`)."""

    tokens: list[int]
    finished: bool
    error: str | None


Listener = Callable[[BatchOutput], None]
"""Called on the request's event loop."""


class Batcher:
    """One model's continuous-batching manager: started on first use, stopped when the model leaves the device."""

    def __init__(self, name: str, limits: BatchingLimits, sampled: bool = False) -> None:
        self.name = name
        self.limits = limits
        self.sampled = sampled
        """Sampled requests share this manager's forwards too: each step then also sorts the vocabulary
        per row (the top-k and top-p warpers), which a GPU does in a sliver of a step and a CPU with a
        small model does not (a lone greedy request at 0.81-0.93x on tiny-llama, measured)."""
        self._lock = threading.Lock()
        self._manager: Any = None
        self._listeners: dict[str, tuple[Any, Listener]] = {}
        self._counter = 0
        self.steps = 0
        """Forward passes the manager ran (each shared by every request in it)."""
        self.widest_step = 0
        """Most requests that got a token from one step."""
        self.last_progress = 0.0
        """Monotonic time of the last step: progress for the stall detection (CUDA graphs run no hooks)."""
        self._stopping = False
        self._failure: str | None = None

    @property
    def sampling(self) -> bool:
        """The manager samples per row (else it is greedy only)."""
        return self.sampled and samples_per_row()

    @staticmethod
    def supports(model: Any) -> bool:
        """The manager needs a transformers this module knows and an attention it can page (not a model loaded
        with eager attention, for instance)."""
        if installed_batching_unavailable() is not None:
            return False
        impl = getattr(model.config, "_attn_implementation", None)
        return callable(getattr(model, "init_continuous_batching", None)) and impl in _BATCHABLE_ATTENTION

    @property
    def running(self) -> bool:
        return self._manager is not None and self._manager.is_running()

    @property
    def broken(self) -> bool:
        """A request failed in the manager for another reason than `stop` (its thread died of an error, which
        fails every request it held): set before that request's listener hears of it."""
        return self._failure is not None

    def start(self, model: Any, eos: list[int], pad: int) -> None:
        """Create and start the manager (idempotent): allocates the paged cache, in a worker thread."""
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        with self._lock:
            if self.running:
                return
            self._stopping = False
            limits = self.limits
            device = str(getattr(model, "device", "cpu"))
            gate = gate_for(device) if device.startswith("cuda") else None
            if limits.cuda_graphs and not gate_captures():
                log.warning("model %s: batching without CUDA graphs: this transformers' graph capture cannot be "
                            "kept from other models' steps", self.name)
                limits = self.limits = replace(limits, cuda_graphs=False)
            blocks = max(2, -(-limits.cache_tokens // limits.page_size))
            sampling = self.sampling
            cb_config = ContinuousBatchingConfig(
                **({"per_request_processors": True} if sampling else {}),
                page_size=limits.page_size, num_blocks=blocks, max_batch_tokens=limits.max_batch_tokens,
                max_requests_per_batch=limits.max_requests, auto_switch_to_flash=False,
                use_cuda_graph=limits.cuda_graphs, allow_block_sharing=False,
                kv_padding_interval_size=KV_PADDING_TOKENS if limits.cuda_graphs else 0)
            if sampling:
                # any values other than the neutral ones, so that the three warpers exist; each request sets its own
                generation = GenerationConfig(do_sample=True, temperature=0.5, top_k=1, top_p=0.5, max_new_tokens=16,
                                              eos_token_id=eos or -1, pad_token_id=pad)
            else:
                generation = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=eos or -1,
                                              pad_token_id=pad)
            with torch.inference_mode():
                manager = model.init_continuous_batching(generation_config=generation,
                                                         continuous_batching_config=cb_config)
                manager.output_router = _Router(self._deliver)
                original_step = manager._generation_step

                def counted_step() -> None:
                    if gate is None:
                        original_step()
                    else:  # a sampled step must not run while another model captures a graph
                        with gate.step():
                            original_step()
                    self.steps += 1
                    self.last_progress = time.monotonic()

                manager._generation_step = counted_step
                # no warmup: graphs are captured on the first step of each padded shape, in the batching
                # thread, so a swap-out never waits for a capture of shapes nobody asked for
                manager.start()
            self._manager = manager
            log.info("model %s: continuous batching started (%d requests, %d cache tokens, cuda graphs %s)",
                     self.name, limits.max_requests, blocks * limits.page_size, limits.cuda_graphs)

    def submit(self, loop: Any, prompt: list[int], max_tokens: int, eos: list[int], listener: Listener,
               temperature: float = 0.0, top_p: float = 1.0) -> str:
        """Queue one request; `listener` is called on `loop` with each step's output for it."""
        manager = self._manager
        if manager is None or not manager.is_running():
            raise EngineError(f"model {self.name!r}: continuous batching is not running")
        with self._lock:
            self._counter += 1
            request_id = f"umem-{self._counter}"
            self._listeners[request_id] = (loop, listener)
        row: dict[str, Any] = {}
        if self.sampling:
            row = ({"temperature": 1.0, "top_k": 1, "top_p": 1.0} if temperature <= 0 else
                   {"temperature": float(temperature), "top_k": ANY_TOP_K, "top_p": float(top_p)})
        elif temperature > 0:
            raise EngineError(f"model {self.name!r}: this batching is greedy only")
        added = manager.add_request(prompt, request_id=request_id, max_new_tokens=max_tokens, streaming=True,
                                    eos_token_id=eos or -1, **row)
        if added is None:
            self.forget(request_id)
            raise EngineError(f"model {self.name!r}: continuous batching refused the request (it is stopping)")
        return request_id

    def cancel(self, request_id: str) -> None:
        manager = self._manager
        if manager is not None:
            manager.cancel_request(request_id)

    def holds(self, request_id: str) -> bool:
        """Whether the manager still holds the request (queued, waiting or active): its KV blocks are not free yet."""
        manager = self._manager
        if manager is None or not manager.is_running():
            return False
        if _queued(manager.input_queue, lambda s: s.request_id == request_id) or _queued(
                manager.cancel_queue, lambda r: r == request_id):
            return True
        processor = manager.batch_processor
        if processor is None:
            return True
        scheduler = processor.scheduler
        return request_id in scheduler.active_requests or request_id in scheduler.waiting_requests

    def in_flight(self) -> int:
        """Requests the manager holds now (queued, waiting or active)."""
        manager = self._manager
        if manager is None or manager.batch_processor is None:
            return 0
        scheduler = manager.batch_processor.scheduler
        return len(scheduler.active_requests) + len(scheduler.waiting_requests) + manager.input_queue.qsize()

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._listeners.pop(request_id, None)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the thread (requests still in it fail) and drop the paged cache and CUDA graphs, which
        belong to this copy of the weights.

        Not `manager.stop()`: it and the batch processor's `__del__` run `gc.collect()`, which took
        2.3 s in a router process here (400k objects), and a swap-out takes milliseconds. The cache's
        tensors are freed by reference counting once the processor is dropped."""
        from transformers.generation.continuous_batching.continuous_api import BackgroundThreadStatus

        with self._lock:
            manager, self._manager = self._manager, None
            self._stopping = True
        if manager is None:
            return
        thread = manager._generation_thread
        if thread is not None and thread.is_alive():
            manager.background_thread_status.request_stop(BackgroundThreadStatus.HARD_STOP,
                                                          manager.distributed_helper.global_rank)
            manager._wake_up_loop.set()
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("model %s: the batching thread did not stop within %g s", self.name, timeout_s)
        if manager._original_attn_impl is not None:
            manager.model.set_attn_implementation(manager._original_attn_impl)
            manager._original_attn_impl = None
        processor, manager.batch_processor = manager.batch_processor, None
        if processor is not None:
            processor.__class__ = _quiet(type(processor))
            processor.inputs_and_outputs = None
        vars(manager).pop("_generation_step", None)  # the counting wrapper refers back to the manager
        with self._lock:
            listeners, self._listeners = self._listeners, {}
        for request_id, (loop, listener) in listeners.items():
            _call_soon(loop, [(listener, BatchOutput([], True, f"model {self.name!r}: batching stopped"))])
            log.debug("request %s ended by the stop", request_id)

    def _deliver(self, outputs: list[Any]) -> None:
        """In the batching thread: each loop gets its requests' outputs in one callback."""
        from transformers.generation.continuous_batching.requests import RequestStatus

        by_loop: dict[Any, list[tuple[Listener, BatchOutput]]] = {}
        with self._lock:
            for output in outputs:
                entry = self._listeners.get(output.request_id)
                if entry is None:
                    continue
                finished = output.status >= RequestStatus.FINISHED
                if output.error is not None and not self._stopping:
                    self._failure = output.error
                if finished:
                    del self._listeners[output.request_id]
                loop, listener = entry
                by_loop.setdefault(loop, []).append(
                    (listener, BatchOutput(list(output.generated_tokens), finished, output.error)))
        self.widest_step = max(self.widest_step, len(outputs))
        for loop, items in by_loop.items():
            _call_soon(loop, items)


@functools.cache
def _quiet(cls: type) -> type:
    """`cls` without its `__del__` (a full `gc.collect()`)."""
    return type(f"Quiet{cls.__name__}", (cls,), {"__del__": lambda self: None})


def _call_soon(loop: Any, items: list[tuple[Listener, BatchOutput]]) -> None:
    def run() -> None:
        for listener, output in items:
            listener(output)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
        loop.call_soon_threadsafe(run)


def _queued(q: Any, match: Callable[[Any], bool]) -> bool:
    with q.mutex:
        return any(match(item) for item in q.queue)
