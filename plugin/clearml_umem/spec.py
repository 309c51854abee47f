"""What the plugin needs to know about a model, whichever catalog it came from."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from clearml_umem.gguf_file import GGUFError, GGUFInfo, is_gguf, read_gguf
from clearml_umem.keep_alive import parse_keep_alive

KNOWN_ENGINES = ("transformers", "vllm", "llamacpp")
KNOWN_DTYPES = ("auto", "float32", "float16", "bfloat16")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class SpecError(ValueError):
    """A model entry that cannot be served, with the entry and the field that is wrong."""

    def __init__(self, entry: str, field_name: str, problem: str) -> None:
        self.entry = entry
        self.field = field_name
        self.problem = problem
        super().__init__(f"model entry {entry!r}: field {field_name!r}: {problem}")


@dataclass(frozen=True)
class ModelSpec:
    """One servable model.

    `weights` is a local directory in Hugging Face format once the catalog has fetched
    it; `source_uri` keeps where it came from (a ClearML model URI, s3://, ...).
    """

    name: str
    weights: str
    size_bytes: int
    dtype: str = "auto"
    architecture: str = ""
    engine: str = "transformers"
    context_length: int | None = None
    tags: tuple[str, ...] = ()
    parameters: int | None = None
    quantization: str | None = None
    source_uri: str | None = None
    model_id: str | None = None
    keep_alive: float | None = None
    """Seconds unused before the model moves down a tier (`keep_alive.NEVER`: never); None: the
    router's `--keep-alive`."""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def size_gb(self) -> float:
        return self.size_bytes / 1e9

    def with_updates(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)


MAX_SCAN_ENTRIES = 10_000
MAX_SCAN_DEPTH = 3
"""A model folder is small and shallow; `weights: /` must fail fast, not walk the whole disk."""


def weights_size(path: Path) -> int:
    """Bytes of weight files under a model directory (or of one weights file).

    Raises ValueError for a folder that cannot be read or is far larger than a model's.
    """
    if path.is_file():
        return path.stat().st_size
    total = seen = 0
    stack = [(path, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            raise ValueError(f"cannot read {folder}: {exc.strerror or exc}") from None
        for entry in entries:
            seen += 1
            if seen > MAX_SCAN_ENTRIES:
                raise ValueError(f"{path} holds more than {MAX_SCAN_ENTRIES} files and folders; point 'weights' "
                                 "at the model's own folder")
            if entry.is_dir(follow_symlinks=False):
                if depth < MAX_SCAN_DEPTH:
                    stack.append((Path(entry.path), depth + 1))
            elif entry.is_file() and Path(entry.name).suffix in WEIGHT_SUFFIXES:
                total += entry.stat().st_size
    return total


def read_hf_config(path: Path) -> dict[str, Any]:
    """The model's config.json, or {} when there is none (weights given as one file)."""
    cfg = path / "config.json"
    if not path.is_dir() or not cfg.is_file():
        return {}
    try:
        return json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def architecture_from_config(cfg: Mapping[str, Any]) -> str:
    """The model class in config.json (its first `architectures` entry), else its `model_type`; "" if neither."""
    archs = cfg.get("architectures") or []
    return str(archs[0]) if archs else str(cfg.get("model_type") or "")


def context_length_from_config(cfg: Mapping[str, Any]) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = cfg.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _gguf_facts(label: str, path: Path, engine: str, quantization: str | None) -> GGUFInfo:
    """A GGUF file's header, checked: served by llamacpp only, the declared quantization is the file's."""
    if engine != "llamacpp":
        raise SpecError(label, "engine", f"{path} is a GGUF file, which engine 'llamacpp' serves, not {engine!r}")
    if not path.is_file():
        raise SpecError(label, "weights", f"engine 'llamacpp' takes one .gguf file, and {path} is not a file")
    try:
        info = read_gguf(path)
    except GGUFError as exc:
        raise SpecError(label, "weights", str(exc)) from None
    if quantization and quantization.lower() != info.quantization:
        raise SpecError(label, "quantization", f"says {quantization!r} but {path.name} is {info.quantization!r} "
                                               "(from its header)")
    return info


def _require_str(entry: str, data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if value is None:
        raise SpecError(entry, key, "is required")
    if not isinstance(value, str) or not value.strip():
        raise SpecError(entry, key, f"must be a non-empty string, got {value!r}")
    return value.strip()


def _optional_positive_int(entry: str, data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SpecError(entry, key, f"must be a positive integer, got {value!r}")
    try:
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
    except ValueError:
        number = None
    if number is None or number <= 0:
        raise SpecError(entry, key, f"must be a positive integer, got {value!r}")
    return number


def spec_from_mapping(data: Mapping[str, Any], *, entry: str | None = None, base_dir: Path | None = None,
                      resolve_local: bool = True) -> ModelSpec:
    """Build and validate a spec from a manifest entry or ClearML metadata.

    Missing size, architecture and context length are read from the weights when they are
    local, so that a manifest only needs a name and a path.
    """
    if not isinstance(data, Mapping):
        raise SpecError(entry or "?", "<entry>", f"must be a mapping, got {type(data).__name__}")
    label = entry or str(data.get("name") or "?")
    name = _require_str(label, data, "name")
    label = entry or name
    weights = _require_str(label, data, "weights")
    engine = str(data.get("engine") or "").strip().lower()
    if engine and engine not in KNOWN_ENGINES:
        raise SpecError(label, "engine", f"unknown engine {engine!r}; known: {', '.join(KNOWN_ENGINES)}")
    dtype = str(data.get("dtype") or "auto").strip().lower()
    if dtype not in KNOWN_DTYPES:
        raise SpecError(label, "dtype", f"unknown dtype {dtype!r}; known: {', '.join(KNOWN_DTYPES)}")
    tags_raw = data.get("tags") or ()
    if isinstance(tags_raw, str):
        tags_raw = [t for t in (s.strip() for s in tags_raw.split(",")) if t]
    if not isinstance(tags_raw, (list, tuple)) or not all(isinstance(t, str) for t in tags_raw):
        raise SpecError(label, "tags", f"must be a list of strings, got {tags_raw!r}")

    size = _optional_positive_int(label, data, "size_bytes")
    context_length = _optional_positive_int(label, data, "context_length")
    parameters = _optional_positive_int(label, data, "parameters")
    architecture = data.get("architecture") or ""
    if not isinstance(architecture, str):
        raise SpecError(label, "architecture", f"must be a string, got {architecture!r}")

    quantization = data.get("quantization")
    if quantization is not None and (not isinstance(quantization, str) or not quantization.strip()):
        raise SpecError(label, "quantization", f"must be a non-empty string, got {quantization!r}")
    quantization = quantization.strip() if quantization else None
    is_local = "://" not in weights or weights.startswith("file://")
    if is_local and resolve_local:
        local = Path(weights.removeprefix("file://")).expanduser()
        if not local.is_absolute() and base_dir is not None:
            local = base_dir / local
        if not local.exists():
            raise SpecError(label, "weights", f"path does not exist: {local}")
        weights = str(local.resolve())
        if not engine and is_gguf(local):
            engine = "llamacpp"
        if engine == "llamacpp" or is_gguf(local):
            gguf_facts = _gguf_facts(label, local, engine or "transformers", quantization)
            size = size or gguf_facts.file_size
            architecture = architecture or gguf_facts.architecture
            context_length = context_length or gguf_facts.context_length
            quantization = quantization or gguf_facts.quantization
            parameters = parameters or gguf_facts.parameters
        if size is None:
            try:
                size = weights_size(local)
            except ValueError as exc:
                raise SpecError(label, "weights", str(exc)) from None
            if size <= 0:
                raise SpecError(label, "weights", f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {local}")
        cfg = read_hf_config(local)
        if not architecture:
            architecture = architecture_from_config(cfg)
        if context_length is None:
            context_length = context_length_from_config(cfg)
    if size is None:
        raise SpecError(label, "size_bytes", "is required when the weights are not local")
    keep_alive = None
    if data.get("keep_alive") is not None:
        try:
            keep_alive = parse_keep_alive(data["keep_alive"])
        except ValueError as exc:
            raise SpecError(label, "keep_alive", str(exc)) from None

    return ModelSpec(
        name=name,
        weights=weights,
        size_bytes=size,
        dtype=dtype,
        architecture=architecture,
        engine=engine or "transformers",
        context_length=context_length,
        tags=tuple(tags_raw),
        parameters=parameters,
        quantization=quantization,
        source_uri=data.get("source_uri") or None,
        model_id=data.get("model_id") or None,
        keep_alive=keep_alive,
    )
