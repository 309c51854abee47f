"""Reading a checkpoint while copying what was read: identical bytes, a bounded ring, clean errors and cancels."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clearml_umem.bandwidth import probe_storage
from clearml_umem.engines.overlapped_read import ReadCancelled, split_pieces, stream_checkpoint
from clearml_umem.engines.weight_store import CorruptCheckpoint, FlatLayout, _Piece

SLOT = 4096
"""Small slots, so that a few kB of tensors make many pieces and the ring wraps around many times."""


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("umem-read-")]


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[list[Path], FlatLayout, dict[str, torch.Tensor]]:
    torch.manual_seed(11)
    named = {
        "embed.weight": torch.randn(300, 40, dtype=torch.bfloat16),  # 24000 bytes: six pieces
        "norm.weight": torch.randn(40, dtype=torch.bfloat16),
        "proj.weight": torch.randn(40, 90, dtype=torch.bfloat16),
        "head.weight": torch.randn(90, 40, dtype=torch.float32),  # stored as float32, loaded as bfloat16
    }
    save_file({k: named[k] for k in ("embed.weight", "norm.weight")}, tmp_path / "a.safetensors")
    save_file({k: named[k] for k in ("proj.weight", "head.weight")}, tmp_path / "b.safetensors")
    layout = FlatLayout.of({n: (t.shape, torch.bfloat16) for n, t in named.items()})
    return [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], layout, named


def assert_holds(flat: torch.Tensor, layout: FlatLayout, named: dict[str, torch.Tensor]) -> None:
    views = layout.views(flat)
    for name, tensor in named.items():
        expected = tensor.to(torch.bfloat16)
        assert torch.equal(views[name].view(torch.int16), expected.view(torch.int16)), name


@pytest.mark.parametrize("mode", ["ring to device", "host and device", "host only"])
def test_every_way_reads_the_same_bytes(checkpoint: tuple, mode: str) -> None:
    files, layout, named = checkpoint
    host = torch.zeros(layout.total_bytes, dtype=torch.uint8) if mode != "ring to device" else None
    device = torch.zeros(layout.total_bytes, dtype=torch.uint8) if mode != "host only" else None
    counted: list[int] = []
    stats = stream_checkpoint(files, layout, host_flat=host, device_flat=device, on_bytes=counted.append,
                              threads=3, slot_bytes=SLOT, ring_slots=2)
    for flat in (host, device):
        if flat is not None:
            assert_holds(flat, layout, named)
    assert sum(counted) == stats.bytes_read == layout.param_bytes
    assert stats.pieces > 8, "the checkpoint went in many pieces"
    assert (stats.ring_bytes > 0) == (mode == "ring to device"), "only a read without a host buffer needs the ring"
    assert reader_threads() == []


def test_the_ring_bounds_how_far_the_readers_run_ahead(checkpoint: tuple) -> None:
    files, layout, named = checkpoint
    device = torch.zeros(layout.total_bytes, dtype=torch.uint8)

    def slow_copy(_: int) -> None:
        time.sleep(0.005)  # the device is slow: without the ring, the readers would read everything first

    stats = stream_checkpoint(files, layout, device_flat=device, on_bytes=slow_copy, threads=3, slot_bytes=SLOT,
                              ring_slots=3)
    assert_holds(device, layout, named)
    assert stats.ring_slots == 3 and stats.ring_bytes == 3 * SLOT
    assert stats.peak_ahead <= stats.ring_slots < stats.pieces
    assert stats.peak_ahead >= 2, "the readers did run ahead of the copies"


def test_pieces_are_split_to_the_slot_size_in_destination_order() -> None:
    path = Path("m.safetensors")
    pieces = split_pieces([_Piece(path, 500, 10000, 8192), _Piece(path, 100, 300, 0)], 4096)
    assert [(p.file_offset, p.nbytes, p.dest_offset) for p in pieces] == [
        (100, 300, 0), (500, 4096, 8192), (4596, 4096, 12288), (8692, 1808, 16384)]


@pytest.mark.parametrize("mode", ["ring to device", "host only"])
def test_a_file_truncated_before_the_read_is_refused_by_name(checkpoint: tuple, mode: str) -> None:
    files, layout, _ = checkpoint
    data = files[0].read_bytes()
    files[0].write_bytes(data[:len(data) // 2])
    flat = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    kwargs = {"device_flat": flat} if mode == "ring to device" else {"host_flat": flat}
    with pytest.raises(CorruptCheckpoint, match=f"{files[0]}: embed.weight lies outside the file"):
        stream_checkpoint(files, layout, slot_bytes=SLOT, **kwargs)
    assert reader_threads() == []


@pytest.mark.parametrize("mode", ["ring to device", "host only"])
def test_a_file_that_shrinks_during_the_read_is_an_error_naming_it(checkpoint: tuple, mode: str) -> None:
    files, layout, _ = checkpoint
    size = files[0].stat().st_size
    flat = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    kwargs = {"device_flat": flat} if mode == "ring to device" else {"host_flat": flat}
    once = threading.Lock()

    def truncate(_: int) -> None:
        if once.acquire(blocking=False):
            with files[0].open("r+b") as fh:
                fh.truncate(size // 3)

    with pytest.raises(CorruptCheckpoint, match=f"{files[0]}: file ended at byte"):
        stream_checkpoint(files, layout, on_bytes=truncate, threads=1, slot_bytes=SLOT, ring_slots=1, **kwargs)
    assert reader_threads() == []


@pytest.mark.parametrize("bad", ["offsets", "shape", "json"])
def test_a_malformed_header_is_an_error_naming_the_file(tmp_path: Path, bad: str) -> None:
    import json
    import struct

    entry = {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}
    if bad == "offsets":
        entry["data_offsets"] = ["zero", {}]
    elif bad == "shape":
        entry["shape"] = [[1, 2]]
    blob = b"{not json" if bad == "json" else json.dumps({"w": entry}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(8))
    layout = FlatLayout.of({"w": (torch.Size([4]), torch.bfloat16)})
    with pytest.raises(CorruptCheckpoint, match=str(path)):
        stream_checkpoint([path], layout, host_flat=torch.zeros(layout.total_bytes, dtype=torch.uint8))


@pytest.mark.parametrize("mode", ["ring to device", "host and device", "host only"])
def test_a_cancel_stops_the_read_and_every_reader(checkpoint: tuple, mode: str) -> None:
    files, layout, _ = checkpoint
    host = torch.zeros(layout.total_bytes, dtype=torch.uint8) if mode != "ring to device" else None
    device = torch.zeros(layout.total_bytes, dtype=torch.uint8) if mode != "host only" else None
    cancel = threading.Event()
    seen: list[int] = []

    def cancel_at_first_piece(n: int) -> None:
        seen.append(n)
        cancel.set()

    with pytest.raises(ReadCancelled):
        stream_checkpoint(files, layout, host_flat=host, device_flat=device, on_bytes=cancel_at_first_piece,
                          cancel=cancel, threads=1, slot_bytes=SLOT, ring_slots=1)
    assert 0 < sum(seen) < layout.param_bytes, "stopped part way"
    assert reader_threads() == []


def test_a_buffer_of_the_wrong_size_is_refused(checkpoint: tuple) -> None:
    files, layout, _ = checkpoint
    with pytest.raises(ValueError, match="needs a host buffer"):
        stream_checkpoint(files, layout)
    with pytest.raises(ValueError, match="for a layout of"):
        stream_checkpoint(files, layout, host_flat=torch.zeros(10, dtype=torch.uint8))


def test_storage_probe_reads_every_byte_of_the_files(checkpoint: tuple) -> None:
    files, _, _ = checkpoint
    probe = probe_storage(files, threads=2, piece_bytes=SLOT, repeats=1)
    assert probe.bytes == sum(f.stat().st_size for f in files)
    assert probe.gbps > 0 and probe.threads == 2 and probe.source == "page cache"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["ring to device", "host and device"])
def test_on_cuda_the_copies_run_on_their_stream_and_land_whole(checkpoint: tuple, mode: str) -> None:
    files, layout, named = checkpoint
    host = torch.zeros(layout.total_bytes, dtype=torch.uint8) if mode == "host and device" else None
    device = torch.zeros(layout.total_bytes, dtype=torch.uint8, device="cuda")
    stats = stream_checkpoint(files, layout, host_flat=host, device_flat=device, threads=3, slot_bytes=SLOT,
                              ring_slots=2)
    assert_holds(device.cpu(), layout, named)
    if host is not None:
        assert_holds(host, layout, named)
    assert stats.peak_ahead <= (stats.ring_slots or stats.pieces)
    assert reader_threads() == []
