"""The manifest as a user writes it: typos are errors naming the key and the closest known one,
the shipped JSON Schema and the loader accept and refuse the same files, and `serve` says so
through the real entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from clearml_umem.catalog import SCHEMA_FILE, ManifestCatalog, ManifestError, write_manifest
from clearml_umem.cli import main
from clearml_umem.manifest_schema import manifest_schema, schema_text
from clearml_umem.spec import MANIFEST_KEYS, SpecError, spec_from_mapping


def _write(tmp_path: Path, data: Any, name: str = "models.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return path


def _serve(manifest: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clearml_umem", "serve", "--manifest", str(manifest), "--port", "0",
                           *extra], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(("entry", "named", "suggested"), [
    ({"enigne": "vllm"}, "enigne", "engine"),
    ({"max_concurency": 4}, "max_concurency", "max_concurrency"),
    ({"alias": ["x"]}, "alias", "aliases"),
    ({"default": {"temperature": 0.2}}, "default", "defaults"),
])
def test_a_typo_in_an_entry_is_refused_naming_the_key_and_the_closest_one(tmp_path, tiny_models, entry, named,
                                                                          suggested):
    data = {"name": "llama", "weights": str(tiny_models["tiny-llama"]), **entry}
    with pytest.raises(SpecError) as err:
        spec_from_mapping(data, base_dir=tmp_path)
    assert err.value.field == named
    assert f"did you mean {suggested!r}" in str(err.value)


def test_serve_refuses_typos_through_the_entry_point(tmp_path, tiny_models, capsys):
    """`weight:` used to say "field 'weights': is required"; `enigne: vllm` used to start as transformers."""
    weights = str(tiny_models["tiny-llama"])
    cases = [
        ({"models": [{"name": "llama", "weight": weights}]}, "field 'weight': unknown key; did you mean 'weights'?"),
        ({"models": [{"name": "llama", "weights": weights, "enigne": "vllm"}]},
         "field 'enigne': unknown key; did you mean 'engine'?"),
        ({"model": [{"name": "llama", "weights": weights}]}, "top-level key 'model': unknown key; did you mean "
                                                             "'models'?"),
        ([{"name": "llama", "weights": weights}], "is a bare list; put the models under a 'models:' key"),
        ({"models": [{"name": "llama", "weights": weights, "defaults": {"temprature": 0.5}}]},
         "field 'defaults.temprature': unknown key; did you mean 'temperature'?"),
    ]
    # the first through a new process (`python -m clearml_umem`), the others through the same `main`
    # in this one: a process start costs seconds on a loaded CI machine
    proc = _serve(_write(tmp_path, cases[0][0], "m0.yaml"))
    assert proc.returncode == 2, proc.stderr
    assert cases[0][1] in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    for i, (data, message) in enumerate(cases[1:], start=1):
        code = main(["serve", "--manifest", str(_write(tmp_path, data, f"m{i}.yaml")), "--port", "0"])
        err = capsys.readouterr().err
        assert code == 2, (data, err)
        assert message in err, (data, err)


def test_the_shipped_schema_is_the_generated_one():
    """Regenerate with `python -m clearml_umem.manifest_schema > plugin/clearml_umem/manifest.schema.json`."""
    assert SCHEMA_FILE.read_text() == schema_text()
    jsonschema.Draft202012Validator.check_schema(manifest_schema())
    assert sorted(manifest_schema()["$defs"]["model"]["properties"]) == sorted(MANIFEST_KEYS)


def _entries(weights: str) -> list[tuple[bool, Any]]:
    """(valid?, manifest): each one the loader must judge as the schema does."""
    base = {"name": "m", "weights": weights}
    return [
        (True, {"models": [base]}),
        (True, {"models": []}),
        (True, {"models": [{**base, "engine": "transformers", "dtype": "float32", "size_bytes": 123,
                            "context_length": "64", "parameters": 1000, "architecture": "LlamaForCausalLM",
                            "tags": ["chat"], "aliases": ["a", "b"], "max_concurrency": 2,
                            "defaults": {"temperature": 0, "top_p": 0.5, "max_tokens": 8, "stop": ["\n"],
                                         "seed": 7}}]}),
        (True, {"models": [{**base, "tags": "a,b", "context_length": None, "defaults": {"stop": "END"}}]}),
        (True, {"models": [{**base, "size_bytes": 1.6e3}]}),
        (False, [base]),
        (False, {"models": [base], "extra": 1}),
        (False, {"models": "m"}),
        (False, {}),
        (False, {"models": [{"name": "m"}]}),
        (False, {"models": [{"weights": weights}]}),
        (False, {"models": [{**base, "name": " "}]}),
        (False, {"models": [{**base, "enigne": "vllm"}]}),
        (False, {"models": [{**base, "engine": "tensorrt"}]}),
        (False, {"models": [{**base, "engine": "VLLM"}]}),
        (False, {"models": [{**base, "dtype": "fp12"}]}),
        (False, {"models": [{**base, "size_bytes": 0}]}),
        (False, {"models": [{**base, "size_bytes": "16GB"}]}),
        (False, {"models": [{**base, "context_length": -5}]}),
        (False, {"models": [{**base, "size_bytes": True}]}),
        (False, {"models": [{**base, "max_concurrency": 0}]}),
        (False, {"models": [{**base, "aliases": "a"}]}),
        (False, {"models": [{**base, "aliases": ["a", "a"]}]}),
        (False, {"models": [{**base, "aliases": [""]}]}),
        (False, {"models": [{**base, "tags": [1]}]}),
        (False, {"models": [{**base, "architecture": 5}]}),
        (False, {"models": [{**base, "model_id": 5}]}),
        (False, {"models": [{**base, "defaults": {"temperature": 3}}]}),
        (False, {"models": [{**base, "defaults": {"temperature": "hot"}}]}),
        (False, {"models": [{**base, "defaults": {"top_p": 1.5}}]}),
        (False, {"models": [{**base, "defaults": {"max_tokens": 0}}]}),
        (False, {"models": [{**base, "defaults": {"max_tokens": 2.5}}]}),
        (False, {"models": [{**base, "defaults": {"stop": ["a", "b", "c", "d", "e"]}}]}),
        (False, {"models": [{**base, "defaults": {"seed": 2**64}}]}),
        (False, {"models": [{**base, "defaults": {"temperature": None}}]}),
        (False, {"models": [{**base, "defaults": {"logprobs": True}}]}),
        (False, {"models": [{**base, "defaults": [1]}]}),
    ]


def test_the_loader_and_the_schema_agree(tmp_path, tiny_models):
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))
    for i, (valid, data) in enumerate(_entries(str(tiny_models["tiny-llama"]))):
        schema_ok = validator.is_valid(data)
        path = _write(tmp_path, data, f"m{i}.yaml")
        try:
            snapshot = ManifestCatalog(path).snapshot()
            loader_ok = not snapshot.errors
            problem = "; ".join(map(str, snapshot.errors))
        except ManifestError as exc:
            loader_ok, problem = False, str(exc)
        assert (schema_ok, loader_ok) == (valid, valid), (data, problem,
                                                            [e.message for e in validator.iter_errors(data)])


def test_names_and_aliases_are_unique_across_the_manifest(tmp_path, tiny_models):
    weights = str(tiny_models["tiny-llama"])
    data = {"models": [{"name": "a", "weights": weights, "aliases": ["shared"]},
                       {"name": "b", "weights": weights, "aliases": ["shared"]},
                       {"name": "c", "weights": weights, "aliases": ["a"]}]}
    errors = ManifestCatalog(_write(tmp_path, data)).snapshot().errors
    assert [(e.entry, e.field) for e in errors] == [("b", "aliases"), ("c", "aliases")]
    assert "'shared' already names model 'a'" in str(errors[0])


def test_penalty_defaults_only_for_engines_that_take_them(tmp_path, tiny_models):
    data = {"name": "m", "weights": str(tiny_models["tiny-llama"]), "defaults": {"presence_penalty": 0.5}}
    with pytest.raises(SpecError, match="engine transformers does not take it; models served by llamacpp, vllm"):
        spec_from_mapping(data)


def test_a_default_max_tokens_over_the_context_is_refused(tmp_path, tiny_models):
    data = {"name": "m", "weights": str(tiny_models["tiny-llama"]), "context_length": 64,
            "defaults": {"max_tokens": 65}}
    with pytest.raises(SpecError, match="'defaults.max_tokens': is 65, more than the context length"):
        spec_from_mapping(data)


def test_written_manifests_round_trip_and_name_the_schema(tmp_path, tiny_models):
    spec = spec_from_mapping({"name": "m", "weights": str(tiny_models["tiny-llama"]), "aliases": ["x"],
                              "max_concurrency": 1, "defaults": {"temperature": 0.0, "stop": ["\n"]}})
    path = tmp_path / "out.yaml"
    write_manifest(path, [spec])
    assert path.read_text().splitlines()[0] == f"# yaml-language-server: $schema={SCHEMA_FILE}"
    assert ManifestCatalog(path).snapshot().specs == [spec]
