"""What a serve task shows about what it serves, kept current as the catalog changes.

The task's user properties (`router_url`, `served_models`, `device`), its input models (the registry
entries served: lineage from a model to the tasks that serve it) and the Model Endpoints page
follow the served set: with catalog polling, a model registered later appears there, and one
removed from the registry disappears, without a restart. `close()` (at the end, or from the
abort callback) takes the endpoints off the page.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from clearml_umem.clearml_io.endpoints import ModelEndpoints, reachable_url, register_endpoints
from clearml_umem.spec import ModelSpec

log = logging.getLogger(__name__)


def public_router_url(listen_url: str, public_url: str = "", private_ip: Callable[[], str] | None = None) -> str:
    """The router's base URL as others reach it: `public_url` when given (port publishing, a load
    balancer), else the listen URL with a wildcard address made this machine's private address."""
    if public_url.strip():
        return public_url.strip().rstrip("/")
    if private_ip is None:
        from clearml.utilities.networking import get_private_ip

        private_ip = get_private_ip
    return reachable_url(listen_url, private_ip)


class ServeTaskRecord:
    def __init__(self, task: Any, router_url: str, device: str = "") -> None:
        self.task = task
        self.router_url = router_url
        self.device = device
        """The card this router serves (`host/cuda:0=GPU N`): the fleet view names it."""
        self.endpoints: ModelEndpoints | None = None
        self._inputs: dict[str, str] = {}
        self._lock = threading.Lock()
        self._closed = False

    def update(self, specs: Sequence[ModelSpec]) -> None:
        """Make the task show exactly `specs` as served. Called on a worker thread: with a server,
        every call below is an HTTP request."""
        with self._lock:
            if self._closed:
                return
            self._properties(specs)
            self._input_models(specs)
            if self.endpoints is None:
                self.endpoints = register_endpoints(self.task, specs, self.router_url)
            else:
                try:
                    self.endpoints.sync(specs)
                except Exception:  # noqa: BLE001 - the page is a view; serving goes on without it
                    log.warning("could not update the Model Endpoints page", exc_info=True)

    def _properties(self, specs: Sequence[ModelSpec]) -> None:
        try:
            self.task.set_user_properties(
                router_url={"value": f"{self.router_url}/v1",
                            "description": "OpenAI-compatible base URL of the router"},
                served_models={"value": ",".join(s.name for s in specs),
                               "description": "models this router serves"},
                device={"value": self.device, "description": "the GPU this router serves (one per clearml-agent)"})
        except Exception:  # noqa: BLE001 - telling the UI must never stop serving
            log.warning("could not record the router URL on the task", exc_info=True)

    def _input_models(self, specs: Sequence[ModelSpec]) -> None:
        wanted = {s.name: s.model_id for s in specs if s.model_id}
        for name in [n for n, mid in self._inputs.items() if wanted.get(n) != mid]:
            if self._remove_input_model(name):
                self._inputs.pop(name)
        for name, model_id in wanted.items():
            if self._inputs.get(name) == model_id:
                continue
            try:
                self.task.set_input_model(model_id=model_id, name=name, update_task_design=False)
                self._inputs[name] = model_id
            except Exception:  # noqa: BLE001 - offline, the SDK cannot link registry models
                log.info("could not link model %s (%s) to the task as an input model", name, model_id)

    def _remove_input_model(self, name: str) -> bool:
        """The SDK has no public call to drop an input model; `tasks.delete_models` is the server's."""
        from clearml.backend_api.services import tasks

        try:
            self.task.send(tasks.DeleteModelsRequest(task=self.task.id, models=[{"name": name, "type": "input"}]))
            return True
        except Exception:  # noqa: BLE001 - offline or an older server: the link stays, serving goes on
            log.info("could not unlink input model %s from the task", name)
            return False

    def close(self) -> None:
        """Take the endpoints off the Model Endpoints page; safe from any thread, more than once."""
        with self._lock:
            self._closed = True
            endpoints, self.endpoints = self.endpoints, None
        if endpoints is not None:
            endpoints.close()
