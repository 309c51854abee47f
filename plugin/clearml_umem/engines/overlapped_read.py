"""Reading a checkpoint from disk while the pieces already read are copied to the device.

A reload from disk used to be three steps one after the other: read every file into the
host buffer, then copy the whole buffer to the device. Here reader threads read pieces of
the safetensors files and the caller's thread copies each piece to the device as soon as it
lands (on its own CUDA stream, `non_blocking`), so reading and uploading overlap and a
reload takes about as long as the slower of the two.

Two ways, by whether a host copy is wanted:
- into the host buffer (the RAM tier's copy, or the copy a hot model keeps): the readers
  fill it directly, and with a device buffer given each piece is uploaded from it once read.
  No other host memory is used.
- straight to the device (no host copy may be held): pieces go through a small ring of
  page-locked slots; a reader takes a free slot, waits for the event of that slot's last
  copy (so a slot is never overwritten while the device still reads it), reads into it and
  hands it to the caller, which queues its copy and returns the slot. The ring bounds the
  extra host memory (`RING_SLOTS` x `SLOT_BYTES`, 256 MiB) whatever the model's size.

On a machine without CUDA the device is the CPU: the same threads and ring, with plain
copies (nothing to overlap them with but the reads). Reads are plain positional reads:
from the page cache (what a reload of a recently used model reads) they beat O_DIRECT,
which would bypass the cache. A file shorter than its header says is an error naming it.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clearml_umem.engines.weight_store import (
    READ_THREADS,
    CorruptCheckpoint,
    FlatLayout,
    HostBuffer,
    _Piece,
    plan_reads,
)

SLOT_BYTES = 32 * 2**20
"""Size of a ring slot, and of the pieces the readers read: small enough that the first copy
starts early and the last one ends soon after the last read, large enough for full-speed reads."""
RING_SLOTS = 8
"""Slots in the ring: one per reader thread, so every reader can read while copies run."""
_POLL_S = 0.05
"""How often a blocked reader or the caller looks at the cancel flag."""


class ReadCancelled(Exception):
    """The read was cancelled (the engine is closing); nothing was attached."""


@dataclass
class ReadStats:
    """What one read did, for tests and benchmarks: how far the readers ran ahead of the copies."""

    bytes_read: int = 0
    pieces: int = 0
    threads: int = 0
    ring_bytes: int = 0
    ring_slots: int = 0
    peak_ahead: int = 0
    """Most pieces read but not yet handed to the device at once (bounded by the ring)."""
    seconds: float = 0.0

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0


def split_pieces(pieces: Iterable[_Piece], size: int) -> list[_Piece]:
    """Pieces of at most `size` bytes, in destination order (so the device fills front to back)."""
    out: list[_Piece] = []
    for p in sorted(pieces, key=lambda p: p.dest_offset):
        for start in range(0, p.nbytes, size):
            n = min(size, p.nbytes - start)
            out.append(_Piece(p.path, p.file_offset + start, n, p.dest_offset + start))
    return out


def read_checkpoint(files: Iterable[Path], layout: FlatLayout, flat: torch.Tensor,
                    on_bytes: Callable[[int], None] | None = None, cancel: threading.Event | None = None,
                    threads: int = READ_THREADS) -> int:
    """Fill `flat` (host, uint8, `layout.total_bytes`) from safetensors files; returns the bytes read.

    `on_bytes(n)` is called from the reading threads as each piece lands, so a load of many GB
    can report its progress while it runs.
    """
    stream_checkpoint(files, layout, host_flat=flat, on_bytes=on_bytes, cancel=cancel, threads=threads)
    return layout.param_bytes


def stream_checkpoint(files: Iterable[Path], layout: FlatLayout, *, host_flat: torch.Tensor | None = None,
                      device_flat: torch.Tensor | None = None, on_bytes: Callable[[int], None] | None = None,
                      cancel: threading.Event | None = None, threads: int = READ_THREADS,
                      slot_bytes: int = SLOT_BYTES, ring_slots: int = RING_SLOTS) -> ReadStats:
    """Fill `host_flat`, `device_flat` or both from the checkpoint, reads and copies overlapping.

    Raises CheckpointMismatch (from `plan_reads`) when the files do not hold the layout's
    tensors, CorruptCheckpoint naming the file when one ends early, ReadCancelled when
    `cancel` is set. Every reader thread has ended when this returns or raises.
    """
    if host_flat is None and device_flat is None:
        raise ValueError("stream_checkpoint needs a host buffer, a device buffer or both")
    for flat in (host_flat, device_flat):
        if flat is not None and flat.numel() != layout.total_bytes:
            raise ValueError(f"a buffer of {flat.numel()} bytes for a layout of {layout.total_bytes}")
    started = time.perf_counter()
    pieces, convert = plan_reads(list(files), layout)
    pieces = split_pieces(pieces, slot_bytes)
    run = _Run(pieces, host_flat, device_flat, on_bytes, cancel, max(1, min(threads, len(pieces) or 1)),
               slot_bytes, ring_slots)
    try:
        run.go()
        if convert:
            _convert(convert, layout, host_flat, device_flat, on_bytes, run.stats)
    finally:
        run.close()
    run.stats.seconds = time.perf_counter() - started
    return run.stats


def _convert(convert: Sequence[tuple[Path, str]], layout: FlatLayout, host_flat: torch.Tensor | None,
             device_flat: torch.Tensor | None, on_bytes: Callable[[int], None] | None, stats: ReadStats) -> None:
    """Tensors stored in another dtype, one at a time through safetensors (rare: a float32 checkpoint
    loaded as bfloat16); the converted tensor goes where the raw pieces went."""
    from safetensors import safe_open

    targets = [layout.views(flat) for flat in (host_flat, device_flat) if flat is not None]
    by_file: dict[Path, list[str]] = {}
    for path, name in convert:
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for name in names:
                tensor = fh.get_tensor(name).to(layout.slots[name].dtype)
                for views in targets:
                    views[name].copy_(tensor)
                stats.bytes_read += layout.slots[name].nbytes
                if on_bytes is not None:
                    on_bytes(layout.slots[name].nbytes)
    if device_flat is not None and device_flat.is_cuda:
        torch.cuda.synchronize(device_flat.device)


class _Run:
    """One read: reader threads, the ring (when there is no host buffer) and the caller's copy loop."""

    def __init__(self, pieces: list[_Piece], host_flat: torch.Tensor | None, device_flat: torch.Tensor | None,
                 on_bytes: Callable[[int], None] | None, cancel: threading.Event | None, threads: int,
                 slot_bytes: int, ring_slots: int) -> None:
        self.pieces = pieces
        self.host_flat = host_flat
        self.device_flat = device_flat
        self.on_bytes = on_bytes
        self.cancel = cancel or threading.Event()
        self.stop = threading.Event()
        self.stats = ReadStats(pieces=len(pieces), threads=threads)
        self.cuda = device_flat is not None and device_flat.is_cuda
        self.ring: HostBuffer | None = None
        self.slot_bytes = slot_bytes
        self.events: list[Any] = []
        self.free: queue.Queue[int] = queue.Queue()
        if host_flat is None and pieces:
            # no bigger than this read needs: a small model gets a small ring
            self.slot_bytes = slot_bytes = max(p.nbytes for p in pieces)
            ring_slots = min(max(threads, ring_slots), len(pieces))
            self.ring = HostBuffer(ring_slots * slot_bytes, pin=self.cuda)
            self.stats.ring_bytes, self.stats.ring_slots = ring_slots * slot_bytes, ring_slots
            self.events = [None] * ring_slots
            for slot in range(ring_slots):
                self.free.put(slot)
        self.copy_stream = torch.cuda.Stream(device_flat.device) if self.cuda else None
        if self.copy_stream is not None:
            # the device buffer was allocated on the current stream: copies must come after that
            self.copy_stream.wait_stream(torch.cuda.current_stream(device_flat.device))
        self.done: queue.Queue[tuple[_Piece, int] | BaseException] = queue.Queue()
        self.next_index = 0
        self.lock = threading.Lock()
        self.ahead = 0
        self.fds: dict[Path, int] = {}
        self.threads: list[threading.Thread] = []
        for path in dict.fromkeys(p.path for p in pieces):
            self.fds[path] = os.open(path, os.O_RDONLY)

    # --------------------------------------------------------------- readers

    def _take(self) -> _Piece | None:
        with self.lock:
            if self.stop.is_set() or self.next_index >= len(self.pieces):
                return None
            piece = self.pieces[self.next_index]
            self.next_index += 1
            return piece

    def _slot(self) -> int | None:
        """A free ring slot whose last copy has finished; None when the read is stopping."""
        while not self.stop.is_set():
            try:
                slot = self.free.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            event = self.events[slot]
            if event is not None:
                event.synchronize()
            return slot
        return None

    def _reader(self) -> None:
        try:
            while not self.stop.is_set() and not self.cancel.is_set():
                piece = self._take()
                if piece is None:
                    return
                if self.ring is not None:
                    slot = self._slot()
                    if slot is None:
                        return
                    start = slot * self.slot_bytes
                    target = self.ring.tensor[start:start + piece.nbytes]
                else:
                    assert self.host_flat is not None
                    slot = -1
                    target = self.host_flat[piece.dest_offset:piece.dest_offset + piece.nbytes]
                self._pread(piece, target)
                with self.lock:
                    self.stats.bytes_read += piece.nbytes
                    self.ahead += 1
                    self.stats.peak_ahead = max(self.stats.peak_ahead, self.ahead)
                if self.device_flat is None:
                    with self.lock:
                        self.ahead -= 1
                    if self.on_bytes is not None:
                        self.on_bytes(piece.nbytes)
                self.done.put((piece, slot))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which raises it
            self.stop.set()
            self.done.put(exc)

    def _pread(self, piece: _Piece, target: torch.Tensor) -> None:
        view = memoryview(target.numpy())
        fd, got = self.fds[piece.path], 0
        while got < piece.nbytes:
            n = os.preadv(fd, [view[got:]], piece.file_offset + got)
            if n <= 0:
                raise CorruptCheckpoint(f"{piece.path}: file ended at byte {piece.file_offset + got}, its header "
                                          f"says data goes on to byte {piece.file_offset + piece.nbytes}: the file "
                                          "is truncated or corrupt")
            got += n

    # ----------------------------------------------------------- the caller

    def go(self) -> None:
        """Start the readers and copy what they read until every piece is on its way; raise what they raised."""
        for i in range(self.stats.threads):
            thread = threading.Thread(target=self._reader, name=f"umem-read-{i}", daemon=True)
            self.threads.append(thread)
            thread.start()
        for _ in range(len(self.pieces)):
            item = self._next_done()
            if isinstance(item, BaseException):
                raise item
            if self.device_flat is not None:
                self._copy(*item)
        if self.copy_stream is not None:
            self.copy_stream.synchronize()

    def _next_done(self) -> tuple[_Piece, int] | BaseException:
        while True:
            if self.cancel.is_set():
                self.stop.set()
                return ReadCancelled("the read was cancelled")
            try:
                return self.done.get(timeout=_POLL_S)
            except queue.Empty:
                if not any(t.is_alive() for t in self.threads) and self.done.empty():
                    return RuntimeError("the reader threads ended before every piece was read")

    def _copy(self, piece: _Piece, slot: int) -> None:
        assert self.device_flat is not None
        dst = self.device_flat[piece.dest_offset:piece.dest_offset + piece.nbytes]
        if self.ring is not None:
            src = self.ring.tensor[slot * self.slot_bytes:slot * self.slot_bytes + piece.nbytes]
        else:
            assert self.host_flat is not None
            src = self.host_flat[piece.dest_offset:piece.dest_offset + piece.nbytes]
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                dst.copy_(src, non_blocking=True)
                if slot >= 0:
                    event = torch.cuda.Event()
                    event.record(self.copy_stream)
                    self.events[slot] = event
        else:
            dst.copy_(src)
        with self.lock:
            self.ahead -= 1
        if slot >= 0:
            self.free.put(slot)
        if self.on_bytes is not None:
            self.on_bytes(piece.nbytes)

    def close(self) -> None:
        """Stop and join the readers, wait for queued copies, then free the ring and close the files."""
        self.stop.set()
        for thread in self.threads:
            thread.join()
        if self.copy_stream is not None:
            self.copy_stream.synchronize()  # no DMA may still read a slot that is given back
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
