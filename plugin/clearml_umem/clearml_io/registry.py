"""The ClearML model repository as the plugin's catalog, and the way models get into it.

Registration references big weights by URI instead of zipping them into the fileserver
(a 70B model is 140 GB), and finds an existing entry before creating one, so that
re-running a register task is harmless. The catalog side converts every selected entry
on its own: one entry with broken metadata is reported and the others still serve.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

from clearml_umem.catalog import CatalogSnapshot, read_manifest
from clearml_umem.clearml_io import hub
from clearml_umem.clearml_io.archives import UnsafeArchive, extract_archive
from clearml_umem.clearml_io.metadata import (
    ARCHIVE_SUFFIXES,
    CONFIG_SECTION,
    EXTRA_ENGINE_DECLARED,
    FRAMEWORKS_ACCEPTED,
    KEY_ARCHITECTURE,
    KEY_CONTEXT_LENGTH,
    KEY_DTYPE,
    KEY_ENGINE,
    KEY_LAYOUT,
    KEY_PARAMETERS,
    KEY_QUANTIZATION,
    KEY_SERVE_NAME,
    KEY_SIZE_BYTES,
    LAYOUT_ARCHIVE,
    LAYOUT_FILE,
    LAYOUT_FOLDER,
    SERVABLE_TAG,
    layout_for_uri,
    metadata_items,
    spec_from_clearml_model,
)
from clearml_umem.gguf_file import GGUFError, is_gguf, read_gguf
from clearml_umem.spec import (
    KNOWN_DTYPES,
    KNOWN_ENGINES,
    WEIGHT_SUFFIXES,
    ModelSpec,
    SpecError,
    architecture_from_config,
    context_length_from_config,
    read_hf_config,
    weights_size,
    with_default_engine,
)
from clearml_umem.units import fmt_bytes, fmt_rate, fmt_seconds

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "clearml-umem/models"
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class RegistryUnavailable(RuntimeError):
    """The registry could not be queried at all (server down, bad credentials).

    Distinct from per-entry errors: a poller that sees it keeps serving what it had
    instead of unloading every model.
    """


# ----------------------------------------------------------------------------------------
# What a local Hugging Face directory says about itself


@dataclass(frozen=True)
class WeightsFacts:
    size_bytes: int
    dtype: str | None = None
    architecture: str | None = None
    parameters: int | None = None
    context_length: int | None = None
    quantization: str | None = None
    gguf: bool = False
    """The weights are one GGUF file: served by the llamacpp engine."""


def _gguf_facts(path: Path) -> WeightsFacts:
    """Registration facts from a GGUF header (checked with bounds: the file is untrusted input)."""
    try:
        info = read_gguf(path)
    except GGUFError as exc:
        raise SpecError(str(path), "source", str(exc)) from None
    return WeightsFacts(size_bytes=info.file_size, dtype="auto", architecture=info.architecture or None,
                        parameters=info.parameters or None, context_length=info.context_length,
                        quantization=info.quantization, gguf=True)


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: shapes and dtypes without reading the tensors."""
    with path.open("rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) != 8:
            return {}
        (length,) = struct.unpack("<Q", raw_len)
        if length > 100 * 1024 * 1024:
            return {}
        try:
            return json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}


def _count_parameters(root: Path) -> tuple[int | None, str | None]:
    """Parameter count and dominant dtype from safetensors headers; (None, None) for other formats."""
    files = [root] if root.is_file() else sorted(root.rglob("*.safetensors"))
    files = [f for f in files if f.suffix == ".safetensors"]
    if not files:
        return None, None
    total = 0
    per_dtype: dict[str, int] = {}
    for f in files:
        for key, info in _safetensors_header(f).items():
            if key == "__metadata__" or not isinstance(info, Mapping):
                continue
            count = 1
            for dim in info.get("shape") or []:
                count *= int(dim)
            total += count
            per_dtype[str(info.get("dtype"))] = per_dtype.get(str(info.get("dtype")), 0) + count
    dominant = max(per_dtype, key=per_dtype.__getitem__) if per_dtype else None
    return (total or None), SAFETENSORS_DTYPES.get(dominant or "")


