"""The bounded GGUF reader: real files written by the gguf package, and hostile headers built byte by byte."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from clearml_umem.gguf_file import GGUFError, read_gguf
from clearml_umem.spec import SpecError, spec_from_mapping
from clearml_umem.tinygguf import TinyGGUF, write_tiny_gguf

gguf = pytest.importorskip("gguf", reason="the gguf package (test extra) writes the tiny GGUF models")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {q: write_tiny_gguf(root / f"m-{q}.gguf", TinyGGUF(f"m-{q}", q)) for q in ("f16", "q8_0")}


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_facts_match_the_gguf_package(tiny: dict[str, Path], quant: str) -> None:
    path = tiny[quant]
    info = read_gguf(path)
    theirs = gguf.GGUFReader(path)
    assert info.tensor_bytes == sum(int(t.n_bytes) for t in theirs.tensors)
    assert info.data_offset == theirs.data_offset
    assert {t.name for t in info.tensors} == {t.name for t in theirs.tensors}
    assert (info.architecture, info.context_length, info.quantization) == ("llama", 2048, quant)
    assert info.array_lengths["tokenizer.ggml.tokens"] == len(theirs.fields["tokenizer.ggml.tokens"].data)
    # 2 layers x 2 KV heads x (16 + 16) dims x 2 bytes (f16 cache)
    assert info.kv_bytes_per_token() == 2 * 2 * (16 + 16) * 2
    assert info.metadata["tokenizer.ggml.tokens"] is None, "a vocabulary is walked, not kept"


def test_a_gguf_manifest_entry_is_read_from_the_file(tiny: dict[str, Path]) -> None:
    spec = spec_from_mapping({"name": "g", "weights": str(tiny["q8_0"])})
    assert (spec.engine, spec.quantization, spec.architecture, spec.context_length) == ("llamacpp", "q8_0", "llama",
                                                                                         2048)
    assert spec.size_bytes == tiny["q8_0"].stat().st_size and spec.parameters and spec.parameters > 0
    same = spec_from_mapping({"name": "g", "weights": str(tiny["q8_0"]), "engine": "llamacpp",
                              "quantization": "Q8_0"})
    assert same.quantization == "Q8_0"


@pytest.mark.parametrize(("entry", "field", "needle"), [
    ({"quantization": "f16"}, "quantization", "'q8_0' (from its header)"),
    ({"engine": "vllm"}, "engine", "engine 'llamacpp' serves"),
    ({"quantization": 8}, "quantization", "non-empty string"),
])
def test_a_gguf_entry_that_contradicts_its_file_is_refused(tiny: dict[str, Path], entry: dict, field: str,
                                                          needle: str) -> None:
    with pytest.raises(SpecError) as err:
        spec_from_mapping({"name": "g", "weights": str(tiny["q8_0"]), **entry})
    assert err.value.field == field and needle in str(err.value)


def test_llamacpp_needs_a_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(SpecError) as err:
        spec_from_mapping({"name": "g", "weights": str(tmp_path), "engine": "llamacpp"})
    assert err.value.field == "weights" and "one .gguf file" in str(err.value)
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(SpecError) as err:
        spec_from_mapping({"name": "g", "weights": str(bad), "engine": "llamacpp"})
    assert err.value.field == "weights" and "no GGUF magic" in str(err.value)


# -- hostile headers, built byte by byte ------------------------------------------------------


def _str(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def _kv_u32(key: str, value: int) -> bytes:
    return _str(key) + struct.pack("<II", 4, value)


def _kv_str(key: str, value: str) -> bytes:
    return _str(key) + struct.pack("<I", 8) + _str(value)


def _tensor(name: str, dims: tuple[int, ...], type_id: int = 0, offset: int = 0) -> bytes:
    return _str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", type_id, offset)


def _file(kvs: list[bytes], tensors: list[bytes], data: bytes = b"\0" * 64, *, version: int = 3,
          n_kv: int | None = None, n_tensors: int | None = None) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    head += b"\0" * (-len(head) % 32)
    return head + data


ARCH = _kv_str("general.architecture", "llama")
GOOD = _tensor("w", (16,), 0, 0)  # 16 f32 = 64 bytes


def test_a_minimal_handmade_file_reads(tmp_path: Path) -> None:
    path = tmp_path / "ok.gguf"
    path.write_bytes(_file([ARCH, _kv_u32("llama.context_length", 128)], [GOOD]))
    info = read_gguf(path)
    assert (info.architecture, info.context_length, info.tensor_bytes) == ("llama", 128, 64)


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("magic", b"GGML" + b"\0" * 60, "no GGUF magic"),
    ("empty", b"", "no GGUF magic"),
    ("version 1", _file([ARCH], [GOOD], version=1), "version 1 is not supported"),
    ("tensor count", _file([ARCH], [GOOD], n_tensors=2**60), "tensor count"),
    ("metadata count", _file([ARCH], [GOOD], n_kv=2**40), "metadata count"),
    ("key length", _file([_str("general.architecture", 2**62) + b"x"], [GOOD]), "over the limit"),
    ("string length", _file([_str("general.name") + struct.pack("<I", 8) + _str(b"ab", 2**40)], [GOOD]),
     "over the limit"),
    ("string past end", _file([_str("general.name") + struct.pack("<I", 8) + _str(b"ab", 10**6)], [], b""),
     "the file ends first"),
    ("array count", _file([ARCH, _str("a") + struct.pack("<IIQ", 9, 4, 2**50)], [GOOD]),
     "more than the rest of the file holds"),
    ("nested array", _file([ARCH, _str("a") + struct.pack("<IIQ", 9, 9, 1)], [GOOD]), "unknown element type"),
    ("value type", _file([ARCH, _str("a") + struct.pack("<I", 77)], [GOOD]), "unknown value type"),
    ("not utf-8", _file([_str("general.name") + struct.pack("<I", 8) + _str(b"\xff\xfe")], [GOOD]), "not UTF-8"),
    ("dims", _file([ARCH], [_tensor("w", (1, 1, 1, 1, 16))]), "5 dimensions"),
    ("empty dim", _file([ARCH], [_tensor("w", (16, 0))]), "empty dimension"),
    ("tensor type", _file([ARCH], [_tensor("w", (16,), 99)]), "unknown type 99"),
    ("block size", _file([ARCH], [_tensor("w", (16,), 8)]), "not a multiple of its block size 32"),
    ("huge shape", _file([ARCH], [_tensor("w", (2**40, 2**20))]), "larger than the file"),
    ("offset past end", _file([ARCH], [_tensor("w", (16,), 0, 2**40)]), "ends past the end of the file"),
    ("truncated data", _file([ARCH], [_tensor("w", (32,))]), "truncated or corrupt"),
    ("unaligned", _file([ARCH], [_tensor("w", (4,), 0, 4)]), "not aligned"),
    ("overlap", _file([ARCH], [_tensor("a", (16,)), _tensor("b", (8,), 0, 32)]), "overlap"),
    ("duplicate", _file([ARCH], [GOOD, GOOD]), "appears twice"),
    ("alignment", _file([ARCH, _kv_u32("general.alignment", 3)], [GOOD]), "power of two"),
    ("no architecture", _file([], [GOOD]), "no general.architecture"),
])
def test_hostile_headers_are_refused_with_the_reason(tmp_path: Path, name: str, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError) as err:
        read_gguf(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_a_truncated_real_file_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    data = tiny["f16"].read_bytes()
    for cut in (len(data) // 2, 200, 30):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(GGUFError):
            read_gguf(path)


def test_per_layer_kv_heads_of_a_deep_model_size_the_cache(tmp_path: Path) -> None:
    """100 layers with a per-layer head_count_kv array (0 for layers without attention, as hybrid
    models write it): the array is kept and each layer counted as it says."""
    layers = 100
    kv_heads = [2 if i % 2 == 0 else 0 for i in range(layers)]
    arr = _str("llama.attention.head_count_kv") + struct.pack("<IIQ", 9, 4, layers) + struct.pack(f"<{layers}I",
                                                                                                   *kv_heads)
    path = tmp_path / "deep.gguf"
    path.write_bytes(_file([ARCH, _kv_u32("llama.block_count", layers), _kv_u32("llama.embedding_length", 64),
                            _kv_u32("llama.attention.head_count", 4), arr], [GOOD]))
    info = read_gguf(path)
    assert info.kv_bytes_per_token() == 50 * 2 * (16 + 16) * 2
