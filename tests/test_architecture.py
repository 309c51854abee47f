"""The pure core stays pure: tiers, ledger, planner, policy, commands, model state, errors and the
scheduler import nothing from engines, the router, ClearML, torch or the web stack, and there is no
import cycle among the package's modules."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

CORE = ["tiers", "ledger", "planner", "policy", "commands", "model_state", "errors", "events", "scheduler", "turns",
        "placements"]
FORBIDDEN = ("clearml_umem.engines", "clearml_umem.router", "clearml_umem.clearml_io", "clearml", "torch",
             "fastapi", "uvicorn", "httpx")


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_nothing_from_the_edges(module: str) -> None:
    code = (f"import sys, json; import clearml_umem.{module}; "
            "print(json.dumps(sorted(m for m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    bad = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    assert bad == [], f"clearml_umem.{module} pulls in {bad}"


def test_every_module_imports_on_its_own() -> None:
    """A cycle shows up as an ImportError when a module in it is imported first."""
    root = Path(__file__).resolve().parents[1] / "plugin" / "clearml_umem"
    modules = sorted("clearml_umem." + ".".join(p.relative_to(root).with_suffix("").parts)
                     for p in root.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    code = ("import importlib, json, sys\nfailed = {}\n"
            f"for name in {modules!r}:\n"
            "    for m in [k for k in sys.modules if k.startswith('clearml_umem')]:\n"
            "        del sys.modules[m]\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except ImportError as exc:\n        failed[name] = str(exc)\n"
            "print(json.dumps(failed))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}



SERVING = ["server.py", "runtime.py", "catalog.py", "catalog_poller.py", "router", "engines", "fleet/choose.py",
           "fleet/relay.py", "fleet/front.py", "fleet/probe.py"]
"""The serving side: a catalog is handed to it, so none of it may import the ClearML edge, not even
inside a function (the SDK is imported only where a ClearML server is talked to: clearml_io/,
tasks/, fleet discovery by task)."""


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("where", SERVING)
def test_serving_imports_no_clearml_edge(where: str) -> None:
    root = Path(__file__).resolve().parents[1] / "plugin" / "clearml_umem"
    files = sorted((root / where).rglob("*.py")) if (root / where).is_dir() else [root / where]
    bad = {str(f.relative_to(root)): sorted(m for m in _imports(f) if m.split(".")[0] == "clearml"
                                            or m.startswith("clearml_umem.clearml_io"))
           for f in files}
    assert {f: m for f, m in bad.items() if m} == {}