def inspect_weights(path: Path) -> WeightsFacts:
    """Everything registration can learn from a local model directory (or one weights file, or a GGUF)."""
    if path.is_file() and is_gguf(path):
        return _gguf_facts(path)
    gguf = gguf_in_folder(str(path), path)
    if gguf is not None:
        return _gguf_facts(gguf)
    size = weights_size(path)
    if size <= 0:
        raise SpecError(str(path), "source", f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {path}")
    cfg = read_hf_config(path)
    architecture = architecture_from_config(cfg) or None
    parameters, st_dtype = _count_parameters(path)
    cfg_dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "").lower() or None
    dtype = cfg_dtype if cfg_dtype in KNOWN_DTYPES else st_dtype
    if parameters is None and dtype in DTYPE_BYTES:
        parameters = size // DTYPE_BYTES[dtype]
    quant = cfg.get("quantization_config")
    quantization = str(quant.get("quant_method")) if isinstance(quant, Mapping) and quant.get("quant_method") else None
    return WeightsFacts(size_bytes=size, dtype=dtype, architecture=architecture, parameters=parameters,
                        context_length=context_length_from_config(cfg), quantization=quantization)


def local_path_of(source: str) -> Path | None:
    """The local path behind `source` (a plain path or file:// URI), or None for remote URIs."""
    if source.startswith("file://"):
        return Path(unquote(urlparse(source).path))
    if "://" in source:
        return None
    return Path(source).expanduser()


# ----------------------------------------------------------------------------------------
# Registration


@dataclass
class Registration:
    """What `register_model` did; `created` is False when an existing entry was updated."""

    model_id: str | None
    name: str
    project: str
    uri: str
    tags: list[str]
    metadata: dict[str, str]
    created: bool
    offline: bool
    manifest: Path | None = None
    spec: ModelSpec | None = None


def _default_name(source: str, local: Path | None) -> str:
    if local is not None:
        resolved = local.resolve()
        return resolved.stem if resolved.suffix.lower() == ".gguf" else resolved.name
    tail = source.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (*ARCHIVE_SUFFIXES, ".gguf"):
        if tail.lower().endswith(suffix):
            return tail[: -len(suffix)]
    return tail


def _upload_archive(local: Path, name: str, project: str, destination: str) -> str:
    """Zip a model directory and upload it; zip because a ClearML fileserver cannot list folders."""
    from clearml import StorageManager

    with tempfile.TemporaryDirectory(prefix="umem-upload-") as tmp:
        archive = Path(shutil.make_archive(str(Path(tmp) / name), "zip", root_dir=local)) if local.is_dir() else local
        remote = f"{destination.rstrip('/')}/{project.strip('/')}/{name}/{archive.name}"
        log.info("uploading %s (%s) to %s", archive, fmt_bytes(archive.stat().st_size), remote)
        uploaded = StorageManager.upload_file(local_file=str(archive), remote_url=remote, wait_for_upload=True)
    if not uploaded:
        raise RuntimeError(f"upload of {local} to {remote} failed")
    return str(uploaded)


def _upload_destination(upload_uri: str | None, task: Any) -> str:
    if upload_uri:
        return upload_uri
    if task is not None and getattr(task, "output_uri", None):
        return str(task.output_uri)
    from clearml import StorageManager

    files_server = StorageManager.get_files_server()
    if not files_server:
        raise ValueError("upload requested but no destination: pass upload_uri (s3://, gs://, file://...)")
    return files_server


