"""Each served model on ClearML's Model Endpoints page.

clearml-serving shows its endpoints there by registering each one with the server's
`serving` service through the SDK's `EndpointTelemetry`, which then reports the request
count, mean latency and the machine's load every 30 s. The router does the same for every
model it serves, with the model's OpenAI base URL as the endpoint: users find the models on
the page they already use, linked to the serving task and to the registry entry.

Offline the SDK sends nothing (its session answers None, which `EndpointTelemetry`'s own
thread would trip over), so endpoints are registered only when a server is configured.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from clearml_umem.events import Event, RequestFinished
from clearml_umem.spec import ModelSpec

log = logging.getLogger(__name__)

_ANY_HOST = ("0.0.0.0", "::", "")


def reachable_url(router_url: str, private_ip: Callable[[], str]) -> str:
    """The router's URL as another machine reaches it: a wildcard listen address says nothing,
    so it becomes this machine's private address (as clearml-serving does for its endpoints)."""
    parts = urlsplit(router_url)
    if (parts.hostname or "") not in _ANY_HOST:
        return router_url
    host = private_ip()
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def endpoint_fields(spec: ModelSpec, base_url: str, app_server: str) -> dict[str, Any]:
    """What the Model Endpoints page shows for one served model (EndpointTelemetry's arguments)."""
    fields: dict[str, Any] = {
        "endpoint_name": spec.name,
        "model_name": spec.name,
        "model_source": "ClearML" if spec.model_id else "clearml-unified-memory",
        "tags": list(spec.tags),
        "input_type": "openai",
        "endpoint_url": f"{base_url.rstrip('/')}/v1",
    }
    if spec.model_id:
        fields["model"] = spec.model_id
        fields["model_url"] = f"{app_server.rstrip('/')}/projects/*/models/{spec.model_id}/general"
    return fields


class ModelEndpoints:
    """One EndpointTelemetry per served model, fed from the event bus, following the served set.

    `report=False` builds them without contacting the server (no registration, no report
    thread): what the page would show can then be read from each one's `container_info`.
    A model that leaves (the catalog changed, the task ends or is aborted) is unregistered
    from the page (`serving.unregister_container`), so the page never lists a dead endpoint."""

    def __init__(self, specs: Iterable[ModelSpec], base_url: str, app_server: str, *, report: bool = True) -> None:
        self.base_url = base_url
        self.app_server = app_server
        self.report = report
        self.telemetry: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.sync(specs)

    def _create(self, spec: ModelSpec) -> Any:
        from clearml.router.endpoint_telemetry import EndpointTelemetry

        fields = endpoint_fields(spec, self.base_url, self.app_server)
        if not self.report:
            fields.update(container_id=uuid.uuid4().hex, force_register=True, report_statistics=False)
        return EndpointTelemetry(**fields)

    def sync(self, specs: Iterable[ModelSpec]) -> None:
        """Register the models that joined, unregister the ones that left."""
        wanted = {spec.name: spec for spec in specs}
        with self._lock:
            for name in [n for n in self.telemetry if n not in wanted]:
                self._unregister(self.telemetry.pop(name))
            for name, spec in wanted.items():
                if name not in self.telemetry:
                    self.telemetry[name] = self._create(spec)

    def _unregister(self, telemetry: Any) -> None:
        telemetry.stop()
        if not self.report:
            return
        try:
            telemetry.session.send_request("serving", "unregister_container",
                                           json={"container_id": telemetry.container_info["container_id"]})
        except Exception:  # noqa: BLE001 - an older server without the call: the page drops it after its timeout
            log.info("could not unregister endpoint %s", telemetry.container_info.get("endpoint_name"))

    def on_event(self, event: Event) -> None:
        """A finished request counts with its own duration (EndpointTelemetry times one request
        at a time; the router runs many at once, so each is timed where it ran)."""
        if not isinstance(event, RequestFinished):
            return
        telemetry = self.telemetry.get(event.model)
        if telemetry is not None:
            telemetry.last_request_time = time.time() - event.duration_s
            telemetry.update_statistics()

    def close(self) -> None:
        self.sync([])


def register_endpoints(task: Any, specs: Iterable[ModelSpec], router_url: str) -> ModelEndpoints | None:
    """Register the served models on the Model Endpoints page, when a server is there to show it."""
    from clearml import Task

    if Task.is_offline():
        return None
    try:
        return ModelEndpoints(specs, router_url, task._get_app_server())
    except Exception:  # noqa: BLE001 - the page is a view; serving goes on without it
        log.warning("could not register the served models on the Model Endpoints page", exc_info=True)
        return None
