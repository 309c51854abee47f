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
# the SDK's defaults: what our scripts must work with on a user's machine (they choose the
# reporter thread themselves: clearml_io.session.use_reporter_thread)
sdk {
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
