"""A bounded reader of GGUF headers: the facts the router budgets a llama.cpp model with.

Why not the `gguf` package: the router must read files it did not make (a registry entry,
a download) and a GGUF header is a chain of lengths and counts that a hostile file can set
to anything. This reader checks every count, string length, dimension and offset against
the file's own size before it reads or allocates, refuses with a `GGUFError` naming what is
wrong, and keeps only small values (an array of more than `KEEP_ARRAY_ITEMS` items, like a
vocabulary, is checked and skipped, its length kept). It needs only the standard library.

What it gives (`GGUFInfo`): architecture, context length, quantization (the file type, else
the dominant tensor type), the bytes of every tensor (what a full offload puts on the
device), and the attention shape that sizes the KV cache for a chosen context.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
"""GGML_MAX_DIMS: llama.cpp refuses more."""
MAX_TENSORS = 1_000_000
MAX_KV = 1_000_000
MAX_KEY_BYTES = 65_535
MAX_NAME_BYTES = 1024
MAX_STRING_BYTES = 64 * 2**20
"""No metadata string is this long (a chat template is kilobytes); a longer one is an attack."""
KEEP_ARRAY_ITEMS = 64
"""String arrays longer than this (vocabularies, merges) are walked for their bounds, not kept."""
KEEP_NUMBER_ITEMS = 1024
"""Numeric arrays up to this long are kept: per-layer values (`attention.head_count_kv` of a
model with 80 layers) size the KV cache; longer ones (token scores and types) are skipped."""

# GGML tensor types: id -> (name, elements per block, bytes per block); as ggml.h and gguf-py say.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}

# llama_ftype (general.file_type) -> the quantization name a registry entry carries.
FILE_TYPES: dict[int, str] = {
    0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 10: "q2_k", 11: "q3_k_s",
    12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m", 16: "q5_k_s", 17: "q5_k_m", 18: "q6_k",
    19: "iq2_xxs", 20: "iq2_xs", 21: "q2_k_s", 22: "iq3_xs", 23: "iq3_xxs", 24: "iq1_s", 25: "iq4_nl",
    26: "iq3_s", 27: "iq3_m", 28: "iq2_s", 29: "iq2_m", 30: "iq4_xs", 31: "iq1_m", 32: "bf16", 36: "tq1_0",
    37: "tq2_0", 38: "mxfp4_moe", 39: "nvfp4", 40: "q1_0",
}

# GGUF metadata value types: id -> struct format (scalars), or the two compound ones.
_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

KV_CACHE_BYTES_PER_ELEMENT = 2
"""llama.cpp's default KV cache type is f16 (`--cache-type-k/-v f16`)."""


