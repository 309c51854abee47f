"""What the llama.cpp tests need: a llama-server binary, the gguf package, tiny GGUF models.

The binary comes from `scripts/install-llama-server.sh` (scripts/test.sh runs it), or from
UMEM_LLAMA_SERVER / PATH. Without one, the tests that run it skip and say why; setting
UMEM_TEST_LLAMACPP=0 skips them on purpose.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from clearml_umem.engines.llama_server import find_llama_server

LLAMA_SERVER = find_llama_server()

if os.environ.get("UMEM_TEST_LLAMACPP", "1") == "0":
    SKIP_REASON: str | None = "UMEM_TEST_LLAMACPP=0"
elif importlib.util.find_spec("gguf") is None:
    SKIP_REASON = "the gguf package (test extra) is not installed: it writes the tiny GGUF models"
elif LLAMA_SERVER is None or not Path(LLAMA_SERVER).is_file():
    SKIP_REASON = ("no llama-server binary: run scripts/install-llama-server.sh (scripts/test.sh does), or set "
                   "UMEM_LLAMA_SERVER=/path/to/llama-server")
else:
    SKIP_REASON = None

needs_llama_server = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


def server_env() -> dict[str, str]:
    """The environment a router child needs to find the binary the tests found."""
    return {"UMEM_LLAMA_SERVER": str(LLAMA_SERVER)} if LLAMA_SERVER else {}
