"""Models from the Hugging Face Hub: `hf://org/name[@revision]` as a weights URI.

Fetched with `huggingface_hub` into its own cache, so its settings apply as users set them:
`HF_HOME` / `HF_HUB_CACHE` (where), `HF_HUB_OFFLINE=1` (use only what is cached), `HF_TOKEN`
(gated and private models). Only the files a model needs are fetched (weights, config,
tokenizer), and progress is logged per file.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from clearml_umem.units import fmt_bytes, fmt_seconds

log = logging.getLogger(__name__)

SCHEME = "hf://"
MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "*.json", "*.model", "*.txt", "*.tiktoken", "*.gguf",
               "*.jinja")
"""What serving a model needs; never the `.bin`/`.pt`/`.h5` duplicates many repositories carry."""
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubError(ValueError):
    """The Hub source is malformed or cannot be fetched; the message says which and why."""


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    revision: str | None = None

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    @property
    def name(self) -> str:
        return self.repo_id.split("/", 1)[1]


def is_hub_uri(uri: str) -> bool:
    return uri.startswith(SCHEME)


def parse(uri: str) -> HubSource:
    """`hf://org/name` or `hf://org/name@revision` (a branch, tag or commit)."""
    if not is_hub_uri(uri):
        raise HubError(f"not a Hub source: {uri!r} (expected hf://org/name[@revision])")
    body = uri[len(SCHEME):]
    repo_id, _, revision = body.partition("@")
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise HubError(f"{uri!r}: the repository must be org/name")
    if "@" in body and not revision:
        raise HubError(f"{uri!r}: empty revision after '@'")
    return HubSource(repo_id, revision or None)


def fetch(uri: str) -> Path:
    """The local snapshot folder of a Hub model, downloading what the cache lacks."""
    source = parse(uri)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import disable_progress_bars
    except ImportError as exc:
        raise HubError("Hub sources need the huggingface_hub package (pip install huggingface_hub)") from exc
    disable_progress_bars()
    started = time.monotonic()
    log.info("fetching %s from the Hugging Face Hub (or its cache)", source.uri)
    try:
        path = snapshot_download(repo_id=source.repo_id, revision=source.revision, allow_patterns=list(MODEL_FILES))
    except Exception as exc:  # noqa: BLE001 - offline misses, auth, network: all reported as this source's error
        raise HubError(f"{source.uri} could not be fetched: {type(exc).__name__}: {exc}") from exc
    local = Path(path)
    size = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
    log.info("%s ready at %s: %s in %s", source.uri, local, fmt_bytes(size), fmt_seconds(time.monotonic() - started))
    return local
