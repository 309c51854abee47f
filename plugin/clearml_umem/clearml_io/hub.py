"""Models from the Hugging Face Hub: `hf://org/name[@revision][/file]` as a weights URI.

A file names one GGUF of a repository that holds several quantizations. Registration pins
the entry to the commit it read (`pinned`), so what is served cannot drift when the branch moves.

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
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_URI = re.compile(r"^(?P<repo>[^/@]+/[^/@]+)(?:@(?P<revision>[^/]*))?(?:/(?P<file>.+))?$")


class HubError(ValueError):
    """The Hub source is malformed or cannot be fetched; the message says which and why."""


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    revision: str | None = None
    filename: str | None = None

    @property
    def uri(self) -> str:
        return (f"{SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")
                + (f"/{self.filename}" if self.filename else ""))

    @property
    def is_pinned(self) -> bool:
        return bool(self.revision and _COMMIT.match(self.revision))

    @property
    def name(self) -> str:
        return self.repo_id.split("/", 1)[1]


def is_hub_uri(uri: str) -> bool:
    return uri.startswith(SCHEME)


def parse(uri: str) -> HubSource:
    """`hf://org/name`, `hf://org/name@revision` (a branch, tag or commit), either with `/file` after."""
    if not is_hub_uri(uri):
        raise HubError(f"not a Hub source: {uri!r} (expected hf://org/name[@revision][/file])")
    match = _URI.match(uri[len(SCHEME):])
    if match is None or not _REPO_ID.match(match["repo"]) or ".." in match["repo"]:
        raise HubError(f"{uri!r}: the repository must be org/name")
    if match["revision"] is not None and not match["revision"]:
        raise HubError(f"{uri!r}: empty revision after '@'")
    filename = match["file"]
    if filename is not None and (".." in filename.split("/") or filename.startswith("/") or not filename.strip("/")):
        raise HubError(f"{uri!r}: the file must be a path inside the repository")
    return HubSource(match["repo"], match["revision"] or None, filename)


def pinned(uri: str, snapshot: Path) -> str:
    """`uri` at the commit its fetched snapshot is (huggingface_hub names snapshot folders by commit)."""
    source = parse(uri)
    commit = snapshot.name if snapshot.is_dir() else snapshot.parent.name
    if not _COMMIT.match(commit):
        return uri
    return HubSource(source.repo_id, commit, source.filename).uri


def fetch(uri: str) -> Path:
    """The local snapshot folder of a Hub model (or the named file in it), downloading what the cache lacks."""
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
        patterns = [source.filename] if source.filename else list(MODEL_FILES)
        path = snapshot_download(repo_id=source.repo_id, revision=source.revision, allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001 - offline misses, auth, network: all reported as this source's error
        raise HubError(f"{source.uri} could not be fetched: {type(exc).__name__}: {exc}") from exc
    local = Path(path)
    if source.filename:
        local = local / source.filename
        if not local.is_file():
            raise HubError(f"{source.uri}: the repository has no file {source.filename!r} at that revision")
    size = local.stat().st_size if local.is_file() else sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
    log.info("%s ready at %s: %s in %s", source.uri, local, fmt_bytes(size), fmt_seconds(time.monotonic() - started))
    return local
