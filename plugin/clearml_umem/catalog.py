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

from clearml_umem.spec import ModelSpec, SpecError, spec_from_mapping


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


def read_manifest(path: Path) -> list[Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ManifestError(f"manifest {path} is not valid {kind}: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("models")
    if not isinstance(data, list):
        raise ManifestError(f"manifest {path} must be a list of models or a mapping with a 'models' list")
    return data


class ManifestCatalog:
    """A YAML or JSON file listing models; relative weight paths are relative to the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()

    def snapshot(self) -> CatalogSnapshot:
        entries = read_manifest(self.path)
        snap = CatalogSnapshot()
        seen: set[str] = set()
        for index, raw in enumerate(entries):
            label = f"#{index}" if not isinstance(raw, dict) or not raw.get("name") else str(raw["name"])
            try:
                spec = spec_from_mapping(raw, entry=label, base_dir=self.path.parent)
            except SpecError as exc:
                snap.errors.append(exc)
                continue
            if spec.name in seen:
                snap.errors.append(SpecError(label, "name", f"duplicate model name {spec.name!r} in {self.path}"))
                continue
            seen.add(spec.name)
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
        if s.keep_alive is not None:
            entry["keep_alive"] = "never" if math.isinf(s.keep_alive) else s.keep_alive
        entries.append(entry)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump({"models": entries}, sort_keys=False))
    os.replace(tmp, path)
