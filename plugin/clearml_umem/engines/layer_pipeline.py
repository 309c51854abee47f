"""A swap-in that lets the first forward pass start while the weights are still arriving (PipeSwitch).

A sequential swap-in copies every weight, then the first request runs: its time to first
token is the copy plus a hot forward. Here the flat buffer is copied in chunks aligned to
the modules in forward order (embeddings, layer 0, 1, ..., the final norm and the output
head), one event per chunk, and each stage's module waits, in a forward pre-hook, for its
own chunk only: layer 0 computes while layer 5 is still on the link.

On CUDA the copies run on a stream of their own and the wait is GPU-side
(`current_stream().wait_event`): the thread that launches the forward never blocks, so
its Python overhead overlaps the copy as well. On the CPU there is no copy engine: a
copy thread lands the chunks in order and each wait blocks the forward's thread on the
chunk's `threading.Event`, the same ordering with the same code around it (what the
tests check without a GPU).

The layout must hold each stage contiguously and the stages in forward order
(`forward_order` builds such a layout); `plan_stages` refuses any other, and the engine
then copies the sequential way.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from clearml_umem.engines.base import EngineError
from clearml_umem.engines.weight_store import FlatLayout

log = logging.getLogger(__name__)


class CopyFailed(EngineError):
    """The pipelined copy to the device failed: the weights on the device are not the model's."""


@dataclass(frozen=True)
class Stage:
    """One chunk of the flat buffer and the modules whose forward needs it first."""

    name: str
    start: int
    end: int
    modules: tuple[torch.nn.Module, ...]
    after: tuple[torch.nn.Module, ...] = ()
    """Modules whose forward *end* must also wait (the last layer, for the head that follows it)."""

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The ModuleList holding most parameter tensors: the decoder layers, in the order the forward runs
    them. Counted in tensors, not elements: off the device the parameters are empty."""
    best, best_count = None, 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            count = sum(1 for _ in module.parameters())
            if count > best_count:
                best, best_count = module, count
    return best


def _stage_keys(model: torch.nn.Module) -> tuple[dict[str, int], int] | None:
    """Each parameter's stage: 0 for what comes before the layers, k + 1 for layer k, the last for after."""
    layers = decoder_layers(model)
    if layers is None:
        return None
    owner: dict[int, int] = {}
    for k, layer in enumerate(layers):
        for p in layer.parameters():
            owner.setdefault(id(p), k + 1)
    tail = len(layers) + 1
    keys: dict[str, int] = {}
    seen_layer = False
    for name, p in model.named_parameters():
        stage = owner.get(id(p))
        if stage is not None:
            seen_layer = True
            keys[name] = stage
        else:
            keys[name] = tail if seen_layer else 0
    return keys, tail


def forward_order(model: torch.nn.Module) -> FlatLayout:
    """The module's flat layout with parameters grouped by stage in forward order.

    `named_parameters` already gives that order for the Llama family (embeddings, layers,
    norm, head); a module that registers them otherwise gets them sorted here, stably, so
    each stage is one contiguous chunk. Tied parameters count once, with their first owner.
    """
    params = dict(model.named_parameters())
    found = _stage_keys(model)
    names = list(params)
    if found is not None:
        keys, _ = found
        names.sort(key=lambda n: keys[n])
    return FlatLayout.of({n: (params[n].shape, params[n].dtype) for n in names})


def plan_stages(model: torch.nn.Module, layout: FlatLayout) -> list[Stage] | None:
    """The chunks to copy in order and who waits for each; None when the layout is not in forward order."""
    found = _stage_keys(model)
    layers = decoder_layers(model)
    if found is None or layers is None:
        return None
    keys, tail = found
    bounds: dict[int, list[int]] = {}
    order = sorted(layout.slots.items(), key=lambda item: item[1].offset)
    last_key = -1
    for name, slot in order:
        key = keys.get(name)
        if key is None or key < last_key:
            return None
        last_key = key
        span = bounds.setdefault(key, [slot.offset, slot.offset + slot.nbytes])
        span[1] = slot.offset + slot.nbytes
    if not bounds:
        return None
    owners = _owners(model)
    stages: list[Stage] = []
    keys_in_order = sorted(bounds)
    for i, key in enumerate(keys_in_order):
        start = bounds[key][0] if i == 0 else stages[-1].end
        end = layout.total_bytes if i == len(keys_in_order) - 1 else bounds[keys_in_order[i + 1]][0]
        if key == 0:
            # the whole model's forward starts with the embeddings (their own module waits too,
            # for a caller that embeds first)
            names = [n for n, k in keys.items() if k == 0]
            stages.append(Stage("embeddings", start, end, (model, *_owning(owners, names))))
        elif key == tail:
            names = [n for n, k in keys.items() if k == tail]
            stages.append(Stage("head", start, end, tuple(_owning(owners, names)), after=(layers[-1],)))
        else:
            stages.append(Stage(f"layer {key - 1}", start, end, (layers[key - 1],)))
    return stages