def _find_existing(uri: str, name: str, project: str) -> tuple[Any, str] | tuple[None, str]:
    """An entry of `project` to update instead of creating a duplicate: same weights URI, else same name.

    Scoped to the project: the same weights registered into another project are a
    separate catalog entry on purpose (another team's selection, other tags).
    """
    import re

    from clearml import Model
    from clearml.backend_api.session.client import APIClient

    client = APIClient()
    projects = client.projects.get_all(name=f"^{re.escape(project)}$", only_fields=["id", "name"])
    if not projects:
        return None, ""
    by_uri = client.models.get_all(uri=[uri], project=[projects[0].id], only_fields=["id", "name", "created"],
                                   system_tags=["-archived"], order_by=["-created"])
    if by_uri:
        return Model(model_id=by_uri[0].id), "uri"
    by_name = Model.query_models(project_name=project, model_name=name)
    if by_name:
        return by_name[0], "name"
    return None, ""


def register_model(
    source: str,
    *,
    name: str | None = None,
    project: str = DEFAULT_PROJECT,
    tags: Sequence[str] = (),
    engine: str | None = None,
    dtype: str | None = None,
    architecture: str | None = None,
    parameters: int | None = None,
    context_length: int | None = None,
    quantization: str | None = None,
    size_bytes: int | None = None,
    serve_name: str | None = None,
    upload: bool = False,
    upload_uri: str | None = None,
    framework: str = "PyTorch",
    comment: str | None = None,
    task: Any = None,
    manifest: str | Path | None = None,
) -> Registration:
    """Register (or update) one LLM in the ClearML model repository and/or a local manifest.

    `source` is a local Hugging Face directory or a weights URI. Facts readable from a
    local directory (size, dtype, architecture, parameters, context length) are filled
    in; explicit arguments win. Online, the entry with the same URI (or the same name in
    the same project) is updated rather than duplicated. Offline, the SDK cannot write
    model metadata, so the entry is recorded as the task's output model with the metadata
    in its configuration, and the manifest (when given) is the catalog to serve from.
    """
    from clearml import OutputModel, Task
    from clearml.utilities.config import config_dict_to_text

    engine = (engine or "").strip().lower()
    if engine and engine not in KNOWN_ENGINES:
        raise SpecError(name or source, "engine", f"unknown engine {engine!r}; known: {', '.join(KNOWN_ENGINES)}")
    hub_snapshot: Path | None = None
    if hub.is_hub_uri(source):
        try:
            hub_snapshot = hub.fetch(source)
        except hub.HubError as exc:
            raise SpecError(name or source, "source", str(exc)) from None
        name = name or hub.parse(source).name
    local = local_path_of(source) if hub_snapshot is None else None
    if local is not None and not local.exists():
        raise SpecError(name or source, "source", f"path does not exist: {local}")
    inspected = local if local is not None else hub_snapshot
    facts = inspect_weights(inspected) if inspected is not None else None
    name = name or _default_name(source, local)
    if not name:
        raise SpecError(source, "name", "cannot derive a model name from the source; pass one")
    if facts is not None and facts.gguf:
        if engine not in ("", "llamacpp"):
            raise SpecError(name, "engine", f"{source} is a GGUF file, which engine 'llamacpp' serves, not {engine!r}")
        if quantization and quantization.lower() != facts.quantization:
            raise SpecError(name, "quantization", f"says {quantization!r} but the file is {facts.quantization!r}")
        engine = "llamacpp"
    engine = engine or "transformers"

    dtype = (dtype or (facts.dtype if facts else None) or "auto").strip().lower()
    if dtype not in KNOWN_DTYPES:
        raise SpecError(name, "dtype", f"unknown dtype {dtype!r}; known: {', '.join(KNOWN_DTYPES)}")
    size = size_bytes or (facts.size_bytes if facts else None)
    if not size or size <= 0:
        raise SpecError(name, "size_bytes", "is required when the weights are not local (pass size_bytes)")

    if local is not None and upload:
        uri = _upload_archive(local.resolve(), name, project, _upload_destination(upload_uri, task))
        layout = LAYOUT_ARCHIVE
    elif local is not None:
        resolved = local.resolve()
        uri = resolved.as_uri()
        layout = LAYOUT_FOLDER if resolved.is_dir() else (
            LAYOUT_ARCHIVE if resolved.name.lower().endswith(ARCHIVE_SUFFIXES) else LAYOUT_FILE)
    elif hub_snapshot is not None:
        # pinned to the commit read: what is served cannot drift when the branch moves
        uri = hub.pinned(source, hub_snapshot)
        layout = LAYOUT_FILE if hub_snapshot.is_file() else LAYOUT_FOLDER
    else:
        uri = source
        layout = layout_for_uri(source)

    metadata: dict[str, Any] = {
        KEY_SIZE_BYTES: size,
        KEY_DTYPE: dtype,
        KEY_ARCHITECTURE: architecture or (facts.architecture if facts else None),
        KEY_PARAMETERS: parameters or (facts.parameters if facts else None),
        KEY_CONTEXT_LENGTH: context_length or (facts.context_length if facts else None),
        KEY_ENGINE: engine,
        KEY_QUANTIZATION: quantization or (facts.quantization if facts else None),
        KEY_LAYOUT: layout,
        KEY_SERVE_NAME: serve_name,
    }
    metadata = {k: str(v) for k, v in metadata.items() if v not in (None, "")}
    all_tags = list(dict.fromkeys([SERVABLE_TAG, *[t.strip() for t in tags if t and t.strip()]]))
    config = {CONFIG_SECTION: metadata}
    offline = bool(Task.is_offline())

    model_id: str | None = None
    created = True
    if offline:
        if task is not None:
            out = OutputModel(task=task, name=name, tags=all_tags, framework=framework, comment=comment,
                              config_dict=config)
            # clearml 2.1.12: offline, update_weights() reads `published`, i.e. `.locked` of the
            # not-yet-created (dummy) model, which lacks it. Give it the value a new model has.
            floating = out._get_base_model()
            if floating is not None and not hasattr(floating, "locked"):
                floating.update(locked=False)
            out.update_weights(register_uri=uri)
            model_id = out.id
        elif manifest is None:
            raise ValueError("offline with no task and no manifest: there is nowhere to register the model")
    else:
        existing, matched_by = _find_existing(uri, name, project)
        if existing is not None:
            created = False
            log.info("model %s already registered (%s, matched by %s): updating it", name, existing.id, matched_by)
            # The SDK exposes no public setter for an entry's URI or framework; its backend model's
            # update() is what the SDK's own setters call.
            # merged, never replaced: tags others put on the entry (a team's, a stage's) stay
            all_tags = list(dict.fromkeys([*(existing.tags or []), *all_tags]))
            existing._get_base_model().update(uri=uri, tags=all_tags, framework=framework, comment=comment,
                                              design=config_dict_to_text(config),
                                              task_id=task.id if task is not None else None)
            model = existing
        else:
            model = _create_entry(uri, name, project, all_tags, comment, framework, config,
                                  task_id=task.id if task is not None else None)
        model.set_all_metadata(metadata_items(metadata), replace=False)
        model_id = model.id
        if task is not None:
            _list_as_output_model(task, model_id, name)

    spec = ModelSpec(
        name=serve_name or name,
        weights=str(local.resolve()) if local is not None and not upload else uri,
        size_bytes=size,
        dtype=dtype,
        architecture=metadata.get(KEY_ARCHITECTURE, ""),
        engine=engine,
        context_length=int(metadata[KEY_CONTEXT_LENGTH]) if KEY_CONTEXT_LENGTH in metadata else None,
        tags=tuple(all_tags),
        parameters=int(metadata[KEY_PARAMETERS]) if KEY_PARAMETERS in metadata else None,
        quantization=metadata.get(KEY_QUANTIZATION),
        source_uri=uri,
        model_id=model_id,
    )
    manifest_path = Path(manifest).expanduser().resolve() if manifest else None
    if manifest_path is not None:
        upsert_manifest_entry(manifest_path, spec)
    return Registration(model_id=model_id, name=name, project=project, uri=uri, tags=all_tags, metadata=metadata,
                        created=created, offline=offline, manifest=manifest_path, spec=spec)


