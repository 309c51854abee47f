"""Where the routers are: a static list of URLs (no ClearML server: the embedded default), or the
running serve tasks of a ClearML project, read through the SDK (each task publishes its router's
URL as the `router_url` user property when it starts serving)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ROUTER_URL_PROPERTY = "router_url"


def normalize(url: str) -> str:
    """A router's base URL, as given or as the task published it (`.../v1`)."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"a router URL must be http(s)://host:port, got {url!r}")
    return url


@dataclass(frozen=True)
class StaticRouters:
    urls: tuple[str, ...]

    @classmethod
    def parse(cls, text: str | Sequence[str]) -> StaticRouters:
        parts = text.split(",") if isinstance(text, str) else list(text)
        urls = tuple(dict.fromkeys(normalize(p) for p in parts if p.strip()))
        if not urls:
            raise ValueError("no router URL given")
        return cls(urls)

    def __call__(self) -> list[str]:
        return list(self.urls)

    def describe(self) -> str:
        return f"static list of {len(self.urls)} router(s)"


@dataclass(frozen=True)
class ClearMLRouters:
    """Running (in progress) tasks of `project`, with all `tags` if given, that publish a router URL."""

    project: str
    tags: tuple[str, ...] = field(default_factory=tuple)

    def __call__(self) -> list[str]:
        from clearml import Task

        found = Task.query_tasks(project_name=self.project, tags=list(self.tags) or None,
                                 task_filter={"status": ["in_progress"]}, additional_return_fields=["hyperparams"])
        urls = []
        for row in found:
            value = _property(row.get("hyperparams"), ROUTER_URL_PROPERTY)
            if value:
                try:
                    urls.append(normalize(value))
                except ValueError:
                    continue
        return list(dict.fromkeys(urls))

    def describe(self) -> str:
        tags = f" tagged {', '.join(self.tags)}" if self.tags else ""
        return f"running serve tasks of ClearML project {self.project!r}{tags}"


def _property(hyperparams: Any, name: str) -> str | None:
    """A user property (hyperparameter section `properties`), as a dict or as the SDK's parsed item."""
    section = (hyperparams or {}).get("properties") if isinstance(hyperparams, dict) else None
    item = section.get(name) if isinstance(section, dict) else None
    value = item.get("value") if isinstance(item, dict) else getattr(item, "value", None)
    return str(value) if value else None
