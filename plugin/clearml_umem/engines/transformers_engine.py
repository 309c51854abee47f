"""In-process engine over a Hugging Face model directory, tiered with real tensor copies.

This engine is what runs everywhere: on a CPU-only machine (tests, the demo) the "device"
is the CPU and the tiers are logical, but every move still copies the real bytes, so the
swap timings and byte counts the metrics report are honest. On a CUDA machine the same
code frees device memory on the way out and copies back from pinned host memory.

Representation, per tier:
- GPU: the module's parameters hold device tensors.
- RAM: parameters hold empty device tensors; `_host` maps each parameter name to a host
  copy (pinned when CUDA is present, so the copy back is a fast, asynchronous DMA).
- DISK: parameters empty, no host copies; the module skeleton, its buffers and the
  tokenizer stay, so a reload only reads the safetensors files back into the parameters.
- COLD: nothing is held.

Buffers never move: they are small, and some (rotary `inv_freq`) are computed at init and
are not in the checkpoint, so dropping them would make a reload from disk impossible.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import json
import math
import secrets
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

from clearml_umem.engines.base import (
    Delta,
    EngineContext,
    EngineError,
    EngineOutOfMemory,
    Footprint,
    GenerationRequest,
    InvalidRequest,
    TransitionResult,
)
from clearml_umem.spec import ModelSpec, context_length_from_config, read_hf_config
from clearml_umem.tiers import ALL_TIERS, Tier

ACTIVATION_MARGIN_FRACTION = 0.15
"""Device bytes budgeted on top of the weights for activations and the KV cache.