def _list_as_output_model(task: Any, model_id: str, name: str) -> None:
    """The register task lists the entry among its output models (offline, OutputModel does it).
    The SDK's only way to add an existing model to a task is the server call it makes itself."""
    from clearml.backend_api.services import tasks

    try:
        task.send(tasks.AddOrUpdateModelRequest(task=task.id, name=name, model=model_id, type="output"))
    except Exception:  # noqa: BLE001 - lineage is a view; the entry is registered either way
        log.warning("could not list model %s as an output model of task %s", model_id, task.id, exc_info=True)


def _create_entry(uri: str, name: str, project: str, tags: list[str], comment: str | None, framework: str,
                  config: dict[str, Any], task_id: str | None = None) -> Any:
    """A new registry entry in `project`.

    Not `InputModel.import_model`: it returns any entry with the same URI, even one in
    another project, which would silently hand this project's registration to another's.
    """
    from clearml import InputModel
    from clearml.backend_interface.model import Model as BackendModel
    from clearml.backend_interface.util import get_or_create_project
    from clearml.config import get_cache_dir
    from clearml.utilities.config import config_dict_to_text

    backend = BackendModel(upload_storage_uri=None, cache_dir=get_cache_dir())
    project_id = get_or_create_project(session=backend.session, project_name=project)
    backend.update(design=config_dict_to_text(config), name=name, comment=comment, tags=tags, uri=uri,
                   framework=framework, project_id=project_id, task_id=task_id)
    return InputModel(model_id=backend.id)


