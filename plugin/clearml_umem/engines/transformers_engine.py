"""In-process engine over a Hugging Face model directory, tiered with real tensor copies.

This engine is what runs everywhere: on a CPU-only machine (tests, the demo) the "device"
is the CPU and the tiers are logical, but every move still copies the real bytes, so the
swap timings and byte counts the metrics report are honest. On a CUDA machine the same
code frees device memory on the way out and copies back from page-locked host memory.

The weights live in one flat buffer per place (`weight_store`): parameters are views into
a single device buffer, and the host copy has the same layout, so a swap-in is one large
copy at the speed of the link.

Representation, per tier:
- GPU: the device buffer; with the host copy kept (the default when the host budget is
  ample), the host buffer too, so that leaving the GPU only frees device memory.
- RAM: the host buffer; parameters are empty.
- DISK: neither buffer; the module skeleton, its buffers and the tokenizer stay, so a
  reload only reads the safetensors files back.
- COLD: nothing is held.

Buffers never move: they are small, and some (rotary `inv_freq`) are computed at init and
are not in the checkpoint, so dropping them would make a reload from disk impossible.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from clearml_umem.config import BATCHING_MODES, HOST_COPY_MODES
from clearml_umem.daemon_workers import DaemonWorkers, Running
from clearml_umem.engines.base import (
    Delta,
    EngineContext,
    EngineError,
    EngineOutOfMemory,
    Footprint,
    GenerationRequest,
    InvalidRequest,
    MoveResult,
)
from clearml_umem.engines.batching import (
    KV_SHARE_OF_MARGIN,
    Batcher,
    BatchingLimits,
    BatchOutput,
    kv_bytes_per_token,
    why_not_batched,
)
from clearml_umem.engines.constrained import GuidanceTokenizers
from clearml_umem.engines.layer_pipeline import CopyFailed, LayerPipeline, forward_order, plan_stages
from clearml_umem.engines.moves import MoveTable
from clearml_umem.engines.overlapped_read import ReadCancelled, stream_checkpoint
from clearml_umem.engines.progress import MoveProgress
from clearml_umem.engines.prompt_check import PromptBound, PromptCounter, check_fits, prompt_ids
from clearml_umem.engines.request_decoding import AnswerShaper, RequestDecoding, check_options
from clearml_umem.engines.weight_store import (
    CheckpointMismatch,
    CorruptCheckpoint,
    FlatLayout,
    HostBuffer,
    ShapeMismatch,
    copy_in_chunks,
    plan_reads,
    safetensors_header,
)
from clearml_umem.long_lived import collect_everything
from clearml_umem.spec import ModelSpec, context_length_from_config, read_hf_config
from clearml_umem.tiers import ALL_TIERS, Tier

log = logging.getLogger(__name__)

GENERATIONS = DaemonWorkers("umem-generate")
"""The workers of per-request generations (`_generate_solo`), shared by every transformers model."""

ACTIVATION_MARGIN_FRACTION = 0.15
"""Device bytes budgeted on top of the weights for activations and the KV cache.

Footprint on GPU = weight bytes in the load dtype * (1 + ACTIVATION_MARGIN_FRACTION),
rounded up. Proportional on purpose: a few-MB demo model must stay a few MB in the
budget, and for real models 15% covers the dynamic KV cache of a handful of concurrent
requests of moderate length (Llama-3-8B: 2.4 GB, about 19k tokens of KV cache).
Override with `EngineContext.options["activation_margin_fraction"]`.
"""

COUNT_TOLERANCE = 1.01
"""How much more than the checkpoint's headers count the module config.json describes may hold
before a load through `from_pretrained` is refused (buffers registered as parameters...)."""

STALL_TIMEOUT_S = 30.0
"""A generation that makes no step this long (no token, and no layer of the model ends a forward
pass: a long prefill is progress) is stuck: its client gets an error and the model counts as
hung (`EngineContext.options["stall_timeout_s"]`)."""

BATCHED_CPU_CONCURRENCY = 32
"""Requests one model takes at once on a CPU when batching is on: batched ones share each forward pass;
the others still run at most one per core (`_solo_limit`)."""

MODULE_BUILD = threading.Lock()
"""One model module built at a time in this process. A build changes process-wide state for its
length: transformers sets torch's default dtype (`dtype=`), accelerate's `init_empty_weights` patches
`nn.Module.register_parameter`. Three models loaded at once by the first requests after a start mixed
bfloat16 and float32 parameters inside one model (its requests failed: "mat1 and mat2 must have the
same dtype") and left the default dtype at bfloat16 for the whole process."""

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_SINGLE = "model.safetensors"
_FLOAT_CHECKPOINT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
_CHECKPOINT_ITEMSIZE = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


MOVES: MoveTable[tuple[Tier, Tier]] = MoveTable({(a, b): (a, b) for a in ALL_TIERS for b in ALL_TIERS if a is not b})
"""Every tier to every other in one step: `_step` builds any tier from the three parts it is made of."""


def keep_host_copy(ctx: EngineContext) -> bool:
    """Whether a hot model keeps its host copy, which makes its swap-out free.

    `keep` and `evict` say so; `auto` keeps it when the host budget is at least the device
    budget (or either is unknown): the copies of everything the device can hold then fit in
    host RAM, so no model is refused or evicted for its copy, and what they take there the
    RAM tier would need anyway the moment those models are evicted. With less host memory
    than device memory, copying on eviction leaves the host budget to models in RAM.
    """
    mode = str(ctx.options.get("host_copy", "auto")).strip().lower()
    if mode not in HOST_COPY_MODES:
        raise EngineError(f"host_copy must be one of {', '.join(HOST_COPY_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode == "keep"
    if ctx.device_budget_bytes is None or ctx.host_budget_bytes is None:
        return True
    return ctx.host_budget_bytes >= ctx.device_budget_bytes


def pipelined_swap_in(ctx: EngineContext) -> bool:
    """Whether a swap-in lets the first forward start while the weights arrive (`layer_pipeline`): on
    unless `ctx.options["pipelined_swap_in"]` says otherwise (the serve setting of that name)."""
    value = ctx.options.get("pipelined_swap_in", True)
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off")
    return bool(value)


def _move_buffers(model: Any, device: torch.device) -> None:
    """Buffers, and tensors modules keep as plain attributes (rotary `original_inv_freq`), to `device`."""
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) and value.device != device:
                setattr(module, name, value.to(device))


def _materialize_parameters(model: Any, device: torch.device) -> None:
    """Replace meta parameters by empty ones on `device`, keeping tied ones tied (one object each)."""
    fresh: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in fresh:
                fresh[id(param)] = torch.nn.Parameter(torch.empty(0, dtype=param.dtype, device=device),
                                                      requires_grad=False)
            module._parameters[name] = fresh[id(param)]


def resolve_device(name: str) -> torch.device:
    """`auto` means CUDA when there is one, so one manifest serves on a laptop and on a GPU box."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise EngineError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def checkpoint_files(weights: Path) -> list[Path]:
    """The safetensors files of a model directory, sharded or not; [] when there are none."""
    index = weights / _SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [weights / name for name in sorted(set(weight_map.values()))]
    single = weights / _SAFETENSORS_SINGLE
    if single.is_file():
        return [single]
    return sorted(weights.glob("*.safetensors")) if weights.is_dir() else []


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Tensor names, dtypes and shapes without reading the tensors: footprints are needed before loading.

    Bounded and validated (weights are untrusted): a text file named model.safetensors is an
    EngineError naming the file, not a MemoryError from a header length of 8 random bytes.
    """
    try:
        return safetensors_header(path)[0]
    except (CheckpointMismatch, OSError, ValueError) as exc:
        raise EngineError(f"{path}: not a readable safetensors file: {exc}") from None


def _dtype_from_config(cfg: dict[str, Any]) -> torch.dtype | None:
    for key in ("dtype", "torch_dtype"):
        value = cfg.get(key)
        if isinstance(value, str) and value in _TORCH_DTYPES:
            return _TORCH_DTYPES[value]
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(eq=False)
class _Job:
    """One generation: the state shared between the event loop and its worker thread (hashed by identity)."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[str, Any]]
    done: asyncio.Future[None]
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: Running | None = None
    """Its `generate()` in a worker (`GENERATIONS`)."""
    stalled: bool = False
    """Its thread made no step for the stall timeout: its client got an error and nobody waits for it."""

    def post(self, kind: str, payload: Any) -> None:
        """Hand an item to the loop; a closed loop means nobody listens any more, so stop generating."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))
        except RuntimeError:
            self.cancel.set()

    def finish(self, kind: str, payload: Any) -> None:
        """Post the last item and resolve `done` in one callback: the consumer never sees one without the other."""

        def _deliver() -> None:
            self.queue.put_nowait((kind, payload))
            if not self.done.done():
                self.done.set_result(None)

        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_deliver)


