"""Read what a ClearML offline session recorded.

Offline, the SDK writes one folder per task under `<cache>/offline/<task id>/` (the cache
is ~/.clearml/cache, or CLEARML_CACHE_DIR) and zips it next to the folder on close:
- `task.json`: the task as exported (name, project, `hyperparams` by section,
  `offline_output_models` with each output model's init arguments and weights URI);
- `metrics.jsonl`: lines, each a JSON list of events: `training_stats_scalar`
  (metric = title, variant = series, iter, value; single values use metric "Summary"
  and the minimum int32 iteration) and `plot` (plot_str is the Plotly JSON of tables,
  histograms...);
- `log.jsonl`: console output; `data/`: uploaded artifacts and debug samples.

Tests assert on this instead of on a server, and users can check a run before importing
it with `clearml-task --import-offline-session` / `Task.import_offline_session`.
"""

from __future__ import annotations

import json
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SINGLE_VALUE_ITERATION = -(2**31)
SINGLE_VALUE_METRIC = "Summary"


def offline_root(cache_dir: str | Path | None = None) -> Path:
    """Where the SDK keeps offline sessions, as the SDK computes it."""
    if cache_dir is not None:
        return Path(cache_dir) / "offline"
    from clearml.config import get_offline_dir

    return Path(get_offline_dir())


@dataclass
class OfflineSession:
    """One task's offline session, read from its folder or its zip."""

    source: Path
    task: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    log_lines: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> OfflineSession:
        path = Path(path)
        if path.is_dir():
            files = {name: (path / name).read_text() for name in ("task.json", "metrics.jsonl", "log.jsonl")
                     if (path / name).is_file()}
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = set(zf.namelist())
                files = {name: zf.read(name).decode() for name in ("task.json", "metrics.jsonl", "log.jsonl")
                         if name in names}
        else:
            raise FileNotFoundError(f"no offline session at {path} (a session folder or its .zip)")
        if "task.json" not in files:
            raise FileNotFoundError(f"{path} has no task.json: not a ClearML offline session")
        events: list[dict[str, Any]] = []
        for line in files.get("metrics.jsonl", "").splitlines():
            if line.strip():
                chunk = json.loads(line)
                events.extend(chunk if isinstance(chunk, list) else [chunk])
        logs: list[str] = []
        for line in files.get("log.jsonl", "").splitlines():
            if not line.strip():
                continue
            chunk = json.loads(line)
            for item in chunk if isinstance(chunk, list) else [chunk]:
                if isinstance(item, dict) and item.get("msg") is not None:
                    logs.extend(str(item["msg"]).splitlines())
        return cls(source=path, task=json.loads(files["task.json"]), events=events, log_lines=logs)

    @classmethod
    def find(cls, task_id: str | None = None, *, task_name: str | None = None,
             cache_dir: str | Path | None = None) -> OfflineSession:
        """A session by task id, or the newest one (optionally with a given task name)."""
        root = offline_root(cache_dir)
        if task_id:
            folder = root / task_id
            return cls.load(folder if folder.is_dir() else folder.with_suffix(".zip"))
        candidates = sorted((p for p in root.glob("offline-*") if p.is_dir()), key=lambda p: p.stat().st_mtime,
                            reverse=True)
        for folder in candidates:
            session = cls.load(folder)
            if task_name is None or session.name == task_name:
                return session
        raise FileNotFoundError(f"no offline session{f' named {task_name!r}' if task_name else ''} under {root}")

    @property
    def task_id(self) -> str:
        return str(self.task.get("id", ""))

    @property
    def name(self) -> str:
        return str(self.task.get("name", ""))

    @property
    def project(self) -> str:
        return str(self.task.get("project_name", ""))

    @property
    def hyperparams(self) -> dict[str, dict[str, str]]:
        """`{section: {name: value}}` as the web UI shows them (values are strings)."""
        out: dict[str, dict[str, str]] = {}
        for section, params in (self.task.get("hyperparams") or {}).items():
            out[section] = {name: str(p.get("value", "")) for name, p in params.items()}
        return out

    @property
    def output_models(self) -> list[dict[str, Any]]:
        """Models the task registered offline: `init` (name, tags, framework, config) and `weights` (URI)."""
        return list(self.task.get("offline_output_models") or [])

    def scalars(self) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """`{title: {series: [(iteration, value), ...]}}`, single values excluded."""
        out: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
        for e in self.events:
            if e.get("type") == "training_stats_scalar" and e.get("iter") != SINGLE_VALUE_ITERATION:
                out[e["metric"]][e["variant"]].append((int(e["iter"]), float(e["value"])))
        return {title: dict(series) for title, series in out.items()}

    def values(self, title: str, series: str) -> list[float]:
        return [v for _, v in self.scalars().get(title, {}).get(series, [])]

    def single_values(self) -> dict[str, float]:
        return {e["variant"]: float(e["value"]) for e in self.events
                if e.get("type") == "training_stats_scalar" and e.get("iter") == SINGLE_VALUE_ITERATION}

    def plots(self) -> list[dict[str, Any]]:
        """Each plot with its `title`, `series`, `iteration` and decoded Plotly `figure`."""
        out = []
        for e in self.events:
            if e.get("type") == "plot":
                figure = json.loads(e["plot_str"]) if isinstance(e.get("plot_str"), str) else e.get("plot_str")
                out.append({"title": e.get("metric"), "series": e.get("variant"), "iteration": e.get("iter"),
                            "figure": figure})
        return out

    def table(self, title: str, series: str | None = None) -> list[list[Any]]:
        """A reported table as rows, header first; the last one reported when it was reported several times."""
        found: list[list[Any]] | None = None
        for plot in self.plots():
            if plot["title"] != title or (series is not None and plot["series"] != series):
                continue
            for trace in plot["figure"].get("data", []):
                if trace.get("type") == "table":
                    header = list(trace["header"]["values"])
                    columns = trace["cells"]["values"]
                    found = [header, *[list(row) for row in zip(*columns, strict=False)]]
        if found is not None:
            return found
        raise KeyError(f"no table {title!r}{f' / {series!r}' if series else ''} in {self.source}")
