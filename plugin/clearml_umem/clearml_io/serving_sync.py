"""Keep a clearml-serving service's endpoints in step with what a router serves.

clearml-serving needs one `custom_async` endpoint per model (serving/preprocess.py as its
code, the registry entry as its model, the statistics variables declared); adding them by hand
drifts as soon as the catalog changes. `clearml-umem serving-sync` reads the served models (a
serve task's input models and `served_models` property, or a router's `/v1/models`), then
adds the endpoints that are missing and removes the ones whose model left, through
clearml-serving's own `ModelRequestProcessor` (what its CLI calls), so the service's running
inference containers pick the change up as they pick up `clearml-serving model add`.

Only endpoints this command made are ever removed: each carries `umem_managed` in its
auxiliary configuration; endpoints added by hand are left alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANAGED_KEY = "umem_managed"
STATISTICS: dict[str, dict[str, Any]] = {
    "umem_served_from": {"type": "enum", "buckets": ["gpu", "ram", "disk", "cold"]},
    "umem_prompt_tokens": {"type": "scalar", "buckets": [0, 16, 64, 256, 1024, 4096, 16384]},
    "umem_completion_tokens": {"type": "scalar", "buckets": [0, 16, 64, 256, 1024, 4096]},
}
"""The variables serving/preprocess.py reports; clearml-serving drops the ones an endpoint does not declare."""


@dataclass
class SyncResult:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


def served_by_task(task_id: str) -> dict[str, str | None]:
    """The models a serve task serves now (kept current by it): name -> registry model ID or None."""
    from clearml import Task

    task = Task.get_task(task_id=task_id)
    task.reload()
    names = str((task.get_user_properties(value_only=True) or {}).get("served_models") or "")
    ids = {m.name: m.model for m in (task.data.models.input or [])} if task.data.models else {}
    return {name: ids.get(name) for name in (n.strip() for n in names.split(",")) if name}


def served_by_router(router_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> dict[str, str | None]:
    """The models a router serves, from its `/v1/models` (no registry IDs: the endpoints link no model)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = router_url.rstrip("/")
    base = base[: -len("/v1")] if base.endswith("/v1") else base
    answer = httpx.get(f"{base}/v1/models", headers=headers, timeout=timeout_s)
    answer.raise_for_status()
    return {str(m["id"]): None for m in answer.json().get("data", [])}


def _managed(endpoint: Any) -> bool:
    aux = endpoint.auxiliary_cfg
    return isinstance(aux, Mapping) and bool(aux.get(MANAGED_KEY))


def sync_service(service_id: str, served: Mapping[str, str | None], preprocess: Path, *,
                 dry_run: bool = False) -> SyncResult:
    """Add an endpoint per served model that has none, remove managed endpoints whose model left."""
    from clearml_serving.serving.endpoints import EndpointMetricLogging, ModelEndpoint
    from clearml_serving.serving.model_request_processor import ModelRequestProcessor

    if not preprocess.is_file():
        raise FileNotFoundError(f"the endpoint code {preprocess} does not exist (serving/preprocess.py of this "
                                "repository; --preprocess PATH)")
    processor = ModelRequestProcessor(task_id=service_id)
    processor.deserialize(skip_sync=True)
    endpoints = processor.get_endpoints()
    result = SyncResult()
    for url, endpoint in sorted(endpoints.items()):
        if not _managed(endpoint):
            continue
        name = endpoint.serving_url
        if name in served and (endpoint.model_id or None) == served[name]:
            result.kept.append(name)
            continue
        result.removed.append(name)
        if not dry_run:
            processor.remove_endpoint(url)
            processor.remove_metric_logging(url)
    taken = {e.serving_url for e in endpoints.values()}
    for name, model_id in sorted(served.items()):
        if name in result.kept or (name in taken and name not in result.removed):
            continue
        result.added.append(name)
        if dry_run:
            continue
        processor.add_endpoint(ModelEndpoint(engine_type="custom_async", serving_url=name, model_id=model_id,
                                             auxiliary_cfg={MANAGED_KEY: True, "model": name}),
                               preprocess_code=str(preprocess))
        processor.add_metric_logging(EndpointMetricLogging(endpoint=name, metrics=dict(STATISTICS)), update=True)
    if result.changed and not dry_run:
        processor.serialize()
    return result


def run_sync(args: Any) -> int:
    """`clearml-umem serving-sync`: once, or every `--watch` seconds until interrupted."""
    import os

    def served() -> dict[str, str | None]:
        if args.serve_task_id:
            return served_by_task(args.serve_task_id)
        return served_by_router(args.router_url, os.environ.get("UMEM_API_KEY") or None)

    while True:
        result = sync_service(args.service_id, served(), Path(args.preprocess), dry_run=args.dry_run)
        verb = "would add" if args.dry_run else "added"
        print(f"serving-sync {args.service_id}: {verb} {', '.join(result.added) or 'none'}; "
              f"{'would remove' if args.dry_run else 'removed'} {', '.join(result.removed) or 'none'}; "
              f"kept {', '.join(result.kept) or 'none'}", flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def add_sync_command(sub: Any) -> None:
    parser = sub.add_parser(
        "serving-sync", help="keep a clearml-serving service's endpoints in step with the served models",
        description="Add a custom_async endpoint (serving/preprocess.py, the registry model, the statistics "
                    "variables) for every served model that has none, and remove the endpoints this command made "
                    "whose model is no longer served. Hand-made endpoints are never touched.")
    parser.add_argument("--service-id", required=True, help="the clearml-serving service (clearml-serving create)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--serve-task-id", default="", help="a running serve task: its served models and their "
                                                            "registry IDs (the endpoints link the models)")
    source.add_argument("--router-url", default="", help="a router's base URL: its /v1/models (no model links); "
                                                         "its API key from UMEM_API_KEY")
    parser.add_argument("--preprocess", default="serving/preprocess.py",
                        help="the endpoint code (default: serving/preprocess.py, from the repository root)")
    parser.add_argument("--watch", type=float, default=0.0, help="repeat every N seconds (default 0: once)")
    parser.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    parser.set_defaults(func=run_sync)
