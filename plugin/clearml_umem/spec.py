"""What the plugin needs to know about a model, whichever catalog it came from."""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from clearml_umem.gguf_file import GGUFError, GGUFInfo, is_gguf, read_gguf
from clearml_umem.keep_alive import parse_keep_alive

KNOWN_ENGINES = ("transformers", "vllm", "llamacpp")
KNOWN_DTYPES = ("auto", "float32", "float16", "bfloat16")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
ENGINE_DECLARED = "engine_declared"
"""In a spec's `extra`: whether its entry named the engine (else the serve setting `engine` may choose)."""


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
    max_concurrency: int | None = None
    """At most this many requests at once (the engine's own limit still applies); None: the engine's."""
    aliases: tuple[str, ...] = ()
    """Other names a request's `model` may use for this model."""
    defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """Request settings (temperature, max_tokens...) used when a request leaves them unset."""
    keep_alive: float | None = None
    """Seconds unused before the model moves down a tier (`keep_alive.NEVER`: never); None: the
    router's `--keep-alive`."""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def size_gb(self) -> float:
        return self.size_bytes / 1e9

    def with_updates(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)


_OPTIONAL_NULL = {"type": "null"}


@dataclass(frozen=True)
class ManifestField:
    """One key a manifest entry may have: the loader's list of known keys and the shipped JSON
    Schema (`manifest_schema.py`) are both built from `MANIFEST_FIELDS`, so they cannot drift."""

    name: str
    schema: Mapping[str, Any]
    description: str
    required: bool = False


