"""Environment for running the real clearml SDK in tests: offline, or against the API fixture.

Every test that runs a ClearML task does it in a child process: offline mode and the
SDK's session are process-wide, so a child keeps them from leaking between tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SDK_CONFIG = """
sdk {
  development {
    # The forked metrics reporter makes Task.close() wait ~10 s in offline mode, and can hang
    # the test's stand-ins for users' scripts and clearml-serving's processes. Our own scripts
    # choose the reporter thread themselves: test_task_scripts_end_promptly_with_the_sdks_default_configuration
    # runs them on the SDK's defaults.
    report_use_subprocess: false
  }
}
"""


def write_sdk_config(folder: Path) -> Path:
    """A clearml.conf with no server and no credentials: a user's ~/clearml.conf never leaks in."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "clearml.conf"
    path.write_text(SDK_CONFIG)
    return path


def offline_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
    env.update({
        "CLEARML_CONFIG_FILE": str(write_sdk_config(tmp / "sdk")),
        "CLEARML_CACHE_DIR": str(tmp / "clearml-cache"),
        "CLEARML_OFFLINE_MODE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def run_python(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc
