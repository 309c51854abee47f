"""Where the list of servable models comes from.

A catalog returns a snapshot: the specs it could build and the entries it could not,
so that one broken entry never stops the others from serving. The local manifest is the
embedded default (no ClearML server); the ClearML model repository is another catalog.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from clearml_umem.spec import (
    ENGINE_DECLARED,
    ModelSpec,
    SpecError,
    spec_from_mapping,
    unknown_key_problem,
    with_default_engine,
)


@dataclass
class CatalogSnapshot:
    specs: list[ModelSpec] = field(default_factory=list)
    errors: list[SpecError] = field(default_factory=list)

    def raise_first_error(self) -> None:
        if self.errors:
            raise self.errors[0]


class Catalog(Protocol):
    def snapshot(self) -> CatalogSnapshot: ...


class ManifestError(ValueError):
    """The manifest file itself is unreadable or not shaped like a manifest."""


MANIFEST_TOP_LEVEL = ("models",)
"""The keys a manifest file may have at its top level."""

SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")
"""The manifest's JSON Schema, shipped with the package for editors (see manifest_schema.py)."""


def read_manifest(path: Path) -> list[Any]:
    """The list of model entries, from a mapping whose only key is `models`.

    A bare list is refused rather than guessed at: it is what a manifest with its `models:`
    line lost looks like, and accepting it hid that typo.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ManifestError(f"manifest {path} is not valid {kind}: {exc}") from exc
    if isinstance(data, list):
        raise ManifestError(f"manifest {path} is a bare list; put the models under a 'models:' key "
                            "(models:\n  - name: ...\n    weights: ...)")
    if not isinstance(data, dict):
        raise ManifestError(f"manifest {path} must be a mapping with a 'models' list, got {type(data).__name__}")
    for key in data:
        if key not in MANIFEST_TOP_LEVEL:
            raise ManifestError(f"manifest {path}: top-level key {key!r}: "
                                + unknown_key_problem(str(key), MANIFEST_TOP_LEVEL))
    models = data.get("models")
    if not isinstance(models, list):
        raise ManifestError(f"manifest {path}: 'models' must be a list of model entries, got "
                            f"{type(models).__name__ if models is not None else 'nothing'}")
    return models


class ManifestCatalog:
    """A YAML or JSON file listing models; relative weight paths are relative to the file."""

    def __init__(self, path: str | Path, default_engine: str = "transformers") -> None:
        self.path = Path(path).expanduser().resolve()
        self.default_engine = default_engine
        """The engine of entries that name none (the serve setting `engine`, resolved)."""

    def snapshot(self) -> CatalogSnapshot:
        entries = read_manifest(self.path)
        snap = CatalogSnapshot()
        seen: dict[str, str] = {}
        for index, raw in enumerate(entries):
            label = f"#{index}" if not isinstance(raw, dict) or not raw.get("name") else str(raw["name"])
            try:
                spec = with_default_engine(spec_from_mapping(raw, entry=label, base_dir=self.path.parent),
                                           self.default_engine)
            except SpecError as exc:
                snap.errors.append(exc)
                continue
            clash = next((n for n in (spec.name, *spec.aliases) if n in seen), None)
            if clash is not None:
                field_name = "name" if clash == spec.name else "aliases"
                snap.errors.append(SpecError(label, field_name, f"{clash!r} already names model {seen[clash]!r} "
                                                                f"in {self.path}"))
                continue
            seen.update(dict.fromkeys((spec.name, *spec.aliases), spec.name))
            snap.specs.append(spec)
        return snap


def write_manifest(path: Path, specs: list[ModelSpec]) -> None:
    """Write a manifest that `ManifestCatalog` reads back to the same specs.

    Atomically (a temporary file renamed over it): a server polling the manifest must never
    read half a file, which could parse as a shorter list and drain the models cut off.
    """
    entries = []
    for s in specs:
        entry: dict[str, Any] = {"name": s.name, "weights": s.weights, "engine": s.engine, "dtype": s.dtype,
                                 "size_bytes": s.size_bytes}
        if s.architecture:
            entry["architecture"] = s.architecture
        if s.context_length:
            entry["context_length"] = s.context_length
        if s.tags:
            entry["tags"] = list(s.tags)
        if s.max_concurrency:
            entry["max_concurrency"] = s.max_concurrency
        if s.aliases:
            entry["aliases"] = list(s.aliases)
        if s.defaults:
            entry["defaults"] = dict(s.defaults)
        engine_options = {k: v for k, v in s.extra.items() if k != ENGINE_DECLARED}
        if engine_options:
            entry["engine_options"] = engine_options
        if s.keep_alive is not None:
            entry["keep_alive"] = "never" if math.isinf(s.keep_alive) else s.keep_alive
        entries.append(entry)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    header = f"# yaml-language-server: $schema={SCHEMA_FILE}\n" if path.suffix != ".json" else ""
    tmp.write_text(header + yaml.safe_dump({"models": entries}, sort_keys=False))
    os.replace(tmp, path)
