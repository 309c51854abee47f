"""Registry entry -> ModelSpec conversion, every malformed case, and what registration reads from weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from clearml_umem.catalog import ManifestCatalog
from clearml_umem.clearml_io.metadata import (
    SERVABLE_TAG,
    layout_for_uri,
    metadata_items,
    spec_from_clearml_model,
)
from clearml_umem.clearml_io.registry import inspect_weights, upsert_manifest_entry
from clearml_umem.spec import SpecError


@dataclass
class Entry:
    """Shaped like clearml.Model for the conversion (its real counterpart is tested in test_clearml_registry)."""

    id: str = "m-123"
    name: str = "llama-8b"
    url: str = "s3://bucket/llama-8b/"
    tags: Any = field(default_factory=lambda: [SERVABLE_TAG])
    framework: Any = "PyTorch"
    metadata: Any = field(default_factory=lambda: {
        "size_bytes": {"key": "size_bytes", "value": "16000000000", "type": "int"},
        "dtype": {"key": "dtype", "value": "bfloat16", "type": "str"},
        "architecture": {"key": "architecture", "value": "LlamaForCausalLM", "type": "str"},
        "parameters": {"key": "parameters", "value": "8030261248", "type": "int"},
        "context_length": {"key": "context_length", "value": "8192", "type": "int"},
        "engine": {"key": "engine", "value": "vllm", "type": "str"},
        "quantization": {"key": "quantization", "value": "awq", "type": "str"},
    })
    config_dict: Any = None

    def get_all_metadata(self) -> Any:
        if isinstance(self.metadata, Exception):
            raise self.metadata
        return self.metadata


def with_meta(**values: Any) -> Entry:
    entry = Entry()
    for key, value in values.items():
        if value is None:
            entry.metadata.pop(key, None)
        else:
            entry.metadata[key] = {"key": key, "value": value, "type": "str"}
    return entry


def test_well_formed_entry_converts_to_a_spec() -> None:
    spec = spec_from_clearml_model(Entry())
    assert spec.name == "llama-8b"
    assert spec.weights == spec.source_uri == "s3://bucket/llama-8b/"
    assert (spec.size_bytes, spec.dtype, spec.engine) == (16_000_000_000, "bfloat16", "vllm")
    assert (spec.architecture, spec.parameters, spec.context_length) == ("LlamaForCausalLM", 8030261248, 8192)
    assert spec.quantization == "awq"
    assert spec.model_id == "m-123"
    assert spec.tags == (SERVABLE_TAG,)
    assert spec.extra["weights_layout"] == "folder"
    assert spec.extra["framework"] == "PyTorch"


def test_optional_fields_default_and_serve_name_overrides_the_registry_name() -> None:
    entry = with_meta(dtype=None, engine=None, architecture=None, parameters=None, context_length=None,
                      quantization="none", serve_name="llama")
    spec = spec_from_clearml_model(entry)
    assert (spec.name, spec.dtype, spec.engine, spec.quantization) == ("llama", "auto", "transformers", None)
    assert spec.parameters is None and spec.context_length is None


def test_metadata_copy_in_the_model_configuration_is_used_when_metadata_is_missing() -> None:
    """What an offline session imported into a server looks like: no metadata, config kept."""
    entry = Entry(metadata={}, config_dict={"umem": {"size_bytes": "1234", "dtype": "float16"}})
    spec = spec_from_clearml_model(entry)
    assert (spec.size_bytes, spec.dtype) == (1234, "float16")
    entry = Entry(metadata={"size_bytes": {"value": "99"}}, config_dict={"umem": {"size_bytes": "1234"}})
    assert spec_from_clearml_model(entry).size_bytes == 99


def test_an_entry_without_a_size_is_measured_once_fetched() -> None:
    """Registered the usual ClearML way (OutputModel, clearml-serving model upload): no metadata."""
    for entry in (with_meta(size_bytes=None), with_meta(size_bytes="")):
        assert spec_from_clearml_model(entry).size_bytes == 0


MALFORMED: list[tuple[str, Entry, str]] = [
    ("size not a number", with_meta(size_bytes="16GB"), "metadata.size_bytes"),
    ("size zero", with_meta(size_bytes="0"), "metadata.size_bytes"),
    ("size negative", with_meta(size_bytes="-5"), "metadata.size_bytes"),
    ("size fractional", with_meta(size_bytes="1.5"), "metadata.size_bytes"),
    ("context not a number", with_meta(context_length="long"), "metadata.context_length"),
    ("context zero", with_meta(context_length="0"), "metadata.context_length"),
    ("parameters not a number", with_meta(parameters="8B"), "metadata.parameters"),
    ("unknown engine", with_meta(engine="tensorrt-llm"), "metadata.engine"),
    ("unknown dtype", with_meta(dtype="int3"), "metadata.dtype"),
    ("unknown layout", with_meta(weights_layout="tarball"), "metadata.weights_layout"),
    ("metadata not a mapping", Entry(metadata=["size_bytes", "1"]), "metadata"),
    ("metadata unreadable", Entry(metadata=RuntimeError("400: Invalid model id")), "metadata"),
    ("no uri", Entry(url=""), "uri"),
    ("uri not a string", Entry(url=None), "uri"),
    ("empty name", Entry(name="  "), "name"),
    ("name not a string", Entry(name=None), "name"),
    ("tags not a list", Entry(tags="umem-servable"), "tags"),
]


@pytest.mark.parametrize(("case", "entry", "field_name"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_entry_names_the_model_id_and_the_field(case: str, entry: Entry, field_name: str) -> None:
    with pytest.raises(SpecError) as info:
        spec_from_clearml_model(entry)
    assert info.value.field == field_name, case
    assert "m-123" in info.value.entry
    assert "m-123" in str(info.value) and field_name in str(info.value)


def test_the_framework_field_does_not_decide_servability() -> None:
    """The SDK records TensorFlow for any .zip package: the fetched files decide, not this field."""
    spec = spec_from_clearml_model(Entry(framework="TensorFlow", metadata=with_meta(engine=None).metadata))
    assert spec.extra["framework"] == "TensorFlow" and not spec.extra["engine_declared"]
    assert spec_from_clearml_model(with_meta(engine="vllm")).extra["engine_declared"]


def test_servable_tag_is_enforced_only_when_asked() -> None:
    entry = Entry(tags=["other"])
    assert spec_from_clearml_model(entry).tags == ("other",)
    with pytest.raises(SpecError, match="umem-servable") as info:
        spec_from_clearml_model(entry, require_tag=True)
    assert info.value.field == "tags"


def test_unreadable_attribute_is_reported_as_that_field() -> None:
    class Broken:
        id = "m-123"
        name = "llama-8b"
        tags: list[str] = []

        def get_all_metadata(self) -> dict[str, dict[str, str]]:
            return {"size_bytes": {"value": "1"}}

        @property
        def url(self) -> str:
            raise ValueError("connection refused")

    with pytest.raises(SpecError) as info:
        spec_from_clearml_model(Broken())  # type: ignore[arg-type]
    assert info.value.field == "url" and "connection refused" in str(info.value)


@pytest.mark.parametrize(("uri", "layout"), [
    ("s3://b/llama/", "folder"), ("s3://b/llama", "folder"), ("https://files/x/llama.zip", "archive"),
    ("gs://b/m.tar.gz", "archive"), ("file:///m/model.safetensors", "file"), ("https://h/m.gguf", "file"),
])
def test_layout_is_guessed_from_the_uri(uri: str, layout: str) -> None:
    assert layout_for_uri(uri) == layout


def test_metadata_items_have_clearml_types_and_skip_unset_values() -> None:
    items = metadata_items({"size_bytes": 10, "dtype": "bfloat16", "quantization": None, "serve_name": ""})
    assert items == {"size_bytes": {"value": "10", "type": "int"}, "dtype": {"value": "bfloat16", "type": "str"}}


def test_facts_are_read_from_a_hugging_face_directory(tiny_models: dict[str, Path]) -> None:
    facts = inspect_weights(tiny_models["tiny-llama"])
    assert facts.architecture == "LlamaForCausalLM"
    assert facts.dtype == "bfloat16"
    assert facts.context_length == 2048
    assert facts.parameters and facts.size_bytes == pytest.approx(facts.parameters * 2, rel=0.01)


def test_directory_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SpecError, match="no weight files"):
        inspect_weights(tmp_path)


def test_manifest_upsert_replaces_by_name_and_keeps_other_entries(tmp_path: Path,
                                                                   tiny_models: dict[str, Path]) -> None:
    manifest = tmp_path / "models.yaml"
    manifest.write_text("models:\n  - name: other\n    weights: " + str(tiny_models["tiny-qwen2"]) + "\n")
    spec = spec_from_clearml_model(Entry(url=tiny_models["tiny-llama"].as_uri()))
    local = spec.with_updates(weights=str(tiny_models["tiny-llama"]), engine="transformers")
    upsert_manifest_entry(manifest, local)
    upsert_manifest_entry(manifest, local.with_updates(context_length=1024))
    snap = ManifestCatalog(manifest).snapshot()
    assert not snap.errors
    assert [s.name for s in snap.specs] == ["other", "llama-8b"]
    llama = snap.specs[1]
    assert (llama.context_length, llama.model_id, llama.quantization) == (1024, "m-123", "awq")


def test_the_engine_setting_serves_entries_that_name_none(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    from clearml_umem.config import ServeConfig
    from clearml_umem.tinygguf import TinyGGUF, write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "g.gguf", TinyGGUF("g", "q8_0"))
    manifest = tmp_path / "models.yaml"
    manifest.write_text(f"models:\n  - name: plain\n    weights: {tiny_models['tiny-llama']}\n"
                        f"  - name: named\n    weights: {tiny_models['tiny-qwen2']}\n    engine: transformers\n"
                        f"  - name: gguf\n    weights: {gguf}\n")
    engines = {s.name: s.engine for s in ManifestCatalog(manifest, default_engine="vllm").snapshot().specs}
    assert engines == {"plain": "vllm", "named": "transformers", "gguf": "llamacpp"}
    assert ServeConfig(manifest=str(manifest), device="cpu").resolved_engine() == "transformers", "auto on a CPU"
    assert ServeConfig(manifest=str(manifest), engine="vllm").resolved_engine() == "vllm"
    with pytest.raises(ValueError, match="engine must be one of"):
        ServeConfig(manifest=str(manifest), engine="tensorrt").validate()
