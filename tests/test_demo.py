"""The demo as a newcomer meets it: `scripts/demo.sh --help` prints help without installing
anything, and the demo (through `python -m clearml_umem demo`) ends by saying how to keep
exploring: the manifest it wrote, the line that serves it again, the status page and `ps`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clearml_umem.catalog import ManifestCatalog

REPO = Path(__file__).resolve().parents[1]


def test_demo_sh_help_prints_help_and_installs_nothing(tmp_path):
    venv = tmp_path / "no-venv-here"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--help"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "UMEM_VENV": str(venv)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: bash scripts/demo.sh")
    assert not venv.exists(), "--help must not create the venv"
    # every option of the demo itself is in the script's help
    demo_help = subprocess.run([sys.executable, "-m", "clearml_umem", "demo", "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    options = set(re.findall(r"(--[a-z][a-z-]+)", demo_help)) - {"--help"}
    assert options and all(o in proc.stdout for o in options), sorted(o for o in options if o not in proc.stdout)


@pytest.mark.slow
def test_the_demo_ends_with_the_next_steps(tmp_path, tiny_models):
    work = tmp_path / "demo"
    work.mkdir()
    (work / "models").symlink_to(Path(next(iter(tiny_models.values()))).parent, target_is_directory=True)
    proc = subprocess.run([sys.executable, "-m", "clearml_umem", "demo", "--rounds", "1", "--device", "cpu",
                           "--work-dir", str(work)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "TTFT by tier (median of 1 run," in out
    tail = out[out.index("Keep exploring:"):]
    manifest = work / "demo-manifest-transformers.yaml"
    assert f"the manifest this demo wrote: {manifest}" in tail
    assert "http://127.0.0.1:8000/ui" in tail and "clearml-umem ps" in tail and "--keep-serving" in tail
    serve_line = next(line.split(":", 1)[1].strip() for line in tail.splitlines() if "serve it yourself" in line)
    assert serve_line.startswith(f"clearml-umem serve --manifest {manifest} --device cpu --device-budget ")
    assert sorted(s.name for s in ManifestCatalog(manifest).snapshot().specs) == sorted(tiny_models)
    # the line works: the same CLI, its arguments, refused only for the port when 8000 is taken
    from clearml_umem.cli import build_parser
    from clearml_umem.config import config_from_args

    config = config_from_args(build_parser().parse_args(serve_line.split()[1:]))
    assert config.manifest == str(manifest) and config.device_budget and config.host_budget
