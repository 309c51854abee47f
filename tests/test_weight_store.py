"""Flat weight buffers: layout, checkpoint reads (untrusted files included) and page-locked host memory."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clearml_umem.bandwidth import probe_bandwidth
from clearml_umem.engines.overlapped_read import read_checkpoint
from clearml_umem.engines.weight_store import (
    ALIGNMENT,
    CheckpointMismatch,
    FlatLayout,
    HostBuffer,
)


def tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return {
        "embed.weight": torch.randn(37, 16, dtype=torch.bfloat16),
        "norm.weight": torch.randn(16, dtype=torch.bfloat16),
        "proj.weight": torch.randn(16, 24, dtype=torch.bfloat16),
        "proj.bias": torch.randn(24, dtype=torch.float32),
    }


def layout_of(named: dict[str, torch.Tensor]) -> FlatLayout:
    return FlatLayout.of({n: (t.shape, t.dtype) for n, t in named.items()})


def test_layout_aligns_every_parameter_and_views_round_trip() -> None:
    named = tensors()
    layout = layout_of(named)
    assert all(s.offset % ALIGNMENT == 0 for s in layout.slots.values())
    assert layout.param_bytes == sum(t.numel() * t.element_size() for t in named.values())
    assert layout.total_bytes >= layout.param_bytes
    flat = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    views = layout.views(flat)
    for name, t in named.items():
        views[name].copy_(t)
    again = layout.views(flat.clone())
    assert all(torch.equal(again[n], t) and again[n].dtype == t.dtype for n, t in named.items())


def test_read_checkpoint_from_several_files_matches_the_tensors(tmp_path: Path) -> None:
    named = tensors()
    save_file({k: v for k, v in named.items() if k.startswith("embed")}, tmp_path / "a.safetensors")
    save_file({k: v for k, v in named.items() if not k.startswith("embed")} | {"extra": torch.ones(3)},
              tmp_path / "b.safetensors")
    layout = layout_of(named)
    flat = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    assert read_checkpoint([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], layout, flat) == \
        layout.param_bytes
    views = layout.views(flat)
    assert all(torch.equal(views[n], t) for n, t in named.items())


def test_read_checkpoint_converts_dtypes_on_the_way(tmp_path: Path) -> None:
    named = tensors()
    save_file({k: v.float() for k, v in named.items()}, tmp_path / "f32.safetensors")
    layout = layout_of(named)
    flat = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    read_checkpoint([tmp_path / "f32.safetensors"], layout, flat)
    views = layout.views(flat)
    assert all(torch.equal(views[n], t) for n, t in named.items())


def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize("case", ["missing", "shape", "outside", "huge header", "short", "not a table"])
def test_untrusted_checkpoints_are_refused_with_a_reason(tmp_path: Path, case: str) -> None:
    layout = FlatLayout.of({"w": (torch.Size([4]), torch.float32)})
    path = tmp_path / "m.safetensors"
    if case == "missing":
        raw_safetensors(path, {"other": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(16))
        match = "lacks 1 parameter"
    elif case == "shape":
        raw_safetensors(path, {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16))
        match = "shape"
    elif case == "outside":
        raw_safetensors(path, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4096]}}, bytes(16))
        match = "outside the file"
    elif case == "huge header":
        path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
        match = "implausible"
    elif case == "short":
        path.write_bytes(b"\x01\x02")
        match = "too short"
    else:
        raw_safetensors(path, [], b"")  # type: ignore[arg-type]
        match = "not a table"
    with pytest.raises(CheckpointMismatch, match=match):
        read_checkpoint([path], layout, torch.zeros(layout.total_bytes, dtype=torch.uint8))


def test_host_buffer_without_cuda_is_plain_memory_of_the_exact_size() -> None:
    buf = HostBuffer(12345, pin=False)
    assert buf.tensor.numel() == 12345 and not buf.pinned and buf.pinned_by == "none"
    buf.close()
    assert buf.tensor.numel() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_buffer_is_page_locked_at_its_exact_size() -> None:
    size = 3 * 2**20 + 7
    buf = HostBuffer(size, pin=True)
    assert buf.pinned_by == "cudaHostRegister", "exact-size registration, not torch's power-of-two pinned pool"
    assert buf.tensor.numel() == size and buf.tensor.is_pinned()
    buf.tensor.fill_(5)
    on_device = buf.tensor.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert int(on_device.sum()) == 5 * size
    buf.close()
    assert not buf.pinned
    later = HostBuffer(size, pin=True)
    later.close_in_background()
    after = HostBuffer(size, pin=True)
    assert later.tensor.numel() == 0 and not later.pinned, "a new buffer waits for released ones to be unlocked"
    after.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_probe_copies_from_page_locked_memory_to_the_device() -> None:
    probe = probe_bandwidth("cuda", 64 * 2**20)
    assert probe.path == "pinned host -> cuda" and probe.gbps > 0 and probe.bytes == 64 * 2**20
