"""Registering a GGUF model: the register task offline, as a user runs it, and a fetched registry entry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clearml_umem.catalog import ManifestCatalog
from clearml_umem.clearml_io.offline import OfflineSession
from clearml_umem.clearml_io.registry import complete_from_files
from clearml_umem.spec import ModelSpec, SpecError
from tests.clearml_env import offline_env, run_python

pytest.importorskip("gguf", reason="the gguf package (test extra) writes the tiny GGUF models")

from clearml_umem.tinygguf import TinyGGUF, write_tiny_gguf  # noqa: E402


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-q8_0.gguf", TinyGGUF("tiny", "q8_0"))


@pytest.mark.slow
def test_register_task_reads_a_gguf_file(tmp_path: Path, gguf_file: Path) -> None:
    env = offline_env(tmp_path)
    manifest = tmp_path / "models.yaml"
    run_python(["tasks/register_model.py", "--source", str(gguf_file), "--manifest", str(manifest)], env)
    entry = yaml.safe_load(manifest.read_text())["models"][0]
    assert entry["name"] == "tiny-q8_0" and entry["engine"] == "llamacpp"
    assert (entry["quantization"], entry["architecture"], entry["context_length"]) == ("q8_0", "llama", 2048)
    assert entry["size_bytes"] == gguf_file.stat().st_size and entry["parameters"] > 0
    served = ManifestCatalog(manifest).snapshot()
    assert served.errors == [] and served.specs[0].engine == "llamacpp"
    session = OfflineSession.find(task_name="register model", cache_dir=env["CLEARML_CACHE_DIR"])
    assert [m["init"]["name"] for m in session.output_models] == ["tiny-q8_0"]

    wrong = tmp_path / "wrong.yaml"
    with pytest.raises(AssertionError, match="quantization"):
        run_python(["tasks/register_model.py", "--source", str(gguf_file), "--quantization", "q4_k_m",
                    "--manifest", str(wrong)], env)
    assert not wrong.exists()


def test_a_fetched_registry_entry_is_completed_and_checked_from_the_gguf(gguf_file: Path, tmp_path: Path) -> None:
    entry = ModelSpec(name="tiny", weights=str(gguf_file), size_bytes=0, engine="llamacpp", model_id="m-1")
    done = complete_from_files(entry)
    assert (done.size_bytes, done.architecture, done.context_length, done.quantization) == (
        gguf_file.stat().st_size, "llama", 2048, "q8_0")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(gguf_file.read_bytes()[:5000])
    with pytest.raises(SpecError) as err:
        complete_from_files(entry.with_updates(weights=str(broken)))
    assert err.value.field == "uri" and "not a usable GGUF" in str(err.value)
    with pytest.raises(SpecError) as err:
        complete_from_files(entry.with_updates(engine="transformers"))
    assert err.value.field == "metadata.engine"
    with pytest.raises(SpecError) as err:
        complete_from_files(entry.with_updates(quantization="q4_k_m"))
    assert err.value.field == "metadata.quantization" and "'q8_0'" in str(err.value)
    assert complete_from_files(entry.with_updates(quantization="Q8_0")).quantization == "Q8_0"
