"""Shared fixtures: tiny real models built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clearml_umem.tinymodels import DEMO_MODELS, ensure_tiny_models

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo's three tiny models (Llama, Qwen2, Mistral), a few MB each."""
    cache = os.environ.get("UMEM_TEST_MODELS")
    root = Path(cache) if cache else tmp_path_factory.mktemp("models")
    return ensure_tiny_models(root, DEMO_MODELS)
