"""Starting the router leaves the process's logging alone.

uvicorn's default log config runs `logging.config.dictConfig`, which closes every handler the
process has while it holds logging's lock. In a ClearML serve task one of them is the SDK's
TaskHandler, whose close joins its sender thread, and that thread was waiting for the same lock
to log an HTTP call: the task hung after its start banner (seen in CI; `py-spy dump` showed
both threads). A handler closed by the router start is the whole bug, so that is what is checked,
with a real router in this process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx

from clearml_umem.catalog import write_manifest
from clearml_umem.config import ServeConfig
from clearml_umem.server import UnifiedMemoryServer
from clearml_umem.spec import spec_from_mapping


class WatchedHandler(logging.Handler):
    """Stands in for ClearML's TaskHandler: records what reaches it and whether it was closed."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.messages: list[str] = []
        self.closed = False

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def close(self) -> None:
        self.closed = True
        super().close()


def test_starting_the_router_closes_no_logging_handler_of_the_process(tmp_path: Path,
                                                                        tiny_models: dict[str, Path]) -> None:
    manifest = tmp_path / "models.yaml"
    write_manifest(manifest, [spec_from_mapping({"name": "tiny-llama", "weights": str(tiny_models["tiny-llama"])})])
    config = ServeConfig(manifest=str(manifest), port=0, device="cpu", device_budget="1GB", host_budget="1GB",
                         work_dir=str(tmp_path / "work"), catalog_poll_seconds=0).validate()
    root = logging.getLogger()
    watched = WatchedHandler()
    root.addHandler(watched)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        with UnifiedMemoryServer(config).run_in_thread() as url:
            assert httpx.get(url + "/health", timeout=30).status_code == 200
            logging.getLogger("clearml_umem.test").info("a line after the start")
        assert not watched.closed, "the router's start closed a logging handler it did not own"
        assert "a line after the start" in watched.messages
        assert root.handlers.count(watched) == 1
    finally:
        root.removeHandler(watched)
        root.setLevel(level)
