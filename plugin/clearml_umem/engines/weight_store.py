"""A model's weights as one flat buffer per place: one on the device, one in host RAM.

Why flat: a swap is then one large copy instead of hundreds of small ones, and one
allocation instead of hundreds, so it runs at the speed of the link. The module's
parameters are views into the device buffer; the host buffer keeps the same layout, so
moving between them is a single `copy_`.

Why not torch's `pin_memory=True`: its caching host allocator rounds every request up to
a power of two (a 17 GB model would pin 34 GB) and keeps freed blocks cached, so the host
budget would be off by up to 2x. Here the host buffer is an ordinary allocation of the
exact size, page-locked with `cudaHostRegister` and unlocked when it is closed.

Reading a checkpoint (`overlapped_read`) goes straight from the safetensors files into the
host buffer, or through a small ring to the device, with positional reads on a few threads.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from clearml_umem.units import fmt_bytes

log = logging.getLogger(__name__)

ALIGNMENT = 512
"""Byte alignment of every parameter in a flat buffer: what CUDA's allocator gives a lone tensor,
so kernels see the same alignment as with separately allocated parameters."""

READ_THREADS = 8
READ_CHUNK = 64 * 2**20
COPY_CHUNK = 128 * 2**20
"""A swap's copy goes in pieces this large so that its progress moves (a 17 GB copy would
otherwise read 0% for its whole second). All pieces are queued on the stream at once and
waited for in order, so the link never idles between them: as fast as one copy."""

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives in a flat buffer."""

    offset: int
    nbytes: int
    shape: torch.Size
    dtype: torch.dtype


