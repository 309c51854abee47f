"""The contract between a ClearML model entry and a servable `ModelSpec`.

The register task writes these keys and the registry catalog reads them: keeping both
sides here means a key cannot drift between writer and reader. Metadata values travel as
strings (ClearML stores `{"key", "value", "type"}` triples), so every numeric field is
parsed and validated here, and every failure names the model ID and the field so that an
operator can fix the entry in the web UI.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from clearml_umem.spec import ENGINE_DECLARED, KNOWN_DTYPES, KNOWN_ENGINES, ModelSpec, SpecError

SERVABLE_TAG = "umem-servable"
"""The one tag that marks a model entry as meant for this plugin; the default selector."""

KEY_SIZE_BYTES = "size_bytes"
KEY_DTYPE = "dtype"
KEY_ARCHITECTURE = "architecture"
KEY_PARAMETERS = "parameters"
KEY_CONTEXT_LENGTH = "context_length"
KEY_ENGINE = "engine"
KEY_QUANTIZATION = "quantization"
KEY_LAYOUT = "weights_layout"
KEY_SERVE_NAME = "serve_name"

METADATA_TYPES: dict[str, str] = {
    KEY_SIZE_BYTES: "int",
    KEY_DTYPE: "str",
    KEY_ARCHITECTURE: "str",
    KEY_PARAMETERS: "int",
    KEY_CONTEXT_LENGTH: "int",
    KEY_ENGINE: "str",
    KEY_QUANTIZATION: "str",
    KEY_LAYOUT: "str",
    KEY_SERVE_NAME: "str",
}

LAYOUT_FOLDER = "folder"
LAYOUT_ARCHIVE = "archive"
LAYOUT_FILE = "file"
KNOWN_LAYOUTS = (LAYOUT_FOLDER, LAYOUT_ARCHIVE, LAYOUT_FILE)

CONFIG_SECTION = "umem"
"""Key of the copy of the metadata kept in the model's configuration (design).

ClearML offline mode drops model metadata (it has no offline path for
`models.add_or_update_metadata`) but keeps the configuration, so an offline session
imported into a server later still yields a servable entry.
"""

EXTRA_ENGINE_DECLARED = ENGINE_DECLARED

FRAMEWORKS_ACCEPTED = ("pytorch", "huggingface", "transformers", "safetensors", "vllm", "custom")
"""Frameworks an LLM is usually registered under; another one (TensorFlow, Keras, ONNX...) on an
entry whose files are a language model is logged as a contradiction, and the files win."""

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")


class ModelEntry(Protocol):
    """What the conversion reads from a ClearML `Model` / `InputModel` (or a test double)."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def url(self) -> str: ...

    @property
    def tags(self) -> list[str]: ...

    @property
    def framework(self) -> str: ...

    def get_all_metadata(self) -> dict[str, dict[str, str]]: ...


