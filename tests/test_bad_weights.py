"""Bad weights are caught at start, by entry, file and reason; a server with nothing to serve says so and exits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clearml_umem.spec import SpecError, spec_from_mapping, weights_size


def test_a_folder_far_larger_than_a_model_is_refused_fast(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"d{i}").mkdir()
    import clearml_umem.spec as spec

    original = spec.MAX_SCAN_ENTRIES
    spec.MAX_SCAN_ENTRIES = 2
    try:
        with pytest.raises(ValueError, match="point 'weights' at the model's own folder"):
            weights_size(tmp_path)
    finally:
        spec.MAX_SCAN_ENTRIES = original
    with pytest.raises(SpecError) as info:
        spec_from_mapping({"name": "root", "weights": "/"})
    assert "'root'" in str(info.value) and "weights" in str(info.value)


def test_an_unreadable_folder_is_a_spec_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        with pytest.raises(SpecError, match="cannot read"):
            spec_from_mapping({"name": "locked", "weights": str(tmp_path)})
    finally:
        locked.chmod(0o755)


@pytest.mark.slow
def test_a_text_file_as_weights_stops_the_start_naming_entry_and_file(tmp_path: Path,
                                                                     tiny_models: dict[str, Path]) -> None:
    model = tmp_path / "fake-model"
    model.mkdir()
    (model / "config.json").write_text((tiny_models["tiny-llama"] / "config.json").read_text())
    (model / "model.safetensors").write_text("this is not a safetensors file, just some text\n" * 100)
    manifest = tmp_path / "models.yaml"
    manifest.write_text(f"models:\n  - name: fake\n    weights: {model}\n")
    proc = subprocess.run([sys.executable, "-m", "clearml_umem", "serve", "--manifest", str(manifest), "--port", "0",
                           "--device", "cpu", "--work-dir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, "a server with nothing servable must not start"
    out = proc.stdout + proc.stderr
    assert "no model can be served" in out and "fake" in out
    assert str(model / "model.safetensors") in out and "not a readable safetensors file" in out
    assert "MemoryError" not in out and "Traceback" not in out
