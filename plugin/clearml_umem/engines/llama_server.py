"""Finding the `llama-server` binary and what it can do.

Nothing on PyPI or Debian ships a prebuilt `llama-server`; `scripts/install-llama-server.sh`
builds one into a cache. The engine looks, in order, at the `llama_server` option (the
`--llama-server` flag), `UMEM_LLAMA_SERVER`, `llama-server` on PATH, and the install
script's default cache, so that a user who ran the script needs to set nothing.

What a binary supports is read once from its `--help` (milliseconds): whether `--host` takes a
Unix socket path (llama.cpp since late 2025), and whether it was built with CUDA.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

LLAMA_SERVER_ENV = "UMEM_LLAMA_SERVER"
DEFAULT_VERSION = "0.3.36"
"""The llama-cpp-python sdist `scripts/install-llama-server.sh` builds from by default."""


def default_cache_binaries() -> list[Path]:
    """Where `scripts/install-llama-server.sh` puts the binary with its defaults (CUDA build first)."""
    root = Path(os.environ.get("UMEM_LLAMA_CACHE") or "")
    found = [root / "bin" / "llama-server"] if os.environ.get("UMEM_LLAMA_CACHE") else []
    base = Path.home() / ".cache" / "clearml-umem"
    found += [base / f"llama-server-{DEFAULT_VERSION}-{flavour}" / "bin" / "llama-server"
              for flavour in ("cuda", "cpu")]
    return found


def find_llama_server(option: str | os.PathLike[str] | None = None) -> str | None:
    """The binary to run: the option, else UMEM_LLAMA_SERVER, else PATH, else the install script's cache."""
    for candidate in (option, os.environ.get(LLAMA_SERVER_ENV)):
        if candidate:
            return str(Path(candidate).expanduser())
    on_path = shutil.which("llama-server")
    if on_path:
        return on_path
    for path in default_cache_binaries():
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


@dataclass(frozen=True)
class ServerAbilities:
    unix_socket: bool
    """`--host` takes a path ending in .sock."""
    cuda: bool
    """Built with the CUDA backend (it can offload layers to an NVIDIA GPU)."""
    load_mode: bool
    """Has `--load-mode` (newer builds; older ones had --mmap/--mlock)."""
    no_webui: bool
    jinja: bool = False
    """Has `--jinja` (the model's own chat template, needed for tools)."""


@functools.lru_cache(maxsize=16)
def abilities(binary: str) -> ServerAbilities:
    """Read from `binary --help` and `--list-devices`; raises OSError/ValueError where it does not run."""
    try:
        out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30,
                             env={"PATH": os.environ.get("PATH", "")}, check=False)
    except subprocess.TimeoutExpired:
        raise ValueError(f"{binary} --help did not answer within 30 s") from None
    text = out.stdout + out.stderr
    if "--ctx-size" not in text:
        raise ValueError(f"{binary} does not look like llama-server (no --ctx-size in its --help; exit "
                         f"{out.returncode}): {text[-300:]}")
    devices = subprocess.run([binary, "--list-devices"], capture_output=True, text=True, timeout=30,
                             env={"PATH": os.environ.get("PATH", "")}, check=False)
    return ServerAbilities(unix_socket=".sock" in text, cuda="CUDA" in devices.stdout + devices.stderr,
                           load_mode="--load-mode" in text, no_webui="--no-webui" in text,
                           jinja="--jinja" in text)