def metadata_items(values: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Values in the `{key: {"value", "type"}}` shape `Model.set_all_metadata` takes; None values are left out."""
    items: dict[str, dict[str, str]] = {}
    for key, value in values.items():
        if value is None or value == "":
            continue
        items[key] = {"value": str(value), "type": METADATA_TYPES.get(key, "str")}
    return items


def layout_for_uri(uri: str) -> str:
    """Guess how weights at `uri` are laid out when the entry does not say."""
    lowered = uri.lower().rstrip("/")
    if lowered.endswith(ARCHIVE_SUFFIXES):
        return LAYOUT_ARCHIVE
    if uri.endswith("/"):
        return LAYOUT_FOLDER
    tail = lowered.rsplit("/", 1)[-1]
    return LAYOUT_FILE if "." in tail else LAYOUT_FOLDER


def _flatten(entry_id: str, raw: Any) -> dict[str, str]:
    """ClearML metadata as plain `{key: value}` strings; a malformed container is itself an error."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SpecError(entry_id, "metadata", f"must be a mapping of metadata items, got {type(raw).__name__}")
    flat: dict[str, str] = {}
    for key, item in raw.items():
        value = item.get("value") if isinstance(item, Mapping) else item
        if value is None:
            continue
        flat[str(key)] = str(value)
    return flat


def _config_copy(model: Any) -> dict[str, str]:
    """The metadata copy kept in the model configuration, if any; unreadable configs count as none."""
    try:
        config = getattr(model, "config_dict", None)
    except Exception:  # noqa: BLE001 - a config the SDK cannot parse is the same as no config here
        return {}
    if not isinstance(config, Mapping):
        return {}
    section = config.get(CONFIG_SECTION)
    if isinstance(section, str):
        try:
            section = json.loads(section)
        except json.JSONDecodeError:
            return {}
    if not isinstance(section, Mapping):
        return {}
    return {str(k): str(v) for k, v in section.items() if v is not None}


def _int_field(entry_id: str, meta: Mapping[str, str], key: str, *, required: bool) -> int | None:
    raw = meta.get(key)
    if raw is None or raw.strip() == "":
        if required:
            raise SpecError(entry_id, f"metadata.{key}", "is required (set it when registering the model)")
        return None
    text = raw.strip()
    try:
        number = int(text)
    except ValueError:
        try:
            as_float = float(text)
        except ValueError:
            raise SpecError(entry_id, f"metadata.{key}", f"must be a positive integer, got {raw!r}") from None
        if not as_float.is_integer():
            raise SpecError(entry_id, f"metadata.{key}", f"must be a positive integer, got {raw!r}") from None
        number = int(as_float)
    if number <= 0:
        raise SpecError(entry_id, f"metadata.{key}", f"must be a positive integer, got {raw!r}")
    return number


def _choice_field(entry_id: str, meta: Mapping[str, str], key: str, known: Sequence[str], default: str) -> str:
    value = (meta.get(key) or default).strip().lower()
    if value not in known:
        raise SpecError(entry_id, f"metadata.{key}", f"unknown value {meta.get(key)!r}; known: {', '.join(known)}")
    return value


def _read(entry_id: str, model: Any, attribute: str) -> Any:
    """An attribute of the entry; the SDK fetching it lazily may fail, and that failure names the field."""
    try:
        return getattr(model, attribute)
    except Exception as exc:  # noqa: BLE001 - the SDK raises many types for a missing or broken entry
        raise SpecError(entry_id, attribute, f"cannot be read from ClearML: {exc}") from exc


def spec_from_clearml_model(model: ModelEntry, *, require_tag: bool = False) -> ModelSpec:
    """Turn one model repository entry into a spec whose `weights` is still the remote URI.

    The catalog replaces `weights` with the local copy after fetching; converting first
    means a malformed entry is reported without downloading gigabytes.
    """
    entry_id = str(_read("?", model, "id") or "?")
    try:
        name = model.name
    except Exception as exc:  # noqa: BLE001 - the first read fetches the entry: failing here means no entry
        raise SpecError(entry_id, "id", f"no readable model entry with this ID in ClearML: {exc}") from exc
    tags_raw = _read(entry_id, model, "tags") or []
    if not isinstance(tags_raw, (list, tuple)) or not all(isinstance(t, str) for t in tags_raw):
        raise SpecError(entry_id, "tags", f"must be a list of strings, got {tags_raw!r}")
    tags = tuple(tags_raw)
    if require_tag and SERVABLE_TAG not in tags:
        raise SpecError(entry_id, "tags", f"missing the {SERVABLE_TAG!r} tag that marks a model as servable")

    try:
        raw_metadata = model.get_all_metadata()
    except Exception as exc:  # noqa: BLE001 - see _read
        raise SpecError(entry_id, "metadata", f"cannot be read from ClearML: {exc}") from exc
    meta = {**_config_copy(model), **_flatten(entry_id, raw_metadata)}

    serve_name = (meta.get(KEY_SERVE_NAME) or "").strip() or (name.strip() if isinstance(name, str) else "")
    if not serve_name:
        raise SpecError(entry_id, "name", f"must be a non-empty string, got {name!r}")
    label = f"{entry_id} ({serve_name})"

    uri = _read(entry_id, model, "url")
    if not isinstance(uri, str) or not uri.strip():
        raise SpecError(label, "uri", "is empty: the entry has no weights (register it with a weights URI)")
    uri = uri.strip()

    # Not a gate: the SDK records TensorFlow for any .zip package (update_weights_package,
    # `clearml-serving model upload --path DIR` without --framework). The fetched files decide
    # (RegistryCatalog.complete_from_files); a framework that contradicts them is a warning there.
    framework = _read(entry_id, model, "framework") or ""
    if not isinstance(framework, str):
        framework = ""

    # entries registered the usual ClearML way (OutputModel, clearml-serving model upload) carry no
    # metadata: 0 means "measure the weights once fetched" (RegistryCatalog.complete_from_files)
    size = _int_field(label, meta, KEY_SIZE_BYTES, required=False) or 0
    context_length = _int_field(label, meta, KEY_CONTEXT_LENGTH, required=False)
    parameters = _int_field(label, meta, KEY_PARAMETERS, required=False)
    engine = _choice_field(label, meta, KEY_ENGINE, KNOWN_ENGINES, "transformers")
    dtype = _choice_field(label, meta, KEY_DTYPE, KNOWN_DTYPES, "auto")
    layout = _choice_field(label, meta, KEY_LAYOUT, KNOWN_LAYOUTS, layout_for_uri(uri))
    quantization = (meta.get(KEY_QUANTIZATION) or "").strip() or None
    if quantization is not None and quantization.lower() in ("none", "null"):
        quantization = None

    return ModelSpec(
        name=serve_name,
        weights=uri,
        size_bytes=size,
        dtype=dtype,
        architecture=(meta.get(KEY_ARCHITECTURE) or "").strip(),
        engine=engine,
        context_length=context_length,
        tags=tags,
        parameters=parameters,
        quantization=quantization,
        source_uri=uri,
        model_id=entry_id,
        extra={"framework": framework, KEY_LAYOUT: layout, "clearml_name": name,
               EXTRA_ENGINE_DECLARED: bool((meta.get(KEY_ENGINE) or "").strip())},
    )