def manifest_entry(spec: ModelSpec) -> dict[str, Any]:
    """A manifest entry that `ManifestCatalog` reads back to `spec` (model_id and source included)."""
    entry: dict[str, Any] = {"name": spec.name, "weights": spec.weights, "engine": spec.engine, "dtype": spec.dtype,
                             "size_bytes": spec.size_bytes}
    optional = {"architecture": spec.architecture, "context_length": spec.context_length,
                "parameters": spec.parameters, "quantization": spec.quantization,
                "tags": list(spec.tags), "source_uri": spec.source_uri, "model_id": spec.model_id}
    entry.update({k: v for k, v in optional.items() if v})
    return entry


def upsert_manifest_entry(path: Path, spec: ModelSpec) -> None:
    """Add `spec` to a manifest, replacing the entry with the same name; other entries are kept verbatim.

    Written atomically: a serving process may re-read the file at any moment.
    """
    entries = read_manifest(path) if path.exists() else []
    new = manifest_entry(spec)
    replaced = False
    for index, raw in enumerate(entries):
        if isinstance(raw, Mapping) and raw.get("name") == spec.name:
            entries[index] = new
            replaced = True
    if not replaced:
        entries.append(new)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (json.dumps({"models": entries}, indent=2) if path.suffix == ".json"
            else yaml.safe_dump({"models": entries}, sort_keys=False))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# The catalog


@dataclass(frozen=True)
class RegistrySelector:
    """Which registry entries to serve. IDs, when given, are taken as-is (no other filter).

    A project, a name or tags select on their own: entries registered the usual ClearML way
    (`OutputModel`, `clearml-serving model upload`) carry no tag of ours. Only a selector that
    names nothing at all falls back to every non-archived entry tagged servable, across
    projects, so that an empty selector never serves a whole server's models.
    """

    project: str | None = None
    name: str | None = None
    tags: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()
    only_published: bool = False
    max_results: int | None = None

    @property
    def query_tags(self) -> tuple[str, ...]:
        """The tags the query filters on: the servable tag only when nothing else selects."""
        if self.tags or self.project or self.name:
            return self.tags
        return (SERVABLE_TAG,)

    @classmethod
    def from_strings(cls, project: str = "", name: str = "", tags: str = "", ids: str = "",
                     only_published: bool = False) -> RegistrySelector:
        """From comma-separated task hyperparameters, the form the web UI edits."""
        split = lambda text: tuple(p.strip() for p in (text or "").split(",") if p.strip())  # noqa: E731
        return cls(project=project or None, name=name or None, tags=split(tags), ids=split(ids),
                   only_published=only_published)

    def describe(self) -> str:
        if self.ids:
            return f"ids={','.join(self.ids)}"
        parts = [f"project={self.project}" if self.project else "",
                 f"name={self.name}" if self.name else "",
                 f"tags={','.join(self.query_tags)}" if self.query_tags else "",
                 "published only" if self.only_published else ""]
        return " ".join(p for p in parts if p) or "all models"