class GGUFError(ValueError):
    """The file is not a GGUF llama.cpp can load, or its header breaks a bound; says which and where."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int
    """From the start of the data section."""
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0]


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF header says, checked against the file."""

    path: Path
    version: int
    file_size: int
    data_offset: int
    metadata: Mapping[str, Any]
    tensors: tuple[TensorInfo, ...]
    array_lengths: Mapping[str, int] = field(default_factory=dict)
    """Length of every array value, kept or not (`tokenizer.ggml.tokens` -> vocabulary size)."""
    longest_strings: Mapping[str, int] = field(default_factory=dict)
    """Bytes of the longest string of every string array (the longest token of the vocabulary)."""

    @property
    def max_token_bytes(self) -> int | None:
        """The longest token's text in bytes: no token covers more bytes of a prompt than its own
        text has, so a prompt of N bytes has at least N / this many tokens."""
        most = self.longest_strings.get("tokenizer.ggml.tokens")
        return most if most else None

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture") or "")

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or "")

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def parameters(self) -> int:
        total = 0
        for t in self.tensors:
            n = 1
            for d in t.shape:
                n *= d
            total += n
        return total

    def arch_value(self, key: str) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}")

    @property
    def context_length(self) -> int | None:
        value = self.arch_value("context_length")
        return int(value) if isinstance(value, int) and value > 0 else None

    @property
    def quantization(self) -> str:
        """`general.file_type` as llama.cpp names it (q8_0, f16, q4_k_m...), else the tensor type holding most bytes."""
        file_type = self.metadata.get("general.file_type")
        if isinstance(file_type, int) and file_type in FILE_TYPES:
            return FILE_TYPES[file_type]
        by_type: Counter[str] = Counter()
        for t in self.tensors:
            if len(t.shape) > 1:
                by_type[t.type_name.lower()] += t.nbytes
        return by_type.most_common(1)[0][0] if by_type else "unknown"

    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per token of context, from the attention shape (f16 cache, all layers).

        Raises GGUFError when the header lacks the shape (llama.cpp would not load it either).
        """
        layers = self.arch_value("block_count")
        embed = self.arch_value("embedding_length")
        heads = self.arch_value("attention.head_count")
        if not isinstance(layers, int) or layers <= 0:
            raise GGUFError(f"{self.path}: no {self.architecture}.block_count in the metadata")
        per_layer_kv = _per_layer(self.arch_value("attention.head_count_kv"), layers) or _per_layer(heads, layers)
        head_counts = _per_layer(heads, layers)
        if per_layer_kv is None or head_counts is None or not isinstance(embed, int) or embed <= 0:
            raise GGUFError(f"{self.path}: the attention shape ({self.architecture}.embedding_length, "
                            f"attention.head_count[_kv]) is missing or not positive")
        total = 0
        for layer in range(layers):
            head_dim = embed // head_counts[layer] if head_counts[layer] else 0
            k = self.arch_value("attention.key_length")
            v = self.arch_value("attention.value_length")
            k_dim = k if isinstance(k, int) and k > 0 else head_dim
            v_dim = v if isinstance(v, int) and v > 0 else head_dim
            total += per_layer_kv[layer] * (k_dim + v_dim)
        return total * KV_CACHE_BYTES_PER_ELEMENT

    def summary(self) -> dict[str, Any]:
        """The facts a registry entry and the admin view carry."""
        return {"architecture": self.architecture, "context_length": self.context_length,
                "quantization": self.quantization, "tensor_bytes": self.tensor_bytes,
                "parameters": self.parameters, "tensors": len(self.tensors), "gguf_version": self.version,
                "file_size": self.file_size}


def _per_layer(value: Any, layers: int) -> list[int] | None:
    if isinstance(value, int) and value > 0:
        return [value] * layers
    if isinstance(value, list) and len(value) == layers and all(isinstance(v, int) and v >= 0 for v in value):
        return list(value)
    return None


class _Reader:
    """Reads little-endian values from a file, never past its end."""

    def __init__(self, fh: BinaryIO, size: int, path: Path) -> None:
        self.fh = fh
        self.size = size
        self.path = path
        self.pos = 0

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: not a usable GGUF file: {what} (at byte {self.pos} of {self.size})")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes, the file ends first")
        data = self.fh.read(n)
        if len(data) != n:
            raise self.fail(f"short read of {what}")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes, the file ends first")
        self.fh.seek(n, os.SEEK_CUR)
        self.pos += n

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def u32(self, what: str) -> int:
        return int(self.scalar("<I", what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<Q", what))

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> str:
        length = self.u64(f"length of {what}")
        if length > limit:
            raise self.fail(f"{what} is {length} bytes long, over the limit of {limit}")
        raw = self.take(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def skip_string(self, what: str) -> int:
        length = self.u64(f"length of {what}")
        if length > MAX_STRING_BYTES:
            raise self.fail(f"{what} is {length} bytes long, over the limit of {MAX_STRING_BYTES}")
        self.skip(length, what)
        return length


def _value(r: _Reader, vtype: int, key: str, lengths: dict[str, int], longest: dict[str, int], *,
           in_array: bool = False) -> Any:
    if vtype in _SCALARS:
        return r.scalar(_SCALARS[vtype], f"value of {key!r}")
    if vtype == _STRING:
        return r.string(f"value of {key!r}")
    if vtype == _ARRAY:
        if in_array:
            raise r.fail(f"{key!r} is an array of arrays, which llama.cpp does not read")
        etype = r.u32(f"element type of {key!r}")
        count = r.u64(f"length of {key!r}")
        if etype in _SCALARS:
            width = struct.calcsize(_SCALARS[etype])
            if count > (r.size - r.pos) // width:
                raise r.fail(f"{key!r} claims {count} elements, more than the rest of the file holds")
        elif etype == _STRING:
            if count > (r.size - r.pos) // 8:
                raise r.fail(f"{key!r} claims {count} strings, more than the rest of the file holds")
        else:
            raise r.fail(f"{key!r} has unknown element type {etype}")
        lengths[key] = count
        if count > (KEEP_ARRAY_ITEMS if etype == _STRING else KEEP_NUMBER_ITEMS):
            if etype == _STRING:
                most = 0
                for i in range(count):
                    most = max(most, r.skip_string(f"{key}[{i}]"))
                longest[key] = most
            else:
                r.skip(count * struct.calcsize(_SCALARS[etype]), f"elements of {key!r}")
            return None
        items = [_value(r, etype, key, lengths, longest, in_array=True) for _ in range(count)]
        if etype == _STRING:
            longest[key] = max((len(v.encode()) for v in items), default=0)
        return items
    raise r.fail(f"{key!r} has unknown value type {vtype}")


def _tensor_bytes(r: _Reader, name: str, shape: tuple[int, ...], type_id: int) -> int:
    if type_id not in GGML_TYPES:
        raise r.fail(f"tensor {name!r} has unknown type {type_id}")
    _, block, type_size = GGML_TYPES[type_id]
    elements = 1
    for d in shape:
        elements *= d
        if elements > r.size * 64:  # no quantization packs 64 elements in a byte
            raise r.fail(f"tensor {name!r} shape {shape} is larger than the file could hold")
    if shape and shape[0] % block:
        raise r.fail(f"tensor {name!r} first dimension {shape[0]} is not a multiple of its block size {block}")
    return elements // block * type_size


def read_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read and check a GGUF file's header; raises GGUFError with the reason when it is not usable."""
    path = Path(path)
    try:
        size = path.stat().st_size
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with fh:
        r = _Reader(fh, size, path)
        if size < 4 or fh.read(4) != MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (no GGUF magic at its start)")
        r.pos = 4
        version = r.u32("version")
        if version not in SUPPORTED_VERSIONS:
            raise r.fail(f"GGUF version {version} is not supported (supported: {SUPPORTED_VERSIONS})")
        n_tensors = r.u64("tensor count")
        n_kv = r.u64("metadata count")
        if n_tensors > MAX_TENSORS or n_tensors > size // 24:
            raise r.fail(f"tensor count {n_tensors} is impossible for a file of {size} bytes")
        if n_kv > MAX_KV or n_kv > size // 13:
            raise r.fail(f"metadata count {n_kv} is impossible for a file of {size} bytes")
        metadata: dict[str, Any] = {}
        lengths: dict[str, int] = {}
        longest: dict[str, int] = {}
        for i in range(n_kv):
            key = r.string(f"metadata key #{i}", MAX_KEY_BYTES)
            if key in metadata:
                raise r.fail(f"metadata key {key!r} appears twice")
            vtype = r.u32(f"type of {key!r}")
            metadata[key] = _value(r, vtype, key, lengths, longest)
        raw: list[tuple[str, tuple[int, ...], int, int]] = []
        names: set[str] = set()
        for i in range(n_tensors):
            name = r.string(f"name of tensor #{i}", MAX_NAME_BYTES)
            if name in names:
                raise r.fail(f"tensor {name!r} appears twice")
            names.add(name)
            n_dims = r.u32(f"dimension count of {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise r.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
            shape = tuple(r.u64(f"dimension of {name!r}") for _ in range(n_dims))
            if any(d == 0 for d in shape):
                raise r.fail(f"tensor {name!r} has an empty dimension {shape}")
            type_id = r.u32(f"type of {name!r}")
            offset = r.u64(f"offset of {name!r}")
            raw.append((name, shape, type_id, offset))
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 2**20:
            raise r.fail(f"general.alignment {alignment!r} is not a power of two up to 1 MiB")
        data_offset = (r.pos + alignment - 1) // alignment * alignment
        tensors = []
        for name, shape, type_id, offset in raw:
            nbytes = _tensor_bytes(r, name, shape, type_id)
            if offset % alignment:
                raise r.fail(f"tensor {name!r} offset {offset} is not aligned to {alignment}")
            if data_offset + offset + nbytes > size:
                raise GGUFError(f"{path}: tensor {name!r} ({nbytes} bytes at data offset {offset}) ends past the "
                                f"end of the file ({size} bytes): truncated or corrupt")
            tensors.append(TensorInfo(name, shape, type_id, offset, nbytes))
        _check_overlaps(path, tensors)
    info = GGUFInfo(path=path, version=version, file_size=size, data_offset=data_offset, metadata=metadata,
                    tensors=tuple(tensors), array_lengths=lengths, longest_strings=longest)
    if not info.architecture:
        raise GGUFError(f"{path}: no general.architecture in the metadata")
    return info


def _check_overlaps(path: Path, tensors: list[TensorInfo]) -> None:
    ordered = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.offset + a.nbytes > b.offset:
            raise GGUFError(f"{path}: tensors {a.name!r} and {b.name!r} overlap in the data section")


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a file starting with the GGUF magic (cheap: four bytes)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False