class _TextAssembler:
    """Turns generated token ids into text pieces, honouring stop strings.

    Decoding is incremental with a sliding prefix (as vLLM does): each step decodes a few
    tokens and emits only what they add, and waits while the text ends in U+FFFD, so a
    multi-byte character split across tokens is never emitted half-way. Text that could be
    the start of a stop string is held back until it is known not to be one.
    """

    def __init__(self, tokenizer: Any, stop: Iterable[str]) -> None:
        self._tokenizer = tokenizer
        self._stops = [s for s in stop if s]
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""
        self._sent = 0
        self.stopped = False

    @property
    def token_count(self) -> int:
        return len(self._ids)

    @property
    def last_token(self) -> int | None:
        return self._ids[-1] if self._ids else None

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_ids: list[int]) -> str:
        """Take new tokens; return the text that may be sent now."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._append(full[len(prefix):])

    def flush(self) -> str:
        """Everything still held back, once generation has ended (an unfinished character included)."""
        piece = ""
        if not self.stopped:
            prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
            full = self._decode(self._ids[self._prefix_offset:])
            self._prefix_offset = self._read_offset = len(self._ids)
            if len(full) > len(prefix):
                piece = self._append(full[len(prefix):])
        rest = self.text[self._sent:]
        self._sent = len(self.text)
        return piece + rest

    def _append(self, piece: str) -> str:
        search_from = max(0, len(self.text) - self._max_stop + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, search_from) for s in self._stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            return self.flush()
        safe = len(self.text) - self._held_back()
        piece, self._sent = self.text[self._sent:safe], max(self._sent, safe)
        return piece

    def _held_back(self) -> int:
        for k in range(min(len(self.text), self._max_stop - 1), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0


class TransformersEngine:
    """A Hugging Face causal LM in this process, movable between all four tiers."""

    def __init__(self, spec: ModelSpec, ctx: EngineContext) -> None:
        self.spec = spec
        self.ctx = ctx
        self.device = resolve_device(ctx.device)
        self.weights = Path(spec.weights)
        self._config = read_hf_config(self.weights)
        self.dtype = self._load_dtype()
        self.context_length = spec.context_length or context_length_from_config(self._config)
        self._margin = float(ctx.options.get("activation_margin_fraction", ACTIVATION_MARGIN_FRACTION))
        self._pin = self.device.type == "cuda"
        self._tier = Tier.COLD
        self._model: Any = None
        self._tokenizer: Any = None
        self._params: dict[str, torch.nn.Parameter] = {}
        self._layout: FlatLayout | None = None
        self._device_flat: torch.Tensor | None = None
        self._host: HostBuffer | None = None
        self._estimated_bytes: int | None = None
        self._prompt_counter = PromptCounter(spec.name, self.weights)
        self._guidance = GuidanceTokenizers()
        self.keep_host_copy = keep_host_copy(ctx)
        self._move_lock = threading.Lock()
        self._cancel_reads = threading.Event()
        self._state_lock = threading.Lock()
        self._moving = False
        self._jobs: set[_Job] = set()
        self._progress = MoveProgress()
        self.stall_s = float(ctx.options.get("stall_timeout_s", STALL_TIMEOUT_S))
        self._last_step = 0.0
        self.pipelined_swap_in = pipelined_swap_in(ctx)
        self._landing: LayerPipeline | None = None
        self._last_copy_s: float | None = None
        self.batching = str(ctx.options.get("batching", "auto")).strip().lower()
        if self.batching not in BATCHING_MODES:
            raise EngineError(f"batching must be one of {', '.join(BATCHING_MODES)}, got {self.batching!r}")
        self._batch_sampled = self.batching == "all" or (self.batching == "auto" and self.device.type != "cpu")
        """Sampled requests are batched too (`batching.Batcher.sampled`)."""
        self._batcher: Batcher | None = None
        self._batch_starter: threading.Thread | None = None
        self._batch_failed = False
        self._batch_start_lock = threading.Lock()
        self._batch_eos: list[int] = []
        self._solo_slots: threading.BoundedSemaphore | None = None

    # ------------------------------------------------------------------ facts

    @property
    def tiers(self) -> frozenset[Tier]:
        return frozenset(ALL_TIERS)

    @property
    def transits(self) -> dict[tuple[Tier, Tier], Tier]:
        """From the move table: every move is one step (cold -> disk builds the skeleton only)."""
        return MOVES.transits

    @property
    def tier(self) -> Tier:
        return self._tier

    @property
    def active_generations(self) -> int:
        with self._state_lock:
            return len(self._jobs)

    @property
    def model(self) -> Any:
        """The live module (None when cold), for tests and diagnostics; do not move it behind the engine's back.
        Its weights are all on the device (`weights_ready`)."""
        self.weights_ready()
        return self._model

    def weights_ready(self) -> None:
        """Wait until a pipelined swap-in's weights have all landed: for code that reads them other than
        through the module's forward (whose layers each wait for their own). Raises EngineError when
        the copy failed or did not end within the stall timeout."""
        pipeline = self._landing
        if pipeline is None:
            return
        try:
            pipeline.wait(self.stall_s)
        except (CopyFailed, TimeoutError) as exc:
            raise EngineError(f"model {self.spec.name!r}: swap-in to the device failed: {exc}") from exc

    @property
    def host_buffer(self) -> HostBuffer | None:
        """The host copy of the weights (RAM tier, or GPU tier when the copy is kept), for tests."""
        return self._host

    def _load_dtype(self) -> torch.dtype:
        """`auto` keeps the checkpoint's precision: casting a bf16 model to fp32 would double every copy."""
        if self.spec.dtype != "auto":
            return _TORCH_DTYPES[self.spec.dtype]
        dtype = _dtype_from_config(self._config)
        if dtype is not None:
            return dtype
        for path in checkpoint_files(self.weights):
            for info in read_safetensors_header(path).values():
                name = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(info.get("dtype", ""))
                if name:
                    return _TORCH_DTYPES[name]
        return torch.float32

    @property
    def weight_bytes(self) -> int:
        """Parameter bytes in the load dtype: exact once loaded, from the checkpoint headers before."""
        if self._layout is not None:
            return self._layout.param_bytes
        if self._estimated_bytes is None:
            self._estimated_bytes = self._estimate_weight_bytes()
        return self._estimated_bytes

    def _estimate_weight_bytes(self) -> int:
        files = checkpoint_files(self.weights)
        if not files:
            return self.spec.size_bytes
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        total = 0
        for path in files:
            for info in read_safetensors_header(path).values():
                numel = math.prod(info.get("shape", []))
                kind = info.get("dtype", "")
                size = itemsize if kind in _FLOAT_CHECKPOINT_DTYPES else _CHECKPOINT_ITEMSIZE.get(kind, itemsize)
                total += numel * size
        return total

    @property
    def max_concurrency(self) -> int:
        """Requests this model may run at once; the scheduler queues the others.

        With batching off, as many as run their own `generate()` (`_solo_limit`). With it on,
        more: batched requests share forwards and the paged cache; on a CPU
        `BATCHED_CPU_CONCURRENCY`, on a GPU one per 512 tokens of the paged cache (at most 64).
        Requests that take the per-request path still run at most `_solo_limit` at once.
        `EngineContext.options["max_concurrency"]` overrides it.
        """
        option = self.ctx.options.get("max_concurrency")
        if option:
            return max(1, int(option))
        solo = self._solo_limit()
        if self.batching == "off":
            return solo
        if self.device.type == "cpu":
            return max(solo, BATCHED_CPU_CONCURRENCY)
        return max(solo, min(64, self._paged_cache_tokens() // 512))

    def _solo_limit(self) -> int:
        """Per-request generations at once: on a CPU one per core (more only slow each other down); on a GPU
        as many KV caches of up to 4096 tokens as the activation margin holds (the part the paged cache
        leaves, when batching is on), at most 64."""
        if self.device.type == "cpu":
            return max(1, os.cpu_count() or 1)
        margin = self._margin * (1 - KV_SHARE_OF_MARGIN if self.batching != "off" else 1)
        per_request = self._kv_bytes_per_token() * min(self.context_length or 4096, 4096)
        return max(1, min(64, int(self.weight_bytes * margin // max(per_request, 1))))

    def _paged_cache_tokens(self) -> int:
        """The paged cache: on a GPU a share of the activation margin (which the footprint budgets), on a
        CPU room for every request at once up to 1024 tokens each."""
        if self.device.type == "cpu":
            return BATCHED_CPU_CONCURRENCY * min(self.context_length or 1024, 1024)
        return int(self.weight_bytes * self._margin * KV_SHARE_OF_MARGIN // max(self._kv_bytes_per_token(), 1))

    def _kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self._config, torch.empty((), dtype=self.dtype).element_size())

    def _batching_limits(self) -> BatchingLimits:
        return BatchingLimits(max_requests=self.max_concurrency, cache_tokens=self._paged_cache_tokens(),
                              cuda_graphs=self.device.type == "cuda"
                              and bool(self.ctx.options.get("batching_cuda_graphs", True)))

    def footprint(self, tier: Tier) -> Footprint:
        """While hot, the kept host copy counts against the host budget like a model in RAM."""
        weights = self.weight_bytes
        if tier is Tier.GPU:
            return Footprint(device_bytes=math.ceil(weights * (1.0 + self._margin)),
                             host_bytes=weights if self.keep_host_copy else 0)
        if tier is Tier.RAM:
            return Footprint(device_bytes=0, host_bytes=weights)
        return Footprint()

    def describe(self) -> dict[str, Any]:
        return {
            "engine": "transformers",
            "device": str(self.device),
            "dtype": _dtype_name(self.dtype),
            "tier": self._tier.value,
            "weights": str(self.weights),
            "param_bytes": self.weight_bytes,
            "context_length": self.context_length,
            "pinned_host_memory": self._pin,
            "host_copy": "kept while hot" if self.keep_host_copy else "copied on eviction",
            "host_pinned_by": self._host.pinned_by if self._host is not None else None,
            "swap_in": "pipelined" if self.pipelined_swap_in and self.keep_host_copy else "sequential",
            "last_swap_in_copy_s": self._copy_seconds(),
            "active_generations": self.active_generations,
            "max_concurrency": self.max_concurrency,
            "batching": self.batching,
            "batching_running": self._batcher is not None and self._batcher.running,
        }

    def _copy_seconds(self) -> float | None:
        """The last swap-in's copy, in seconds (a pipelined one once it landed)."""
        pipeline = self._landing
        if pipeline is not None and pipeline.done:
            return pipeline.landed_s
        return self._last_copy_s

    def progress(self) -> dict[str, Any] | None:
        """The stage of the move under way and its bytes done of the total, or None when none runs."""
        return self._progress.snapshot()

    # ------------------------------------------------------------------ moves

    async def move(self, src: Tier, dst: Tier) -> MoveResult:
        src, dst = Tier(src), Tier(dst)
        if src == dst:
            raise EngineError(f"model {self.spec.name!r}: move from {src} to itself")
        return await asyncio.to_thread(self._move_sync, src, dst)

    def _move_sync(self, src: Tier, dst: Tier) -> MoveResult:
        with self._move_lock:
            self._settle()
            with self._state_lock:
                if self._tier is not src:
                    raise EngineError(f"model {self.spec.name!r} is in tier {self._tier}, not {src}")
                if src is Tier.GPU and self._jobs:
                    raise EngineError(f"model {self.spec.name!r} has {len(self._jobs)} generation(s) in flight;"
                                      " it cannot leave the device")
                stuck = sum(1 for job in self._jobs if job.stalled and job.thread is not None
                            and job.thread.is_alive())
                if stuck and src is Tier.COLD:
                    raise EngineError(f"model {self.spec.name!r}: a hung generation thread still holds its previous "
                                      "copy; it is loaded again once that thread returns")
                self._moving = True
            self._progress.begin()
            try:
                host_copy = None
                if (src, dst) == (Tier.GPU, Tier.RAM):
                    host_copy = "kept" if self._host is not None else "copied"
                moved = 0
                for stop, step in MOVES.route(src, dst):
                    moved += self._run_step(lambda step=step: self._step(*step))
                    self._tier = stop
                landing = self._landing.landing if self._landing is not None else None
                return MoveResult(bytes_moved=moved, host_copy=host_copy, landing=landing)
            finally:
                self._progress.end()
                with self._state_lock:
                    self._moving = False

    def _step(self, src: Tier, dst: Tier) -> int:
        """One move as a few steps on the three things a tier is made of.

        The skeleton (module with empty parameters, buffers, tokenizer) exists in every tier
        but cold; the host buffer in RAM, and on the GPU when the copy is kept; the device
        buffer on the GPU only. Returns the bytes copied.
        """
        if dst is Tier.COLD:
            return self._unload()
        try:
            if src is Tier.COLD:
                self._build_skeleton()
            if dst is Tier.DISK:
                self._release_device()
                self._release_host()
                return 0
            if dst is Tier.RAM:
                moved = 0
                if self._host is None:
                    moved = self._download() if src is Tier.GPU else self._read_host()
                self._release_device()
                return moved
            # dst is GPU
            if self._host is None and not self.keep_host_copy:
                return self._read_device()
            if self._host is None:
                return self._read_host_and_upload()
            # a kept host copy outlives the move, so the copy may still run when the move ends
            moved = self._upload(pipelined=self.keep_host_copy and self.pipelined_swap_in)
            if not self.keep_host_copy:
                self._release_host()
            return moved
        except BaseException:
            if src is Tier.COLD:
                self._unload()
            elif dst is Tier.GPU:
                self._release_device()
                if src is not Tier.RAM:
                    self._release_host()
            raise

    def _run_step(self, step: Callable[[], int]) -> int:
        try:
            with torch.no_grad():
                return step()
        except torch.OutOfMemoryError as exc:
            raise EngineOutOfMemory(f"model {self.spec.name!r}: out of device memory: {exc}") from exc
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"model {self.spec.name!r}: {type(exc).__name__}: {exc}") from exc

    def _build_skeleton(self) -> None:
        """The module with its buffers on the device and parameters allocated nowhere yet.

        Parameters start on the meta device (accelerate's `init_empty_weights`) while buffers
        are computed for real, rotary `inv_freq` included, which is not in the checkpoint.
        Checkpoints whose tensor names do not match the module's go through `from_pretrained`
        instead, which knows every conversion; its weights then seed the host buffer.
        """
        self._progress.stage("building the model")
        tokenizer = AutoTokenizer.from_pretrained(self.weights)
        files = checkpoint_files(self.weights)
        model = self._empty_model()
        if model is not None:
            layout = forward_order(model)
            try:
                plan_reads(files, layout)
            except ShapeMismatch as exc:
                raise EngineError(f"model {self.spec.name!r}: config.json does not match the checkpoint: "
                                  f"{exc}") from None
            except CorruptCheckpoint as exc:
                raise EngineError(f"model {self.spec.name!r}: {exc}") from None
            except CheckpointMismatch as exc:
                self._refuse_over_count(layout.param_bytes, str(exc))
                model = None
        else:
            self._refuse_over_count(self._config_param_bytes(), "the checkpoint is not read directly")
        self._tokenizer = tokenizer
        if model is None:
            self._adopt_loaded(self._load_on_cpu())
            return
        _materialize_parameters(model, self.device)
        self._adopt(model, layout)

    def _refuse_over_count(self, module_bytes: int, why: str) -> None:
        """Before `from_pretrained` (which allocates what config.json says): refuse a module larger
        than the footprint the budgets counted from the checkpoint's headers, so no load path
        allocates more than was counted (hidden_size 10^7 in config.json grew the router to 4.2 GB
        against a 100 MB host budget)."""
        counted = self._estimate_weight_bytes()
        if module_bytes > counted * COUNT_TOLERANCE + 2**20:
            raise EngineError(
                f"model {self.spec.name!r}: config.json describes {module_bytes / 1e6:.1f} MB of parameters "
                f"but the checkpoint holds {counted / 1e6:.1f} MB ({why}); config.json does not match the weights")

    def _config_param_bytes(self) -> int:
        """Parameter bytes of the module config.json describes, built on the meta device (nothing allocated)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.weights)
        with MODULE_BUILD, torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        return FlatLayout.of_module(model).param_bytes

    def _empty_model(self) -> Any:
        if importlib.util.find_spec("accelerate") is None or not checkpoint_files(self.weights):
            return None
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        hf_logging.disable_progress_bar()
        config = AutoConfig.from_pretrained(self.weights)
        with MODULE_BUILD, init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        # transformers 5.24 leaves tied weights untied on the meta device: the layout would then want
        # an lm_head the checkpoint does not hold, and the load fall back to from_pretrained (or be refused)
        model.tie_weights()
        with contextlib.suppress(OSError, ValueError):
            model.generation_config = GenerationConfig.from_pretrained(self.weights)
        if self.device.type != "cpu":
            _move_buffers(model, self.device)
        return model

    def _adopt(self, model: Any, layout: FlatLayout) -> None:
        """Remember the parameters by name; `named_parameters` dedups tied weights, so each is moved once."""
        model.eval()
        for layers in (m for m in model.modules() if isinstance(m, torch.nn.ModuleList)):
            for layer in layers:
                layer.register_forward_hook(self._stepped)
        self._model = model
        self._params = dict(model.named_parameters())
        self._layout = layout
        self._release_device()

    def _stepped(self, *_: Any) -> None:
        """A layer ran a forward pass: generation makes progress, the prompt's prefill included
        (a long prefill is one step with no token, yet each of its layers ends)."""
        self._last_step = time.monotonic()

    def _adopt_loaded(self, model: Any) -> None:
        """A module loaded by `from_pretrained` on the CPU: its weights become the host buffer."""
        layout = forward_order(model)
        host = self._host_from_module(model, layout)
        if self.device.type != "cpu":
            _move_buffers(model, self.device)
        self._adopt(model, layout)
        self._host = host

    def _host_from_module(self, model: Any, layout: FlatLayout) -> HostBuffer:
        params = dict(model.named_parameters())
        host = HostBuffer(layout.total_bytes, self._pin)
        for name, view in layout.views(host.tensor).items():
            view.copy_(params[name].data)
        return host

    def _reads_directly(self, files: list[Path]) -> bool:
        """Whether the files hold the layout's tensors as raw bytes (else `from_pretrained` converts
        them); a damaged file is an error naming it, not a fallback."""
        assert self._layout is not None
        try:
            plan_reads(files, self._layout)
        except CorruptCheckpoint as exc:
            raise EngineError(f"model {self.spec.name!r}: {exc}") from None
        except CheckpointMismatch:
            return False
        return True

    def _stream(self, files: list[Path], host: torch.Tensor | None, device: torch.Tensor | None) -> None:
        """The checkpoint into the host buffer, the device buffer or both, reads and uploads overlapping
        (`overlapped_read`); `close` cancels it."""
        assert self._layout is not None
        try:
            stream_checkpoint(files, self._layout, host_flat=host, device_flat=device, on_bytes=self._progress.add,
                              cancel=self._cancel_reads)
        except CorruptCheckpoint as exc:
            raise EngineError(f"model {self.spec.name!r}: {exc}") from None
        except ReadCancelled:
            raise EngineError(f"model {self.spec.name!r}: the read from disk was cancelled: the engine is "
                              "closing") from None

    def _read_host(self) -> int:
        """Checkpoint -> host buffer (the RAM tier's copy)."""
        assert self._layout is not None
        files = checkpoint_files(self.weights)
        if not self._reads_directly(files):
            self._host = self._host_from_module(self._load_on_cpu(), self._layout)
            return self._layout.param_bytes
        self._progress.stage("allocating host memory", self._layout.param_bytes)
        host = HostBuffer(self._layout.total_bytes, self._pin)
        self._progress.stage("reading weights", self._layout.param_bytes)
        try:
            self._stream(files, host.tensor, None)
        except BaseException:
            host.close()
            raise
        self._host = host
        return self._layout.param_bytes

    def _read_host_and_upload(self) -> int:
        """Checkpoint -> host buffer and device buffer at once: each piece read into the host copy
        (which the hot model keeps) is uploaded from there while the next ones are read."""
        assert self._layout is not None
        files = checkpoint_files(self.weights)
        if not self._reads_directly(files):
            self._read_host()
            return self._upload()
        self._progress.stage("allocating host memory", self._layout.param_bytes)
        host = HostBuffer(self._layout.total_bytes, self._pin)
        try:
            flat = torch.empty(self._layout.total_bytes, dtype=torch.uint8, device=self.device)
            self._progress.stage("reading weights to the device", self._layout.param_bytes)
            self._stream(files, host.tensor, flat)
        except BaseException:
            host.close()
            raise
        self._attach(flat)
        self._host = host
        return self._layout.param_bytes

    def _read_device(self) -> int:
        """Checkpoint -> device buffer through a small ring of host slots, for when no host copy may be held."""
        assert self._layout is not None
        files = checkpoint_files(self.weights)
        if not self._reads_directly(files):
            self._read_host()
            moved = self._upload()
            self._release_host()
            return moved
        self._progress.stage("reading weights to the device", self._layout.param_bytes)
        flat = torch.empty(self._layout.total_bytes, dtype=torch.uint8, device=self.device)
        self._stream(files, None, flat)
        self._attach(flat)
        return self._layout.param_bytes

    def _upload(self, pipelined: bool = False) -> int:
        """Host buffer -> device buffer: the swap-in.

        Pipelined, the copies are only queued (`layer_pipeline`): the move ends at once, with the
        device memory allocated and counted, and each layer's forward waits for its own weights.
        The host buffer must then outlive the copy: the caller keeps it.
        """
        assert self._layout is not None and self._host is not None
        flat = torch.empty(self._layout.total_bytes, dtype=torch.uint8, device=self.device)
        stages = plan_stages(self._model, self._layout) if pipelined else None
        if stages is not None:
            self._progress.stage("queueing the copy to the device")
            pipeline = LayerPipeline(stages, flat, self._host.tensor, non_blocking=self._host.pinned,
                                     name=self.spec.name)
            self._attach(flat)
            pipeline.start()
            self._landing = pipeline
            return self._layout.param_bytes
        self._progress.stage("copying to the device", self._layout.total_bytes)
        started = time.perf_counter()
        copy_in_chunks(flat, self._host.tensor, on_bytes=self._progress.add, non_blocking=self._host.pinned)
        self._synchronize()
        self._last_copy_s = time.perf_counter() - started
        self._attach(flat)
        return self._layout.param_bytes

    def _settle(self) -> None:
        """Wait for a pipelined swap-in's copies before anything frees or reads the device buffer.

        Bounded by the stall timeout; a copy that failed or did not end is this move's error (the
        runtime then closes the engine: the weights on the device are not the model's).
        """
        pipeline = self._landing
        if pipeline is None:
            return
        self.weights_ready()
        self._landing = None
        self._last_copy_s = pipeline.landed_s

    def _download(self) -> int:
        """Device buffer -> a new host buffer: the swap-out when no copy was kept."""
        assert self._layout is not None and self._device_flat is not None
        self._progress.stage("allocating host memory", self._layout.total_bytes)
        host = HostBuffer(self._layout.total_bytes, self._pin)
        self._progress.stage("copying off the device", self._layout.total_bytes)
        copy_in_chunks(host.tensor, self._device_flat, on_bytes=self._progress.add, non_blocking=host.pinned)
        self._synchronize()
        self._host = host
        return self._layout.param_bytes

    def _attach(self, flat: torch.Tensor) -> None:
        assert self._layout is not None
        for name, view in self._layout.views(flat).items():
            self._params[name].data = view
        self._device_flat = flat

    def _release_device(self) -> None:
        """Point every parameter at an empty tensor so the device buffer can be given back."""
        self._stop_batching()
        for param in self._params.values():
            param.data = torch.empty(0, dtype=param.dtype, device=self.device)
        self._device_flat = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _release_host(self) -> None:
        if self._host is not None:
            self._host.close_in_background()
            self._host = None

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _load_on_cpu(self) -> Any:
        hf_logging.disable_progress_bar()
        with MODULE_BUILD:
            return AutoModelForCausalLM.from_pretrained(self.weights, dtype=self.dtype)

    def _unload(self) -> int:
        self._stop_batching()
        self._release_host()
        self._model = None
        self._tokenizer = None
        self._params = {}
        self._device_flat = None
        collect_everything()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return 0


    # ------------------------------------------------------------- generation

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream one request: batched with the model's other requests when it can be
        (`engines.batching`), else from its own thread (`_generate_solo`).

        Errors, InvalidRequest included, surface on the first `__anext__`.
        """
        batcher = await self._batcher_for(request)
        stream = self._generate_batched(request, batcher) if batcher is not None else self._generate_solo(request)
        async with contextlib.aclosing(stream):
            async for delta in stream:
                yield delta

    async def _batcher_for(self, request: GenerationRequest) -> Batcher | None:
        """The running batcher when this request may use it; starts it on first use (on a GPU in the
        background, so the first request after a swap-in does not wait for the paged cache: requests
        meanwhile run on their own)."""
        if self.batching == "off" or self._batch_failed or why_not_batched(request, self._batch_sampled) is not None:
            return None
        with self._state_lock:
            if self._tier is not Tier.GPU or self._moving or self._model is None:
                return None
            model, tokenizer = self._model, self._tokenizer
            if self._batcher is None:
                if not Batcher.supports(model):
                    return None
                self._batcher = Batcher(self.spec.name, self._batching_limits(), self._batch_sampled)
            batcher = self._batcher
            landing = self._landing
        if landing is not None and not landing.done:
            # a pipelined swap-in: its hooks wait per layer, which a graph capture must not see. The
            # manager starts once the weights have landed, so that the next request finds it running
            # (started by that request, its start cost a hot first token 30-40 ms on the CPU)
            if not batcher.running:
                self._start_batching_in_background(model, after=landing)
            return None
        if request.prompt_ids is None:
            request.prompt_ids = await asyncio.to_thread(self._prompt_ids, request, tokenizer)
        if len(request.prompt_ids) + request.max_tokens > batcher.limits.cache_tokens:
            return None
        if not batcher.running:
            if self.device.type == "cpu":
                await asyncio.to_thread(self._start_batching, model)
            else:
                self._start_batching_in_background(model)
        return batcher if batcher.running else None

    def _start_batching(self, model: Any) -> None:
        """Start the batcher unless a move runs (never waits for one: a move joins a start, not the reverse);
        concurrent first requests wait for the one start, so they are batched too."""
        with self._batch_start_lock:
            batcher = self._batcher
            if batcher is None or batcher.running or not self._move_lock.acquire(blocking=False):
                return
            try:
                with self._state_lock:
                    if self._tier is not Tier.GPU or self._model is not model:
                        return
                eos = sorted(self._eos_ids(model, self._tokenizer))
                pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else next(iter(eos), 0)
                self._batch_eos = eos
                batcher.start(model, eos, pad)
            except Exception as exc:  # noqa: BLE001 - every request still has the per-request path
                log.warning("model %s: continuous batching could not start (%s: %s); each request runs its own "
                            "generate()", self.spec.name, type(exc).__name__, exc)
                self._batch_failed = True
                with contextlib.suppress(Exception):
                    batcher.stop(self.stall_s)
            finally:
                self._move_lock.release()

    def _start_batching_in_background(self, model: Any, after: LayerPipeline | None = None) -> None:
        """`after`: a pipelined swap-in whose weights must land first (a copy that fails is the
        requests' error, not this start's)."""

        def start() -> None:
            if after is not None:
                with contextlib.suppress(Exception):
                    after.wait(self.stall_s)
            self._start_batching(model)

        with self._state_lock:
            if self._batch_starter is not None and self._batch_starter.is_alive():
                return
            self._batch_starter = threading.Thread(target=start, daemon=True,
                                                   name=f"umem-batching-start-{self.spec.name}")
            self._batch_starter.start()

    def _stop_batching(self) -> None:
        """Before the weights leave the device: the paged cache and CUDA graphs belong to this copy."""
        starter = self._batch_starter
        if starter is not None and starter is not threading.current_thread():
            starter.join()
        if self._batcher is not None:
            self._batcher.stop(self.stall_s)
        with self._state_lock:
            self._jobs = {job for job in self._jobs if job.thread is not None or not job.stalled}

    @property
    def batcher(self) -> Batcher | None:
        """The model's continuous batching (None before its first batched request), for tests and benchmarks."""
        return self._batcher

    def _admit(self, job: _Job) -> tuple[Any, Any]:
        """Count the job in flight if the model is on the device and still; its model and tokenizer."""
        with self._state_lock:
            if self._tier is not Tier.GPU or self._moving or self._model is None:
                state = "moving" if self._moving else f"in tier {self._tier}"
                raise EngineError(f"model {self.spec.name!r} is {state}; generate needs it on the device")
            self._jobs.add(job)
            return self._model, self._tokenizer

    async def _generate_batched(self, request: GenerationRequest, batcher: Batcher) -> AsyncIterator[Delta]:
        """One request's share of the batcher's steps: text assembly and stop strings here, on the loop."""
        loop = asyncio.get_running_loop()
        job = _Job(request=request, loop=loop, queue=asyncio.Queue(), done=loop.create_future())
        prompt = request.prompt_ids or []
        self._validate(request, len(prompt))
        shaper = AnswerShaper(request)
        _, tokenizer = self._admit(job)
        eos = self._batch_eos
        assembler = _TextAssembler(tokenizer, request.stop)
        request_id: str | None = None
        over = yielded = False
        try:
            request_id = batcher.submit(loop, prompt, request.max_tokens, eos, job.queue.put_nowait,
                                        temperature=request.temperature, top_p=request.top_p)
            last_item = time.monotonic()
            while True:
                left = max(last_item, self._last_step, batcher.last_progress) + self.stall_s - time.monotonic()
                if left <= 0:
                    job.stalled = True
                    raise EngineError(f"model {self.spec.name!r}: generation made no progress for {self.stall_s:g} s")
                try:
                    out: BatchOutput = await asyncio.wait_for(job.queue.get(), left)
                except (TimeoutError, asyncio.TimeoutError):
                    continue
                last_item = time.monotonic()
                over = out.finished
                if out.error is not None:
                    if batcher.broken and not self._batch_failed:
                        self._batch_failed = True
                        log.warning("model %s: continuous batching failed (%s); each request now runs its own "
                                    "generate()", self.spec.name, out.error)
                    if batcher.broken and not yielded:
                        break  # nothing was sent yet: the answer comes from the per-request path
                    raise EngineError(f"model {self.spec.name!r}: generation failed: {out.error}")
                piece = assembler.add(out.tokens[assembler.token_count:])
                if piece:
                    yielded = True
                    for delta in shaper.piece(piece, None):
                        yield delta
                if assembler.stopped or out.finished:
                    last_piece = assembler.flush()
                    completion = assembler.token_count
                    reason = "stop"
                    if not assembler.stopped and assembler.last_token not in eos and completion >= request.max_tokens:
                        reason = "length"
                    for delta in shaper.end(Delta(text=last_piece, finish_reason=reason, prompt_tokens=len(prompt),
                                                  completion_tokens=completion), None):
                        yield delta
                    return
        finally:
            if request_id is not None:
                if not over:
                    batcher.cancel(request_id)
                    if not job.stalled:
                        await _wait_released(batcher, request_id, self.stall_s)
                batcher.forget(request_id)
            if not job.stalled:
                with self._state_lock:
                    self._jobs.discard(job)
        async with contextlib.aclosing(self._generate_solo(request)) as stream:
            async for delta in stream:
                yield delta

    async def _generate_solo(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream one request from a thread of its own, through `generate()`.

        A daemon worker (`GENERATIONS`) rather than the loop's default executor: long generations
        would otherwise occupy its few workers and starve the `to_thread` calls of moves. Reused
        rather than started: starting a thread waits for it to run, 4-6 ms of the event loop when
        other threads held the GIL.
        """
        loop = asyncio.get_running_loop()
        job = _Job(request=request, loop=loop, queue=asyncio.Queue(), done=loop.create_future())
        shaper = AnswerShaper(request)
        model, tokenizer = self._admit(job)
        try:
            job.thread = GENERATIONS.start(self._run_job, job, model, tokenizer)
        except BaseException:
            with self._state_lock:
                self._jobs.discard(job)
            raise
        last_item = time.monotonic()
        try:
            while True:
                # progress: an item from the thread, or any layer's forward pass (`_stepped`)
                left = max(last_item, self._last_step) + self.stall_s - time.monotonic()
                if left <= 0:
                    job.stalled = True
                    raise EngineError(f"model {self.spec.name!r}: generation made no progress for {self.stall_s:g} s")
                try:
                    kind, payload = await asyncio.wait_for(job.queue.get(), left)
                except (TimeoutError, asyncio.TimeoutError):
                    continue
                last_item = time.monotonic()
                if kind == "text":
                    for delta in shaper.piece(*payload):
                        yield delta
                elif kind == "end":
                    for delta in shaper.end(*payload):
                        yield delta
                    return
                else:
                    raise payload
        finally:
            job.cancel.set()
            if not job.stalled:
                await _wait_through_cancellation(job)

    def _run_job(self, job: _Job, model: Any, tokenizer: Any) -> None:
        kind: str = "error"
        payload: Any = EngineError("generation ended without a result")
        try:
            with self._solo_slot(job):
                payload = self._generate_sync(job, model, tokenizer)
            kind = "end"
        except EngineError as exc:
            payload = exc
        except torch.OutOfMemoryError as exc:
            payload = EngineOutOfMemory(f"model {self.spec.name!r}: out of device memory while generating: {exc}")
        except Exception as exc:
            payload = EngineError(f"model {self.spec.name!r}: generation failed: {type(exc).__name__}: {exc}")
        finally:
            with self._state_lock:
                self._jobs.discard(job)
            job.finish(kind, payload)

    @contextlib.contextmanager
    def _solo_slot(self, job: _Job) -> Iterator[None]:
        """Per-request generations run at most `_solo_limit` at once (`max_concurrency` admits more when
        batching is on: batched requests share forwards and the paged cache, these do not); a cancelled
        one stops waiting."""
        with self._state_lock:
            if self._solo_slots is None:
                self._solo_slots = threading.BoundedSemaphore(self._solo_limit())
            slots = self._solo_slots
        while not slots.acquire(timeout=0.05):
            if job.cancel.is_set():
                raise EngineError(f"model {self.spec.name!r}: generation cancelled")
        try:
            yield
        finally:
            slots.release()

    def _prompt_ids(self, request: GenerationRequest, tokenizer: Any) -> list[int]:
        return prompt_ids(self.spec.name, request, tokenizer)

    def check_request(self, request: GenerationRequest) -> int | None:
        """Count the prompt's tokens and refuse what cannot fit, in any tier, before any move.

        Runs in a worker thread (a long prompt takes a while to tokenize) with a tokenizer
        kept while the engine lives (`prompt_check.PromptCounter`), so a prompt over the
        context window costs no swap. Returns the prompt's token count (None: unknown).
        """
        ids = self._prompt_counter.ids(request, self.context_length)
        if ids is None:
            return None
        self._validate(request, len(ids))
        request.prompt_ids = ids  # the same tokenizer files as generation's: not tokenized twice
        return len(ids)

    def prompt_bound(self) -> PromptBound | None:
        """Known once the first tokenizer for checks was loaded (`prompt_check.PromptBound`)."""
        return self._prompt_counter.bound(self.context_length)

    def learn_prompt_bound(self) -> PromptBound | None:
        """Load the tokenizer for checks (blocking; the runtime calls it in the background)."""
        self._prompt_counter.learn()
        return self.prompt_bound()

    def _validate(self, request: GenerationRequest, prompt_tokens: int) -> None:
        if request.options:
            check_options(self.spec.name, request, self._config.get("vocab_size"))
        if request.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {request.max_tokens}", param="max_tokens")
        check_fits(self.spec.name, self.context_length, prompt_tokens, request)
        if request.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {request.temperature}")
        if not 0 < request.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {request.top_p}")

    def _eos_ids(self, model: Any, tokenizer: Any) -> set[int]:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        if eos is None:
            return set()
        return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}

    def _generate_sync(self, job: _Job, model: Any, tokenizer: Any) -> tuple[Delta, list[dict[str, Any]] | None]:
        request = job.request
        prompt = request.prompt_ids if request.prompt_ids is not None else self._prompt_ids(request, tokenizer)
        self._validate(request, len(prompt))
        assembler = _TextAssembler(tokenizer, request.stop)
        eos = self._eos_ids(model, tokenizer)
        stop_flag = threading.Event()
        decoding = RequestDecoding(self.spec.name, request, tokenizer, model.get_output_embeddings().weight.shape[0],
                                   sorted(eos), len(prompt), self._guidance, self.device) if request.options else None

        def on_tokens(ids: list[int]) -> None:
            if stop_flag.is_set():
                return
            piece = assembler.add(ids)
            if decoding is not None:
                decoding.record(ids)
                logprobs = decoding.take_logprobs() if piece else None
                if piece:
                    job.post("text", (piece, logprobs))
            elif piece:
                job.post("text", (piece, None))
            if assembler.stopped:
                stop_flag.set()

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
        # Sampling knobs at their neutral values: unset ones would be filled from the model's own
        # generation_config, and the request alone decides how to sample (in `_SeededSampler`).
        config = GenerationConfig(max_new_tokens=request.max_tokens, do_sample=False, num_beams=1,
                                  temperature=1.0, top_k=50, top_p=1.0, eos_token_id=sorted(eos) or None,
                                  pad_token_id=pad)
        processors = LogitsProcessorList(decoding.processors if decoding is not None else ())
        if request.temperature > 0:
            seed = request.seed if request.seed is not None else secrets.randbits(63)
            processors.append(_SeededSampler(request.temperature, request.top_p, seed))
        input_ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([_FlagCriteria(job.cancel, stop_flag)]),
                streamer=_Streamer(on_tokens),
            )
        last_piece = assembler.flush()
        completion = assembler.token_count
        if assembler.stopped or assembler.last_token in eos:
            reason = "stop"
        elif completion >= request.max_tokens:
            reason = "length"
        elif job.cancel.is_set():
            raise EngineError(f"model {self.spec.name!r}: generation cancelled")
        else:
            reason = "stop"
        return (Delta(text=last_piece, finish_reason=reason, prompt_tokens=len(prompt), completion_tokens=completion),
                decoding.take_logprobs() if decoding is not None else None)

    async def hung(self) -> str | None:
        """Why the engine counts as hung: a generation thread stalled (see `generate`); None otherwise."""
        with self._state_lock:
            stuck = sum(1 for job in self._jobs if job.stalled)
        if not stuck:
            return None
        return (f"{stuck} generation thread(s) made no progress for {self.stall_s:g} s: the engine is hung "
                "(a Python thread cannot be stopped: the model is loaded again once it returns)")

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        """Stop every generation and unload. A stuck thread is waited for `stall_s` at most, then left
        (it holds its own references to the model's tensors, freed when it returns; until then the
        engine refuses to load the model again, so its memory is never held twice)."""
        with self._state_lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel.set()
        self._cancel_reads.set()  # a reload under way stops at its next piece instead of finishing first
        await asyncio.to_thread(self._stop_batching)
        for job in jobs:
            if job.thread is not None:
                await asyncio.to_thread(job.thread.join, None if not job.stalled else self.stall_s)
                if job.thread.is_alive():
                    log.warning("model %s: a stuck generation thread is left running; its tensors are freed "
                                 "when it returns", self.spec.name)
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        with self._move_lock:
            self._cancel_reads.clear()
            try:
                self._settle()
            except EngineError as exc:
                log.warning("%s; closing anyway", exc)
                self._landing = None
            self._unload()
            self._tier = Tier.COLD


async def _wait_released(batcher: Batcher, request_id: str, limit_s: float) -> None:
    """Wait (bounded) until the batcher has dropped a cancelled request, so that "no generation in flight"
    means its KV blocks are free; like `_wait_through_cancellation`, a cancellation of the caller is held
    off until then and passed on."""
    cancelled = False
    deadline = time.monotonic() + limit_s
    with anyio.CancelScope(shield=True):
        while batcher.holds(request_id) and time.monotonic() < deadline:
            try:
                await asyncio.sleep(0.001)
            except asyncio.CancelledError:
                cancelled = True
    if cancelled:
        raise asyncio.CancelledError()


async def _wait_through_cancellation(job: _Job) -> None:
    """Wait until the job's thread has really stopped, even when the caller is being cancelled.

    A client that hangs up cancels the request's task; if this wait gave up, the model would
    count as idle while its thread still generates, and the next move would fail ("in flight")
    and drop the model to cold. The thread stops at its next decoding step (the cancel flag
    is set), so the wait is short. Cancellation is held off (an anyio shield for the router's
    task groups, a caught CancelledError for plain asyncio) and passed on once it is over.
    """
    cancelled = False
    with anyio.CancelScope(shield=True):
        while not job.done.done():
            try:
                await asyncio.shield(job.done)
            except asyncio.CancelledError:
                cancelled = True
        if job.thread is not None and job.thread.is_alive():
            # `done` resolves as the thread's last act; joining makes "closed" mean "no thread left"
            joined = asyncio.ensure_future(asyncio.to_thread(job.thread.join))
            while not joined.done():
                try:
                    await asyncio.shield(joined)
                except asyncio.CancelledError:
                    cancelled = True
    if cancelled:
        raise asyncio.CancelledError()


class _Streamer(BaseStreamer):
    """Receives each new token from `generate`; the first call carries the prompt, which is not output."""

    def __init__(self, on_tokens: Callable[[list[int]], None]) -> None:
        self._on_tokens = on_tokens
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self._on_tokens([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        return None


class _FlagCriteria(StoppingCriteria):
    """Stops `generate` at the next step once the client went away or a stop string matched."""

    def __init__(self, *flags: threading.Event) -> None:
        self._flags = flags

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        stop = any(flag.is_set() for flag in self._flags)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _SeededSampler(LogitsProcessor):
    """Temperature and top-p sampling with a per-request generator, so a seed reproduces its answer.

    `generate`'s own sampling draws from torch's global RNG, which concurrent requests
    share; here the draw happens in a logits processor with the request's own generator
    (on the CPU, so a seed gives the same tokens on any device), and the chosen token is
    left as the only finite logit for `generate`'s greedy pick.
    """

    def __init__(self, temperature: float, top_p: float, seed: int) -> None:
        self._temperature = temperature
        self._top_p = top_p
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.detach().to("cpu", torch.float32) / self._temperature
        probs = torch.softmax(logits, dim=-1)
        if self._top_p < 1.0:
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            sorted_probs[before >= self._top_p] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        token = torch.multinomial(probs, num_samples=1, generator=self._generator).to(scores.device)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(-1, token, 0.0)
