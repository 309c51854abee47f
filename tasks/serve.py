"""ClearML task: serve many LLMs on one GPU behind one OpenAI-compatible router.

Every serve setting (model selector or manifest, budgets, policy, device, host, port,
catalog polling...) is a hyperparameter in the `Serve` section, so "clone -> edit ->
enqueue to a clearml-agent queue" deploys a new configuration from the web UI. The API
key is read only from the UMEM_API_KEY environment variable (set it on the agent), so it
never appears in the task.

Scalars on the task: TTFT per model and per tier, swap-in/out seconds and GB/s, hits and
misses per tier, device/host memory in use, requests per second; on shutdown a TTFT
table (model x tier) and headline single values.

    python tasks/serve.py --clearml-project llms --device-budget 70GB
    python tasks/serve.py --manifest models.yaml --port 8000          # no server: offline
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from clearml_umem.clearml_io.endpoints import ModelEndpoints, register_endpoints
from clearml_umem.clearml_io.session import use_offline_unless_configured
from clearml_umem.config import ConfigError, ServeConfig, add_serve_arguments

TASK_PROJECT = "clearml-umem"
TASK_NAME = "serve"
READY_PREFIX = "umem: serving on "

log = logging.getLogger("umem.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(parser)
    parser.add_argument("--serve-seconds", type=float, default=0.0,
                        help="stop after N seconds (0 = until SIGTERM/SIGINT); for smoke runs")
    parser.add_argument("--report-period", type=float, default=5.0, help="seconds between scalar flushes")
    parser.add_argument("--task-project", default=TASK_PROJECT, help="project of this task (not a hyperparameter)")
    parser.add_argument("--task-name", default=TASK_NAME, help="name of this task (not a hyperparameter)")
    return parser


def task_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """Serve settings as the web UI edits them: lists as comma-separated text, unset as empty."""
    config = ServeConfig(**{k: v for k, v in vars(args).items() if k in ServeConfig.__dataclass_fields__})
    params: dict[str, Any] = {}
    for key, value in config.public_dict().items():
        if isinstance(value, list):
            value = ",".join(value)
        params[key] = "" if value is None else value
    params["serve_seconds"] = args.serve_seconds
    params["report_period"] = args.report_period
    return params


def record_endpoint(task: Any, server: Any, url: str) -> ModelEndpoints | None:
    """Where the models are served, on the task: the router's URL and the served models as user
    properties (shown in the web UI's task info), registry models as the task's input models,
    and, with a server, each model on the Model Endpoints page (fed from the event bus)."""
    names = server.runtime.model_names()
    try:
        task.set_user_properties(
            router_url={"value": f"{url}/v1", "description": "OpenAI-compatible base URL of the router"},
            served_models={"value": ",".join(names), "description": "models this router serves"})
    except Exception:  # noqa: BLE001 - telling the UI must never stop serving
        log.warning("could not record the router URL on the task", exc_info=True)
    for name in names:
        model_id = server.runtime.spec(name).model_id
        if not model_id:
            continue
        try:
            task.set_input_model(model_id=model_id, name=name, update_task_design=False)
        except Exception:  # noqa: BLE001 - offline, the SDK cannot link registry models
            log.info("could not link model %s (%s) to the task as an input model", name, model_id)
    endpoints = register_endpoints(task, [server.runtime.spec(name) for name in names], url)
    if endpoints is not None:
        server.bus.subscribe(endpoints.on_event)
    return endpoints


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from clearml import Task

    from clearml_umem.clearml_io.reporter import ClearMLReporter
    from clearml_umem.log_setup import setup_logging
    from clearml_umem.server import UnifiedMemoryServer

    setup_logging(str(args.log_level))
    use_offline_unless_configured()
    task = Task.init(project_name=args.task_project, task_name=args.task_name, task_type=Task.TaskTypes.inference,
                     auto_connect_arg_parser=False, auto_connect_frameworks=False, reuse_last_task_id=False)
    params = task.connect(task_parameters(args), name="Serve")
    reporter: ClearMLReporter | None = None
    endpoints: list[ModelEndpoints] = []
    try:
        config = ServeConfig.from_mapping(params).validate()
        server = UnifiedMemoryServer(config)
        reporter = ClearMLReporter(task.get_logger(), flush_period_s=float(params.get("report_period") or 5.0))
        reporter.attach(server.bus)

        def stop(*_: object) -> None:
            server.request_stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        seconds = float(params.get("serve_seconds") or 0)
        if seconds > 0:
            timer = threading.Timer(seconds, stop)
            timer.daemon = True
            timer.start()

        import asyncio

        def ready(url: str) -> None:
            print(f"{READY_PREFIX}{url}", flush=True)
            # off the event loop: with a server, the SDK calls are HTTP requests
            def record() -> None:
                if (registered := record_endpoint(task, server, url)) is not None:
                    endpoints.append(registered)

            threading.Thread(target=record, daemon=True).start()

        asyncio.run(server.serve(ready=ready))
        return 0
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    finally:
        if reporter is not None:
            reporter.close()
        for registered in endpoints:
            registered.close()
        task.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