Footprint on GPU = weight bytes in the load dtype * (1 + ACTIVATION_MARGIN_FRACTION),
rounded up. Proportional on purpose: a few-MB demo model must stay a few MB in the
budget, and for real models 15% covers the dynamic KV cache of a handful of concurrent
requests of moderate length (Llama-3-8B: 2.4 GB, about 19k tokens of KV cache).
Override with `EngineContext.options["activation_margin_fraction"]`.
"""

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_SINGLE = "model.safetensors"
_FLOAT_CHECKPOINT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
_CHECKPOINT_ITEMSIZE = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


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
    """Tensor names, dtypes and shapes without reading the tensors: footprints are needed before loading."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    return header


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
    thread: threading.Thread | None = None

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
        self._shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self._host: dict[str, torch.Tensor] | None = None
        self._param_bytes: int | None = None
        self._estimated_bytes: int | None = None
        self._transition_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._moving = False
        self._jobs: set[_Job] = set()

    # ------------------------------------------------------------------ facts

    @property
    def tiers(self) -> frozenset[Tier]:
        return frozenset(ALL_TIERS)

    @property
    def transits(self) -> dict[tuple[Tier, Tier], Tier]:
        """COLD -> DISK loads into host RAM first, to keep the skeleton and tokenizer (see `_plan`)."""
        return {(Tier.COLD, Tier.DISK): Tier.RAM}

    @property
    def tier(self) -> Tier:
        return self._tier

    @property
    def active_generations(self) -> int:
        with self._state_lock:
            return len(self._jobs)

    @property
    def model(self) -> Any:
        """The live module (None when cold), for tests and diagnostics; do not move it behind the engine's back."""
        return self._model

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
        if self._param_bytes is not None:
            return self._param_bytes
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

    def footprint(self, tier: Tier) -> Footprint:
        weights = self.weight_bytes
        if tier is Tier.GPU:
            return Footprint(device_bytes=math.ceil(weights * (1.0 + self._margin)), host_bytes=0)
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
            "active_generations": self.active_generations,
        }

    # ------------------------------------------------------------ transitions

    async def transition(self, src: Tier, dst: Tier) -> TransitionResult:
        src, dst = Tier(src), Tier(dst)
        if src == dst:
            raise EngineError(f"model {self.spec.name!r}: transition from {src} to itself")
        moved = await asyncio.to_thread(self._transition_sync, src, dst)
        return TransitionResult(bytes_moved=moved)

    def _transition_sync(self, src: Tier, dst: Tier) -> int:
        with self._transition_lock:
            with self._state_lock:
                if self._tier is not src:
                    raise EngineError(f"model {self.spec.name!r} is in tier {self._tier}, not {src}")
                if src is Tier.GPU and self._jobs:
                    raise EngineError(f"model {self.spec.name!r} has {len(self._jobs)} generation(s) in flight;"
                                      " it cannot leave the device")
                self._moving = True
            try:
                moved = 0
                for step_dst, step in self._plan(src, dst):
                    moved += self._run_step(step)
                    self._tier = step_dst
                return moved
            finally:
                with self._state_lock:
                    self._moving = False

    def _plan(self, src: Tier, dst: Tier) -> list[tuple[Tier, Callable[[], int]]]:
        """Direct steps where one exists; COLD->DISK goes through host RAM, never through the device.

        Nothing that ends below GPU touches the device, so a demotion the scheduler
        budgeted as "no device memory" never needs any.
        """
        if dst is Tier.COLD:
            return [(Tier.COLD, self._unload)]
        direct: dict[tuple[Tier, Tier], Callable[[], int]] = {
            (Tier.COLD, Tier.GPU): lambda: self._load(Tier.GPU),
            (Tier.COLD, Tier.RAM): lambda: self._load(Tier.RAM),
            (Tier.GPU, Tier.RAM): self._offload,
            (Tier.RAM, Tier.GPU): self._onload,
            (Tier.GPU, Tier.DISK): self._drop_device,
            (Tier.RAM, Tier.DISK): self._drop_host,
            (Tier.DISK, Tier.GPU): lambda: self._reload(Tier.GPU),
            (Tier.DISK, Tier.RAM): lambda: self._reload(Tier.RAM),
        }
        if (src, dst) in direct:
            return [(dst, direct[(src, dst)])]
        return [(Tier.RAM, direct[(Tier.COLD, Tier.RAM)]), (Tier.DISK, self._drop_host)]

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

    def _empty(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(0, dtype=dtype, device=self.device)

    def _release_device(self) -> None:
        """Point every parameter at an empty tensor so the caching allocator can give the memory back."""
        for name, param in self._params.items():
            param.data = self._empty(self._shapes[name][1])
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=self._pin)
        host.copy_(tensor, non_blocking=self._pin)
        return host

    def _adopt(self, model: Any) -> None:
        """Remember the parameters by name; `named_parameters` dedups tied weights, so each is moved once."""
        model.eval()
        self._model = model
        self._params = dict(model.named_parameters())
        self._shapes = {name: (p.shape, p.dtype) for name, p in self._params.items()}
        self._param_bytes = sum(p.numel() * p.element_size() for p in self._params.values())

    def _from_pretrained(self, device: torch.device) -> Any:
        """Load straight to `device` when accelerate is there (transformers needs it for `device_map`).

        Without it the model is loaded in host RAM and copied over: slower and briefly
        holding the weights twice, but correct, so accelerate stays optional.
        """
        hf_logging.disable_progress_bar()
        if device.type == "cuda" and importlib.util.find_spec("accelerate") is not None:
            return AutoModelForCausalLM.from_pretrained(self.weights, dtype=self.dtype, device_map={"": str(device)})
        model = AutoModelForCausalLM.from_pretrained(self.weights, dtype=self.dtype)
        return model.to(device) if device.type != "cpu" else model

    def _load(self, target: Tier) -> int:
        tokenizer = AutoTokenizer.from_pretrained(self.weights)
        try:
            model = self._from_pretrained(self.device if target is Tier.GPU else torch.device("cpu"))
            self._adopt(model)
            if target is Tier.RAM:
                host = {name: self._host_copy(p.data) if self._pin else p.data for name, p in self._params.items()}
                self._synchronize()
                self._host = host
                self._release_device()
                model.to(self.device)
        except BaseException:
            self._unload()
            raise
        self._tokenizer = tokenizer
        return self.weight_bytes

    def _offload(self) -> int:
        host = {name: self._host_copy(p.data) for name, p in self._params.items()}
        self._synchronize()
        self._host = host
        self._release_device()
        return sum(t.numel() * t.element_size() for t in host.values())

    def _onload(self) -> int:
        assert self._host is not None
        moved = 0
        try:
            for name, param in self._params.items():
                host = self._host[name]
                # On CPU `.to` would alias the host tensor; clone so the copy (and its cost) is real.
                param.data = host.to(self.device, non_blocking=True) if self._pin else host.clone()
                moved += host.numel() * host.element_size()
            self._synchronize()
        except BaseException:
            self._release_device()
            raise
        self._host = None
        return moved

    def _drop_device(self) -> int:
        self._release_device()
        return 0

    def _drop_host(self) -> int:
        self._host = None
        return 0

    def _reload(self, target: Tier) -> int:
        """Read the checkpoint back into the kept skeleton: straight to the device, or into host RAM.

        Checkpoints whose tensor names do not match the module's (renamed keys, .bin files)
        go through `from_pretrained` instead, which knows every conversion.
        """
        device = self.device if target is Tier.GPU else torch.device("cpu")
        files = checkpoint_files(self.weights)
        names_on_disk = {name for path in files for name in read_safetensors_header(path)}
        loaded: dict[str, torch.Tensor] = {}
        try:
            if files and set(self._params) <= names_on_disk:
                from safetensors import safe_open

                for path in files:
                    with safe_open(str(path), framework="pt", device=str(device)) as fh:
                        for name in fh.keys():  # noqa: SIM118 - safe_open handles are not iterable
                            if name in self._params:
                                loaded[name] = self._place(name, fh.get_tensor(name), target)
            else:
                fresh = self._from_pretrained(device)
                for name, param in fresh.named_parameters():
                    if name in self._params:
                        loaded[name] = self._place(name, param.data, target)
                del fresh
            missing = set(self._params) - set(loaded)
            if missing:
                raise EngineError(f"model {self.spec.name!r}: checkpoint lacks {sorted(missing)[:5]}")
            self._synchronize()
        except BaseException:
            loaded.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise
        if target is Tier.GPU:
            for name, param in self._params.items():
                param.data = loaded[name]
        else:
            self._host = loaded
        return sum(t.numel() * t.element_size() for t in loaded.values())

    def _place(self, name: str, tensor: torch.Tensor, target: Tier) -> torch.Tensor:
        shape, dtype = self._shapes[name]
        if tensor.shape != shape:
            raise EngineError(f"model {self.spec.name!r}: {name} has shape {tuple(tensor.shape)} on disk,"
                              f" {tuple(shape)} in the model")
        tensor = tensor.to(dtype)
        return self._host_copy(tensor) if target is Tier.RAM and self._pin else tensor

    def _unload(self) -> int:
        self._model = None
        self._tokenizer = None
        self._params = {}
        self._host = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return 0

    # ------------------------------------------------------------- generation

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream one request from its own thread.

        A dedicated thread rather than the loop's default executor: long generations would
        otherwise occupy its few workers and starve the `to_thread` calls of transitions.
        Errors, InvalidRequest included, surface on the first `__anext__`.
        """
        loop = asyncio.get_running_loop()
        job = _Job(request=request, loop=loop, queue=asyncio.Queue(), done=loop.create_future())
        with self._state_lock:
            if self._tier is not Tier.GPU or self._moving or self._model is None:
                state = "moving" if self._moving else f"in tier {self._tier}"
                raise EngineError(f"model {self.spec.name!r} is {state}; generate needs it on the device")
            self._jobs.add(job)
            model, tokenizer = self._model, self._tokenizer
        job.thread = threading.Thread(target=self._run_job, args=(job, model, tokenizer),
                                      name=f"umem-generate-{self.spec.name}", daemon=True)
        try:
            job.thread.start()
        except BaseException:
            with self._state_lock:
                self._jobs.discard(job)
            raise
        try:
            while True:
                kind, payload = await job.queue.get()
                if kind == "text":
                    yield Delta(text=payload)
                elif kind == "end":
                    yield payload
                    return
                else:
                    raise payload
        finally:
            job.cancel.set()
            await asyncio.shield(job.done)
            if job.thread is not None and job.thread.is_alive():
                # `done` resolves as the thread's last act; joining makes "closed" mean "no thread left".
                await asyncio.to_thread(job.thread.join)

    def _run_job(self, job: _Job, model: Any, tokenizer: Any) -> None:
        kind: str = "error"
        payload: Any = EngineError("generation ended without a result")
        try:
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

    def _prompt_ids(self, request: GenerationRequest, tokenizer: Any) -> list[int]:
        if request.is_chat:
            if not getattr(tokenizer, "chat_template", None):
                raise InvalidRequest(f"model {self.spec.name!r} has no chat template; use /v1/completions")
            text = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(request.prompt or "")["input_ids"]
        return list(ids)

    def _validate(self, request: GenerationRequest, prompt_tokens: int) -> None:
        if request.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {request.max_tokens}")
        if prompt_tokens == 0:
            raise InvalidRequest("the prompt is empty")
        if self.context_length and prompt_tokens + request.max_tokens > self.context_length:
            raise InvalidRequest(
                f"model {self.spec.name!r} has a context length of {self.context_length} tokens; the request has "
                f"{prompt_tokens} prompt tokens and asks for max_tokens={request.max_tokens} "
                f"({prompt_tokens + request.max_tokens} in all). Shorten the prompt or lower max_tokens.")
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

    def _generate_sync(self, job: _Job, model: Any, tokenizer: Any) -> Delta:
        request = job.request
        prompt = self._prompt_ids(request, tokenizer)
        self._validate(request, len(prompt))
        assembler = _TextAssembler(tokenizer, request.stop)
        eos = self._eos_ids(model, tokenizer)
        stop_flag = threading.Event()

        def on_tokens(ids: list[int]) -> None:
            if stop_flag.is_set():
                return
            piece = assembler.add(ids)
            if piece:
                job.post("text", piece)
            if assembler.stopped:
                stop_flag.set()

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
        # Sampling knobs at their neutral values: unset ones would be filled from the model's own
        # generation_config, and the request alone decides how to sample (in `_SeededSampler`).
        config = GenerationConfig(max_new_tokens=request.max_tokens, do_sample=False, num_beams=1,
                                  temperature=1.0, top_k=50, top_p=1.0, eos_token_id=sorted(eos) or None,
                                  pad_token_id=pad)
        processors = LogitsProcessorList()
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
        return Delta(text=last_piece, finish_reason=reason, prompt_tokens=len(prompt), completion_tokens=completion)

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        with self._state_lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel.set()
        for job in jobs:
            if job.thread is not None:
                await asyncio.to_thread(job.thread.join)
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        with self._transition_lock:
            self._unload()
            self._tier = Tier.COLD


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
