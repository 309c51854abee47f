"""Online or offline: the one decision every ClearML entry point makes first.

The plugin must run on a laptop with no ClearML server (the embedded default), so a task
that finds no server configuration switches the SDK to offline mode instead of failing or
prompting: everything it records lands in a local session folder that can be imported
into a server later with `clearml-task --import-offline-session` /
`Task.import_offline_session`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")


def offline_requested() -> bool:
    """The user asked for offline mode explicitly (CLEARML_OFFLINE_MODE, as the SDK reads it)."""
    value = os.environ.get("CLEARML_OFFLINE_MODE", "").strip().lower()
    return value in _TRUE or _is_version(value)


def _is_version(text: str) -> bool:
    """The SDK also accepts an API version ("2.20") as the offline switch."""
    try:
        return float(text) >= 2.0
    except ValueError:
        return False


def clearml_configured() -> bool:
    """A server is configured: credentials in the environment, an agent's token, or a clearml.conf.

    `clearml-init` writes ~/clearml.conf; agents and CI pass CLEARML_API_* variables. With
    none of those, Task.init would stop to ask for credentials, which a serving process
    must never do.
    """
    if os.environ.get("CLEARML_API_ACCESS_KEY") or os.environ.get("CLEARML_AUTH_TOKEN"):
        return True
    config_file = os.environ.get("CLEARML_CONFIG_FILE")
    candidates = [Path(config_file)] if config_file else [Path.home() / "clearml.conf", Path.home() / ".clearml.conf"]
    return any(_has_credentials(p) for p in candidates)


def _has_credentials(path: Path) -> bool:
    try:
        text = path.read_text()
    except OSError:
        return False
    return "access_key" in text and "secret_key" in text


def use_offline_unless_configured() -> bool:
    """Prepare the SDK for a task script: offline mode when no server is configured, and the
    metrics reporter as a thread. Returns whether it is offline.

    Must run before the first `Task.init`: the SDK cannot move a live task between modes, and
    reads its reporter setting once. Why the thread: by default (Linux) the SDK forks its
    reporter process while the repository-detection thread may be inside `subprocess` (git);
    the fork copies that half-done state, the detection never ends, and `Task.close()` then
    waits 300 s for it ("Repository and package analysis timed out"). A reporter thread
    forks nothing; our scripts report little, so it costs nothing.
    """
    from clearml import Task

    use_reporter_thread()
    record_agent_requirements()
    if Task.is_offline():
        return True
    if offline_requested() or not clearml_configured():
        if not offline_requested():
            log.info("no ClearML server configured (clearml-init / CLEARML_API_HOST...): running in offline mode")
        Task.set_offline(True)
        return True
    return False


def use_reporter_thread() -> None:
    """`sdk.development.report_use_subprocess: false`, applied by the script itself (see above),
    unless the user's configuration or environment says otherwise."""
    from clearml.config import ConfigSDKWrapper, ConfigWrapper

    if os.environ.get("CLEARML_REPORT_USE_SUBPROCESS"):
        return
    if ConfigWrapper.get("sdk.development.report_use_subprocess", None) is not None:
        return
    ConfigWrapper.set_overrides({"sdk": {"development": {"report_use_subprocess": False}}})
    ConfigSDKWrapper.clear_config_impl()


AGENT_REQUIREMENTS = (("-e .[transformers]", None), ("torch", ">=2.2"))
"""What a clearml-agent installs for a task cloned from these scripts, on top of what the SDK
detects: the package itself from the repository the agent checked out (its pyproject.toml;
the package lives under plugin/ and is not on PyPI, so the SDK's analysis skips it as a local
module), and torch without this machine's build tag, so the agent picks the build for its CUDA."""


def record_agent_requirements() -> None:
    from clearml import Task

    for name, version in AGENT_REQUIREMENTS:
        Task.add_requirements(name, version)