@dataclass(frozen=True)
class FlatLayout:
    slots: Mapping[str, Slot]
    total_bytes: int

    @property
    def param_bytes(self) -> int:
        """Bytes of the parameters themselves, without alignment padding: what a swap moves."""
        return sum(s.nbytes for s in self.slots.values())

    @classmethod
    def of(cls, params: Mapping[str, tuple[torch.Size, torch.dtype]]) -> FlatLayout:
        slots: dict[str, Slot] = {}
        offset = 0
        for name, (shape, dtype) in params.items():
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            slots[name] = Slot(offset, nbytes, torch.Size(shape), dtype)
            offset += -(-nbytes // ALIGNMENT) * ALIGNMENT
        return cls(slots, max(offset, ALIGNMENT))

    @classmethod
    def of_module(cls, module: torch.nn.Module) -> FlatLayout:
        """The layout of a module's parameters (tied ones once, as `named_parameters` gives them)."""
        return cls.of({n: (p.shape, p.dtype) for n, p in module.named_parameters()})

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each parameter as a typed view into `flat` (a uint8 buffer of `total_bytes`)."""
        return {name: flat[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape) for name, s in self.slots.items()}


class HostBuffer:
    """An exact-size host allocation, page-locked when CUDA is in use so copies are DMA.

    Falls back to torch's pinned allocator, then to pageable memory, where page-locking
    is refused (a sandbox, a locked-memory limit); `pinned_by` says which happened.
    """

    def __init__(self, nbytes: int, pin: bool) -> None:
        wait_for_releases()
        self.nbytes = nbytes
        self.pinned_by = "none"
        self._registered = False
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)
        if not pin:
            return
        # Touching the pages first on all cores makes the registration below only lock them.
        self.tensor.zero_()
        code = _cuda_host_register(self.tensor.data_ptr(), nbytes)
        if code == 0:
            self._registered = True
            self.pinned_by = "cudaHostRegister"
            return
        log.warning("cudaHostRegister of %.2f GB failed (error %s); using torch's pinned allocator",
                    nbytes / 1e9, code)
        try:
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self.pinned_by = "torch pin_memory"
        except RuntimeError as exc:
            log.warning("pinned allocation of %s failed (%s); copies will be slower", fmt_bytes(nbytes), exc)

    @property
    def pinned(self) -> bool:
        return self.pinned_by != "none"

    def close(self) -> None:
        """Give the memory back now (not when the garbage collector gets to it)."""
        if self._registered:
            _cuda_host_unregister(self.tensor.data_ptr())
            self._registered = False
        self.tensor = torch.empty(0, dtype=torch.uint8)
        if self.pinned_by == "torch pin_memory":
            # torch caches freed pinned blocks; the host budget counts them as given back
            _host_empty_cache()
        self.pinned_by = "none"

    def close_in_background(self) -> None:
        """Close off the caller's path: unlocking and freeing take about 70 ms per GB, which a move
        that only gives memory back should not wait for. The next HostBuffer waits for it instead,
        so this process never holds more page-locked memory than its budget says."""
        if not self._registered and self.pinned_by != "torch pin_memory":
            self.close()
            return
        thread = threading.Thread(target=self.close, name="umem-host-release", daemon=True)
        with _releases_lock:
            _releases.append(thread)
        thread.start()

    def __del__(self) -> None:
        if self._registered:
            _cuda_host_unregister(self.tensor.data_ptr())


_releases: list[threading.Thread] = []
_releases_lock = threading.Lock()


def wait_for_releases() -> None:
    """Wait until every host buffer closed in the background is given back (benchmarks call it
    so that one move's release is not timed as part of the next)."""
    with _releases_lock:
        pending = list(_releases)
        _releases.clear()
    for thread in pending:
        thread.join()


def _cuda_host_register(ptr: int, nbytes: int) -> int:
    try:
        result = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
    except Exception as exc:  # noqa: BLE001 - no runtime binding: treat as refused
        log.debug("cudaHostRegister unavailable: %s", exc)
        return -1
    return int(getattr(result, "value", result))


def _cuda_host_unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001 - best effort at teardown
        log.debug("cudaHostUnregister failed", exc_info=True)


def _host_empty_cache() -> None:
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def copy_in_chunks(dst: torch.Tensor, src: torch.Tensor, on_bytes: Callable[[int], None] | None = None,
                   non_blocking: bool = False, chunk: int = COPY_CHUNK) -> None:
    """`dst.copy_(src)` for two flat uint8 buffers, in pieces of `chunk` bytes; `on_bytes(n)` as
    each piece lands. On CUDA every piece is queued first (an event after each), then the
    caller's thread waits for the events in order; returns when the whole copy is done."""
    if dst.numel() != src.numel():
        raise ValueError(f"copy of {src.numel()} bytes into a buffer of {dst.numel()}")
    device = dst.device if dst.is_cuda else src.device
    pending: list[tuple[torch.cuda.Event, int]] = []
    total = src.numel()
    for start in range(0, total, chunk):
        end = min(total, start + chunk)
        dst[start:end].copy_(src[start:end], non_blocking=non_blocking)
        if device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            pending.append((event, end - start))
        elif on_bytes is not None:
            on_bytes(end - start)
    for event, nbytes in pending:
        event.synchronize()
        if on_bytes is not None:
            on_bytes(nbytes)


@dataclass(frozen=True)
class _Piece:
    path: Path
    file_offset: int
    nbytes: int
    dest_offset: int


class CheckpointMismatch(ValueError):
    """The checkpoint does not hold the model's parameters as raw tensors of the right shape."""


class CorruptCheckpoint(CheckpointMismatch):
    """A damaged file (truncated, or a header that is not a valid tensor table), not a layout
    another loader could convert: reported by the file's name instead of falling back to
    `from_pretrained`, which could not read it either."""


class ShapeMismatch(CheckpointMismatch):
    """A parameter's shape on disk is not the one config.json makes: the two describe different
    models, and no conversion (`from_pretrained`'s) can make them agree."""


def safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensor table of a safetensors file and where its data starts; bounded and validated,
    since weights come from a registry and are untrusted."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise CorruptCheckpoint(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(size - 8, 100 * 2**20):
            raise CorruptCheckpoint(f"{path}: safetensors header of {length} bytes is implausible")
        try:
            header = json.loads(fh.read(length))
        except ValueError as exc:
            raise CorruptCheckpoint(f"{path}: safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptCheckpoint(f"{path}: safetensors header is not a table")
    header.pop("__metadata__", None)
    return header, 8 + length


def _entry(path: Path, name: str, info: object) -> tuple[torch.Size, int, int, str]:
    """Shape, data offsets and dtype of one header entry, checked to be what the format says."""
    try:
        if not isinstance(info, dict):
            raise TypeError("not a table")
        shape = torch.Size(int(x) for x in info.get("shape", []))
        begin, end = (int(x) for x in info.get("data_offsets", (0, -1)))
        dtype = str(info.get("dtype", ""))
    except (TypeError, ValueError) as exc:
        raise CorruptCheckpoint(f"{path}: entry {name!r} of the safetensors header is malformed: {exc}") from None
    return shape, begin, end, dtype


def plan_reads(files: Iterable[Path], layout: FlatLayout) -> tuple[list[_Piece], list[tuple[Path, str]]]:
    """Byte ranges to copy verbatim, and the tensors that need a dtype conversion on the way.

    Raises CheckpointMismatch when a parameter is missing or has another shape.
    """
    pieces: list[_Piece] = []
    convert: list[tuple[Path, str]] = []
    found: set[str] = set()
    for path in files:
        header, data_start = safetensors_header(path)
        file_size = path.stat().st_size
        for name, info in header.items():
            slot = layout.slots.get(name)
            if slot is None or name in found:
                continue
            shape, begin, end, dtype = _entry(path, name, info)
            if shape != slot.shape:
                raise ShapeMismatch(f"{name} has shape {tuple(shape)} on disk, {tuple(slot.shape)} in the model "
                                    "config.json describes")
            if not 0 <= begin <= end or data_start + end > file_size:
                raise CorruptCheckpoint(f"{path}: {name} lies outside the file (bytes {data_start + begin}-"
                                        f"{data_start + end} of a {file_size}-byte file): truncated or corrupt")
            found.add(name)
            if _SAFETENSORS_DTYPES.get(dtype) == slot.dtype and end - begin == slot.nbytes:
                for start in range(0, slot.nbytes, READ_CHUNK):
                    n = min(READ_CHUNK, slot.nbytes - start)
                    pieces.append(_Piece(path, data_start + begin + start, n, slot.offset + start))
            else:
                convert.append((path, name))
    missing = sorted(set(layout.slots) - found)
    if missing:
        raise CheckpointMismatch(f"checkpoint lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
    return pieces, convert