_POSITIVE_INT = {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": "^[0-9]*[1-9][0-9]*$"}]}

REQUEST_DEFAULTS: dict[str, Mapping[str, Any]] = {
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "max_tokens": {"type": "integer", "minimum": 1},
    "stop": {"anyOf": [{"type": "string"},
                       {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
    "seed": {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
}
"""Request settings a model entry may default (`defaults:`), with the bounds a request is held to."""

MANIFEST_FIELDS: tuple[ManifestField, ...] = (
    ManifestField("name", {"type": "string", "pattern": "\\S"}, 'The OpenAI "model" name requests use.', True),
    ManifestField("weights", {"type": "string", "pattern": "\\S"},
                  "A Hugging Face model folder or a .gguf file (relative to the manifest), or a URI.", True),
    ManifestField("engine", {"enum": list(KNOWN_ENGINES)},
                  "transformers, vllm, or llamacpp (implied for a .gguf file); default: the serve setting engine."),
    ManifestField("dtype", {"enum": list(KNOWN_DTYPES)}, "Weights' dtype when loaded; auto reads the config."),
    ManifestField("aliases", {"type": "array", "items": {"type": "string", "pattern": "\\S"}, "uniqueItems": True},
                  "Other names a request's model field may use for this model."),
    ManifestField("defaults", {"type": "object", "properties": REQUEST_DEFAULTS, "additionalProperties": False},
                  "Request settings used when a request leaves them unset."),
    ManifestField("max_concurrency", {"type": "integer", "minimum": 1},
                  "At most this many requests at once; the others wait in the model's queue (the engine's "
                  "own limit still applies)."),
    ManifestField("size_bytes", _POSITIVE_INT, "Bytes of weights; read from the files when local."),
    ManifestField("context_length", _POSITIVE_INT, "Tokens of context served; read from the config when absent."),
    ManifestField("parameters", _POSITIVE_INT, "Parameter count; read from the weights when absent."),
    ManifestField("architecture", {"type": "string"}, "Model class, e.g. LlamaForCausalLM; read from the config."),
    ManifestField("quantization", {"type": "string", "pattern": "\\S"},
                  "GGUF quantization, e.g. q8_0; checked against the file's header."),
    ManifestField("tags", {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}]},
                  "Labels (a list, or one comma-separated string)."),
    ManifestField("source_uri", {"type": "string"}, "Where the weights came from (a ClearML or storage URI)."),
    ManifestField("model_id", {"type": "string"}, "The ClearML model repository entry these weights belong to."),
    ManifestField("engine_options", {"type": "object"},
                  "Options for this model's engine, e.g. vLLM's tool_call_parser and vllm_args, llama.cpp's "
                  "llama_args (docs/tools-and-structured-output.md)."),
    ManifestField("keep_alive", {"anyOf": [{"type": "number"}, {"type": "string", "pattern": "\\S"}]},
                  "Unused this long, the model moves down a tier (gpu -> ram -> disk): seconds, or 30s/5m/1h, "
                  "or never; default: the router's --keep-alive."),
)

MANIFEST_KEYS = tuple(f.name for f in MANIFEST_FIELDS)


def unknown_key_problem(key: str, known: tuple[str, ...] | list[str]) -> str:
    """"unknown key; did you mean 'engine'?" (the closest known key), or the known keys when none is close."""
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; known keys: {', '.join(known)}"


def _check_keys(label: str, data: Mapping[str, Any]) -> None:
    for key in data:
        if key not in MANIFEST_KEYS:
            raise SpecError(label, str(key), unknown_key_problem(str(key), MANIFEST_KEYS))


def _optional_str(entry: str, data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise SpecError(entry, key, f"must be a string, got {value!r}")
    return value.strip() or None


def _aliases(entry: str, name: str, data: Mapping[str, Any]) -> tuple[str, ...]:
    raw = data.get("aliases")
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)) or not all(isinstance(a, str) and a.strip() for a in raw):
        raise SpecError(entry, "aliases", f"must be a list of non-empty strings, got {raw!r}")
    aliases = tuple(a.strip() for a in raw)
    for alias in aliases:
        if alias == name:
            raise SpecError(entry, "aliases", f"{alias!r} is the model's own name")
        if aliases.count(alias) > 1:
            raise SpecError(entry, "aliases", f"{alias!r} is listed twice")
    return aliases


def _number_in(entry: str, key: str, value: Any, schema: Mapping[str, Any]) -> None:
    integer = schema["type"] == "integer"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        kind = "an integer" if integer else "a number"
        raise SpecError(entry, key, f"must be {kind}, got {value!r}")
    low, high = schema["minimum"], schema.get("maximum")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise SpecError(entry, key, f"must be {bound}, got {value!r}")


def _request_defaults(entry: str, engine: str, context_length: int | None,
                      data: Mapping[str, Any]) -> dict[str, Any]:
    raw = data.get("defaults")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SpecError(entry, "defaults", f"must be a mapping of request settings, got {raw!r}")
    # engines import this module: the table of which engine takes which option is read here, late
    from clearml_umem.engines import SAMPLING_OPTIONS

    out: dict[str, Any] = {}
    for key, value in raw.items():
        field_name = f"defaults.{key}"
        if key not in REQUEST_DEFAULTS:
            raise SpecError(entry, field_name, unknown_key_problem(str(key), list(REQUEST_DEFAULTS)))
        if key == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
                raise SpecError(entry, field_name, f"must be a string or a list of up to 4 strings, got {value!r}")
        else:
            _number_in(entry, field_name, value, REQUEST_DEFAULTS[key])
        if key.endswith("_penalty") and key not in SAMPLING_OPTIONS.get(engine, frozenset()):
            takers = ", ".join(sorted(e for e, names in SAMPLING_OPTIONS.items() if key in names))
            raise SpecError(entry, field_name, f"engine {engine} does not take it; models served by {takers} do")
        if key == "max_tokens" and context_length is not None and value > context_length:
            raise SpecError(entry, field_name, f"is {value}, more than the context length ({context_length} tokens)")
        out[key] = value
    return out


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
    if isinstance(value, str):
        number = int(value) if re.fullmatch(r"[0-9]+", value) else None
    else:
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
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
    _check_keys(label, data)
    name = _require_str(label, data, "name")
    label = entry or name
    weights = _require_str(label, data, "weights")
    engine = data.get("engine") or ""
    declared = bool(engine)
    if engine and engine not in KNOWN_ENGINES:
        raise SpecError(label, "engine", f"unknown engine {engine!r}; known: {', '.join(KNOWN_ENGINES)}")
    dtype = data.get("dtype") or "auto"
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
    max_concurrency = data.get("max_concurrency")
    if max_concurrency is not None and (isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int)
                                        or max_concurrency < 1):
        raise SpecError(label, "max_concurrency", f"must be an integer of at least 1, got {max_concurrency!r}")
    aliases = _aliases(label, name, data)
    defaults = _request_defaults(label, engine or "transformers", context_length, data)

    engine_options = data.get("engine_options") or {}
    if not isinstance(engine_options, Mapping):
        raise SpecError(label, "engine_options", f"must be a mapping of engine options, got {engine_options!r}")

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
        source_uri=_optional_str(label, data, "source_uri"),
        model_id=_optional_str(label, data, "model_id"),
        max_concurrency=max_concurrency,
        aliases=aliases,
        defaults=defaults,
        keep_alive=keep_alive,
        extra={**engine_options, ENGINE_DECLARED: declared},
    )


def with_default_engine(spec: ModelSpec, engine: str) -> ModelSpec:
    """The spec served by `engine` when its entry named none and its files did not decide (a GGUF
    is llamacpp's whatever the setting): the serve setting `engine` for Hugging Face models."""
    if engine == spec.engine or spec.extra.get(ENGINE_DECLARED, True) or spec.engine != "transformers":
        return spec
    return spec.with_updates(engine=engine)