def _owners(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    out: dict[str, torch.nn.Module] = {}
    for module_name, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is not None:
                out.setdefault(f"{module_name}.{pname}" if module_name else pname, module)
    return out


def _owning(owners: Mapping[str, torch.nn.Module], names: Iterable[str]) -> list[torch.nn.Module]:
    seen: dict[int, torch.nn.Module] = {}
    for name in names:
        module = owners.get(name)
        if module is not None:
            seen.setdefault(id(module), module)
    return list(seen.values())


def copy_piece(dst: torch.Tensor, src: torch.Tensor) -> None:
    """One chunk's copy on the CPU path; a test replaces it to decide when each chunk lands."""
    dst.copy_(src)


class LayerPipeline:
    """One swap-in in flight: `start` queues the copies and returns; forwards wait per stage.

    `wait` (for a swap-out or close) returns once every chunk landed and raises `CopyFailed`
    when one did not; `landed_s` is the copy's own duration once known.
    """

    def __init__(self, stages: list[Stage], dst: torch.Tensor, src: torch.Tensor, *, non_blocking: bool,
                 name: str = "") -> None:
        self.stages = stages
        self._dst = dst
        self._src = src
        self._non_blocking = non_blocking
        self._name = name
        self._cuda = dst.is_cuda
        self._landed = [threading.Event() for _ in stages]
        self._all_landed = threading.Event()
        self._cuda_events: list[Any] = []
        self._error: BaseException | None = None
        self._handles: list[Any] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self.landed_s: float | None = None
        self.landing: concurrent.futures.Future[float] = concurrent.futures.Future()
        """Resolves with `landed_s` once every chunk landed, or with `CopyFailed`."""

    # ---------------------------------------------------------------- start

    def start(self) -> None:
        """Hook the modules, then queue every chunk (CUDA) or start the copy thread (CPU)."""
        self._started = time.perf_counter()
        for i, stage in enumerate(self.stages):
            for module in stage.modules:
                self._handles.append(module.register_forward_pre_hook(self._waiter(i), prepend=True))
            for module in stage.after:
                self._handles.append(module.register_forward_hook(self._waiter(i), prepend=True))
        try:
            if self._cuda:
                self._queue_cuda()
            self._thread = threading.Thread(target=self._watch_cuda if self._cuda else self._copy_on_cpu,
                                            name=f"umem-swap-in-{self._name}", daemon=True)
            self._thread.start()
        except BaseException:
            self._remove_hooks()
            raise

    def _queue_cuda(self) -> None:
        device = self._dst.device
        stream = torch.cuda.Stream(device)
        # the device buffer was allocated on the caller's stream: its memory may still be in use there
        stream.wait_stream(torch.cuda.current_stream(device))
        # and may be freed (a close that gave up waiting) only once this stream's copies are done
        self._dst.record_stream(stream)
        with torch.cuda.stream(stream):
            for stage in self.stages:
                self._dst[stage.start:stage.end].copy_(self._src[stage.start:stage.end],
                                                       non_blocking=self._non_blocking)
                event = torch.cuda.Event()
                event.record(stream)
                self._cuda_events.append(event)

    def _watch_cuda(self) -> None:
        """Mark each chunk landed as its event completes: progress, `wait`, and the hooks' removal."""
        try:
            for i, event in enumerate(self._cuda_events):
                event.synchronize()
                self._land(i)
        except BaseException as exc:  # noqa: BLE001 - kept, raised to the forward and the next move
            self._fail(exc)
        self._finish()

    def _copy_on_cpu(self) -> None:
        try:
            for i, stage in enumerate(self.stages):
                copy_piece(self._dst[stage.start:stage.end], self._src[stage.start:stage.end])
                if i < len(self.stages) - 1:  # the last one is released by `_finish`, after `landing`
                    self._land(i)
        except BaseException as exc:  # noqa: BLE001 - kept, raised to the forward and the next move
            self._fail(exc)
        self._finish()

    def _land(self, i: int) -> None:
        self._landed[i].set()

    def _fail(self, exc: BaseException) -> None:
        log.error("swap-in of %s failed while the weights were copied: %s", self._name or "a model", exc)
        self._error = exc
        for event in self._landed:
            event.set()

    def _finish(self) -> None:
        """Resolve `landing` before the forward that waits for the last chunk goes on, so the swap-in is
        reported before that request's answer."""
        self.landed_s = time.perf_counter() - self._started
        if self._error is None:
            self._remove_hooks()  # after a failure they stay, raising it, until the engine drops the module
        if self._error is not None:
            self.landing.set_exception(CopyFailed(f"the copy of the weights to the device failed: {self._error}"))
        else:
            self.landing.set_result(self.landed_s)
        self._all_landed.set()
        for event in self._landed:
            event.set()

    def _remove_hooks(self) -> None:
        with self._lock:
            handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    # ---------------------------------------------------------------- waits

    def _waiter(self, i: int) -> Callable[..., None]:
        def wait_for_chunk(*_: Any) -> None:
            self.ready(i)
        return wait_for_chunk

    def ready(self, i: int) -> None:
        """Make what runs next on this thread see chunk `i`: a GPU-side wait on CUDA, a block on the CPU."""
        if self._error is not None:
            raise CopyFailed(f"the copy of the weights to the device failed: {self._error}")
        if self._all_landed.is_set():
            return
        if self._cuda:
            torch.cuda.current_stream(self._dst.device).wait_event(self._cuda_events[i])
            return
        self._landed[i].wait()
        if self._error is not None:
            raise CopyFailed(f"the copy of the weights to the device failed: {self._error}")

    def ready_all(self) -> None:
        """Every chunk, for code that reads the weights without running the hooked modules."""
        for i in range(len(self.stages)):
            self.ready(i)

    @property
    def done(self) -> bool:
        return self._all_landed.is_set()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def wait(self, timeout: float | None = None) -> None:
        """Until every chunk landed (hooks removed); `CopyFailed` when one did not, TimeoutError past `timeout`."""
        if not self._all_landed.wait(timeout):
            raise TimeoutError(f"the copy to the device did not end within {timeout:g} s")
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise CopyFailed(f"the copy of the weights to the device failed: {self._error}")