@dataclass
class RegistryCatalog:
    """Servable models selected from the ClearML model repository, fetched to a local cache.

    `fetch_weights=False` converts without downloading (validation, listing). Fetched
    paths are remembered per (model ID, URI) so polling does not touch storage again
    until an entry's weights change.
    """

    selector: RegistrySelector = field(default_factory=RegistrySelector)
    cache_dir: Path | None = None
    fetch_weights: bool = True
    progress_chunk_mb: int = 64
    default_engine: str = "transformers"
    """The engine of entries that name none and are no GGUF (the serve setting `engine`, resolved)."""
    _fetched: dict[tuple[str, str], str] = field(default_factory=dict, init=False, repr=False)
    _client: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir).expanduser()

    @classmethod
    def from_config(cls, config: Any) -> RegistryCatalog:
        """From a `ServeConfig`: its clearml_* selector, weights cached under its work dir."""
        selector = RegistrySelector(project=config.clearml_project or None, name=config.clearml_name or None,
                                    tags=tuple(config.clearml_tags or ()),
                                    ids=tuple(config.clearml_ids or ()),
                                    only_published=bool(getattr(config, "clearml_published", False)))
        return cls(selector=selector, cache_dir=Path(config.work_path) / "weights",
                   default_engine=config.resolved_engine())

    def entries(self) -> tuple[list[Any], list[SpecError]]:
        """The selected entries as SDK `Model` objects, plus selector-level problems.

        Queried with `APIClient`, not `Model.query_models`: the latter turns a server error
        into an empty list, which a poller would take for "every model was removed".
        """
        import re

        from clearml import Model
        from clearml.backend_api.session.client import APIClient

        sel = self.selector
        if sel.ids:
            return [Model(model_id=i) for i in sel.ids], []
        try:
            if self._client is None:
                self._client = APIClient()
            client = self._client
            project_ids = None
            if sel.project:
                projects = client.projects.get_all(name=f"^{re.escape(sel.project)}$", only_fields=["id"])
                if not projects:
                    return [], [SpecError("selector", "project", f"no project named {sel.project!r} in the registry")]
                project_ids = [p.id for p in projects]
            found: list[str] = []
            page, page_size = 0, 500
            while True:
                batch = client.models.get_all(
                    project=project_ids, name=f"^{re.escape(sel.name)}$" if sel.name else None,
                    tags=list(sel.query_tags) or None, system_tags=["-archived"],
                    ready=True if sel.only_published else None,
                    order_by=["-created"], only_fields=["id"], page=page, page_size=page_size)
                found.extend(m.id for m in batch)
                if len(batch) < page_size or (sel.max_results and len(found) >= sel.max_results):
                    break
                page += 1
        except Exception as exc:  # noqa: BLE001 - APIError, transport and auth errors alike
            raise RegistryUnavailable(f"querying models ({sel.describe()}) failed: {exc}") from exc
        if sel.max_results:
            found = found[: sel.max_results]
        return [Model(model_id=i) for i in found], []

    def snapshot(self) -> CatalogSnapshot:
        models, errors = self.entries()
        snap = CatalogSnapshot(errors=list(errors))
        seen: dict[str, str] = {}
        for model in models:
            try:
                spec = spec_from_clearml_model(model)
                if spec.name in seen:
                    raise SpecError(spec.model_id or "?", "name",
                                    f"{spec.name!r} is already served by model {seen[spec.name]} "
                                    "(set metadata serve_name to tell them apart)")
                if self.fetch_weights:
                    spec = complete_from_files(spec.with_updates(weights=self.fetch(spec)))
                    spec = with_default_engine(spec, self.default_engine)
                elif spec.size_bytes <= 0:
                    raise SpecError(f"{spec.model_id} ({spec.name})", "metadata.size_bytes",
                                    "is not in the entry's metadata, and the weights are not fetched to measure them")
            except SpecError as exc:
                log.warning("registry entry skipped: %s", exc)
                snap.errors.append(exc)
                continue
            seen[spec.name] = spec.model_id or "?"
            snap.specs.append(spec)
        return snap

    def fetch(self, spec: ModelSpec) -> str:
        """A local path for the spec's weights, through ClearML's storage layer and cache."""
        uri = spec.source_uri or spec.weights
        key = (spec.model_id or spec.name, uri)
        cached = self._fetched.get(key)
        if cached and Path(cached).exists():
            return cached
        label = f"{spec.model_id} ({spec.name})"
        started = time.monotonic()
        log.info("fetching weights of %s (%s) from %s", spec.name, fmt_bytes(spec.size_bytes), uri)
        try:
            local = self._download(uri, str(spec.extra.get(KEY_LAYOUT) or layout_for_uri(uri)), spec)
        except SpecError:
            raise
        except UnsafeArchive as exc:
            raise SpecError(label, "uri", f"the weights archive at {uri} cannot be extracted safely: {exc}") from exc
        except hub.HubError as exc:
            raise SpecError(label, "uri", str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - storage drivers raise many types; report them per entry
            raise SpecError(label, "uri", f"weights could not be fetched from {uri}: {exc}") from exc
        if local is None or not Path(local).exists():
            raise SpecError(label, "uri", f"weights could not be fetched from {uri}")
        elapsed = time.monotonic() - started
        log.info("weights of %s ready at %s after %s (%s)", spec.name, local, fmt_seconds(elapsed),
                 fmt_rate(spec.size_bytes / elapsed if elapsed > 0 else None))
        self._fetched[key] = str(local)
        return str(local)

    def _download(self, uri: str, layout: str, spec: ModelSpec) -> str | None:
        from clearml import StorageManager

        if hub.is_hub_uri(uri):
            return str(hub.fetch(uri))
        StorageManager.set_report_download_chunk_size(self.progress_chunk_mb)
        local_path = local_path_of(uri)
        if layout == LAYOUT_FOLDER:
            if local_path is not None:
                return StorageManager.get_local_copy(local_path.as_uri())
            target = (self.cache_dir or _default_cache()) / "models" / (spec.model_id or spec.name)
            folder = StorageManager.download_folder(uri, local_folder=str(target))
            return str(_model_root(Path(folder))) if folder else None
        if layout == LAYOUT_ARCHIVE:
            # downloaded as a file and extracted here: the SDK's extraction can be escaped (archives.py)
            archive = StorageManager.get_local_copy(uri, extract_archive=False)
            if not archive:
                return None
            digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
            target = (self.cache_dir or _default_cache()) / "models" / f"{spec.model_id or spec.name}-{digest}"
            done = target / EXTRACTED_MARKER
            if not done.exists():
                if target.exists():
                    shutil.rmtree(target)
                extract_archive(Path(archive), target)
                done.touch()
            return str(_model_root(target))
        return StorageManager.get_local_copy(uri, extract_archive=False)


def gguf_in_folder(label: str, folder: Path) -> Path | None:
    """The one GGUF file a folder holds when it holds no Hugging Face weights (a GGUF repository
    from the Hub, an archive of one GGUF); None for a Hugging Face folder. Several GGUF files
    (one per quantization, as many repositories hold) must be told apart by naming one."""
    if not folder.is_dir() or weights_size(folder) > 0:
        return None
    found = sorted(p for p in folder.rglob("*.gguf") if p.is_file())
    if len(found) > 1:
        names = ", ".join(p.relative_to(folder).as_posix() for p in found[:8])
        raise SpecError(label, "uri", f"holds {len(found)} GGUF files ({names}); name one: "
                                      f"hf://org/name/<file>.gguf, or a URI of that file")
    return found[0] if found else None


def complete_from_files(spec: ModelSpec) -> ModelSpec:
    """Decide from the fetched files what the entry is, and fill what its metadata left out.

    A Hugging Face folder (weights, config.json) or a GGUF file is a language model, whatever
    framework the entry records: the SDK records TensorFlow for any .zip package, so that
    field is only checked against the files, and a contradiction is logged, not refused.
    Size comes from the weight files, architecture and context length from config.json or
    the GGUF header; only what cannot be known is an error.
    """
    label = f"{spec.model_id} ({spec.name})"
    local = Path(spec.weights)
    changes: dict[str, Any] = {}
    try:
        gguf = local if local.is_file() and is_gguf(local) else gguf_in_folder(label, local)
        size = weights_size(local) if gguf is None else gguf.stat().st_size
    except ValueError as exc:
        if isinstance(exc, SpecError):
            raise
        raise SpecError(label, "uri", f"the fetched weights cannot be read: {exc}") from None
    if gguf is None and size <= 0:
        raise SpecError(label, "uri", f"the fetched files are not a language model this plugin serves: no Hugging "
                                      f"Face weights ({', '.join(WEIGHT_SUFFIXES)}) and no GGUF file under {local}")
    framework = str(spec.extra.get("framework") or "")
    if framework and framework.strip().lower() not in FRAMEWORKS_ACCEPTED:
        log.warning("model entry %s records framework %r, but its files are a %s: served as such", label, framework,
                    "GGUF file" if gguf is not None else "Hugging Face model")
    if spec.size_bytes <= 0:
        changes["size_bytes"] = size
    if gguf is not None:
        declared = bool(spec.extra.get(EXTRA_ENGINE_DECLARED, True))
        if spec.engine != "llamacpp" and declared:
            raise SpecError(label, "metadata.engine", f"the weights are a GGUF file, which engine 'llamacpp' "
                                                      f"serves, not {spec.engine!r}")
        try:
            info = read_gguf(gguf)
        except GGUFError as exc:
            raise SpecError(label, "uri", f"the fetched weights are not a usable GGUF: {exc}") from None
        if spec.quantization and spec.quantization.lower() != info.quantization:
            raise SpecError(label, "metadata.quantization", f"says {spec.quantization!r} but the fetched file is "
                                                            f"{info.quantization!r} (from its header)")
        changes.update({k: v for k, v in (("size_bytes", info.file_size), ("architecture", info.architecture),
                                          ("context_length", info.context_length),
                                          ("quantization", info.quantization)) if not getattr(spec, k)})
        changes.update(engine="llamacpp", weights=str(gguf))
        return spec.with_updates(**changes)
    if spec.engine == "llamacpp":
        raise SpecError(label, "metadata.engine", f"engine 'llamacpp' serves GGUF files, and {local} holds none")
    cfg = read_hf_config(local)
    if not spec.architecture and cfg:
        changes["architecture"] = architecture_from_config(cfg)
    if spec.context_length is None and cfg:
        changes["context_length"] = context_length_from_config(cfg)
    return spec.with_updates(**changes) if changes else spec


EXTRACTED_MARKER = ".umem-extracted"
"""Written once an archive is fully extracted, so a half-extracted folder is never reused."""


def _default_cache() -> Path:
    from clearml.config import get_cache_dir

    return Path(get_cache_dir()) / "umem"


def _model_root(folder: Path) -> Path:
    """The directory holding the model inside a download (archives often wrap it in one more folder)."""
    if not folder.is_dir():
        return folder
    candidates = sorted((p.parent for p in folder.rglob("config.json")), key=lambda p: len(p.parts))
    if candidates:
        return candidates[0]
    weights = sorted((p.parent for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES), key=lambda p: len(p.parts))
    return weights[0] if weights else folder
