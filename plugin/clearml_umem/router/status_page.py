"""The status page: one static HTML file with its script and styles inline.

No build step and no external assets (the machines that serve models often have no network).
The page carries no data: its script asks for the key and polls `/admin/status` with it.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files


@lru_cache(maxsize=1)
def status_page() -> str:
    return files("clearml_umem.router").joinpath("static/status.html").read_text(encoding="utf-8")
