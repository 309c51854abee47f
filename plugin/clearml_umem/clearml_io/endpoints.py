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
    """One EndpointTelemetry per served model, fed from the event bus.

    `report=False` builds them without contacting the server (no registration, no report
    thread): what the page would show can then be read from each one's `container_info`."""

    def __init__(self, specs: Iterable[ModelSpec], base_url: str, app_server: str, *, report: bool = True) -> None:
        from clearml.router.endpoint_telemetry import EndpointTelemetry

        self.telemetry: dict[str, Any] = {}
        for spec in specs:
            fields = endpoint_fields(spec, base_url, app_server)
            if not report:
                fields.update(container_id=uuid.uuid4().hex, force_register=True, report_statistics=False)
            self.telemetry[spec.name] = EndpointTelemetry(**fields)

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
        for telemetry in self.telemetry.values():
            telemetry.stop()


def register_endpoints(task: Any, specs: Iterable[ModelSpec], router_url: str) -> ModelEndpoints | None:
    """Register the served models on the Model Endpoints page, when a server is there to show it."""
    from clearml import Task
    from clearml.utilities.networking import get_private_ip

    if Task.is_offline():
        return None
    try:
        return ModelEndpoints(specs, reachable_url(router_url, get_private_ip), task._get_app_server())
    except Exception:  # noqa: BLE001 - the page is a view; serving goes on without it
        log.warning("could not register the served models on the Model Endpoints page", exc_info=True)
        return None
