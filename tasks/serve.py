"""ClearML task: serve many LLMs on one GPU behind one OpenAI-compatible router.

Every serve setting (model selector or manifest, budgets, policy, device, host, port,
catalog polling...) is a hyperparameter in the `Serve` section, so "clone -> edit ->
enqueue to a clearml-agent queue" deploys a new configuration from the web UI. The API
key is read only from the UMEM_API_KEY environment variable (set it on the agent), so it
never appears in the task.

Scalars on the task: TTFT per model and tier (count, p50, p95 per window), swap-in/out
seconds and GB/s, hits and misses per tier, device/host memory in use, requests per second,
all on an elapsed-seconds axis; the TTFT table (model x tier) and headline single values
every minute, at shutdown and when the task is aborted from the web UI (the abort callback
also takes the endpoints off the Model Endpoints page).

Deployment: the task records a default container for a GPU agent in Docker (image,
--ipc=host, --network=host, cache mounts; clearml_io/deployment.py) and its requirements (the
package, torch, vLLM unless `--engine transformers`) instead of the SDK's import scan.

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
from urllib.parse import urlsplit

from clearml_umem.clearml_io.deployment import record_serve_requirements, set_default_container
from clearml_umem.clearml_io.serve_record import ServeTaskRecord, public_router_url
from clearml_umem.clearml_io.session import use_offline_unless_configured
from clearml_umem.config import ConfigError, ServeConfig, add_serve_arguments

TASK_PROJECT = "clearml-umem"
TASK_NAME = "serve"
READY_PREFIX = "umem: serving on "
FOLLOW_PERIOD_S = 2.0
"""How often the served set is compared with what the task shows (in process; the SDK is called
only when it changed)."""

log = logging.getLogger("umem.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(parser)
    parser.add_argument("--serve-seconds", type=float, default=0.0,
                        help="stop after N seconds (0 = until SIGTERM/SIGINT); for smoke runs")
    parser.add_argument("--report-period", type=float, default=5.0, help="seconds between scalar flushes")
    parser.add_argument("--summary-period", type=float, default=60.0,
                        help="seconds between reports of the TTFT table and single values (0: only at the end)")
    parser.add_argument("--public-url", default="",
                        help="the router's base URL as clients reach it, when it is neither the listen address nor "
                             "this machine's private address (port publishing, a load balancer); default: derived")
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
    params["summary_period"] = args.summary_period
    params["public_url"] = args.public_url
    return params


def served_specs(server: Any) -> list[Any]:
    return [server.runtime.spec(name) for name in server.runtime.model_names()]


async def follow_catalog(server: Any, record: ServeTaskRecord, period_s: float = FOLLOW_PERIOD_S) -> None:
    """Keep the task's properties, input models and endpoints on what the router serves now.

    Read on the event loop (the runtime's own thread), written from a worker thread."""
    import asyncio

    shown: tuple[tuple[str, str | None], ...] | None = None
    while True:
        specs = served_specs(server)
        now = tuple((s.name, s.model_id) for s in specs)
        if now != shown:
            await asyncio.to_thread(record.update, specs)
            shown = now
        await asyncio.sleep(period_s)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from clearml import Task

    from clearml_umem.clearml_io.catalogs import build_catalog
    from clearml_umem.clearml_io.reporter import ClearMLReporter
    from clearml_umem.log_setup import setup_logging
    from clearml_umem.server import UnifiedMemoryServer

    setup_logging(str(args.log_level))
    offline = use_offline_unless_configured()
    record_serve_requirements(args.engine, ServeConfig(work_dir=args.work_dir).work_path)
    task = Task.init(project_name=args.task_project, task_name=args.task_name, task_type=Task.TaskTypes.inference,
                     auto_connect_arg_parser=False, auto_connect_frameworks=False, reuse_last_task_id=False)
    set_default_container(task)
    params = task.connect(task_parameters(args), name="Serve")
    reporter: ClearMLReporter | None = None
    records: list[ServeTaskRecord] = []
    try:
        config = ServeConfig.from_mapping(params).validate()
        public_host = urlsplit(str(params.get("public_url") or "")).hostname
        if public_host:
            # clients (clearml-serving's forwarder among them) reach it by that name: its Host header
            config.allowed_hosts = [*config.allowed_hosts, public_host]
        server = UnifiedMemoryServer(config, build_catalog(config))
        reporter = ClearMLReporter(task.get_logger(), flush_period_s=float(params.get("report_period") or 5.0),
                                   summary_period_s=float(params.get("summary_period") or 0))
        reporter.attach(server.bus)

        def stop(*_: object) -> None:
            server.request_stop()

        def on_abort() -> None:
            """Aborted from the web UI: the agent kills the process tree after this returns, so the
            summary and the endpoints' removal happen here, not after serving ends."""
            log.warning("task aborted: reporting the summary and removing the endpoints")
            if reporter is not None:
                reporter.close()
            for record in records:
                record.close()
            server.request_stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if not offline:
            try:
                task.register_abort_callback(on_abort, callback_execution_timeout=30.0)
            except Exception:  # noqa: BLE001 - without it an abort loses only the last summary period
                log.warning("could not register the abort callback", exc_info=True)
        seconds = float(params.get("serve_seconds") or 0)
        if seconds > 0:
            timer = threading.Timer(seconds, stop)
            timer.daemon = True
            timer.start()

        import asyncio

        def ready(url: str) -> None:
            print(f"{READY_PREFIX}{url}", flush=True)
            record = ServeTaskRecord(task, public_router_url(url, str(params.get("public_url") or "")),
                                     device=server.device)
            records.append(record)
            # on the event loop (ready is called there); the SDK calls run on a worker thread
            follower = asyncio.get_running_loop().create_task(follow_catalog(server, record))
            followers.append(follower)

        followers: list[Any] = []
        asyncio.run(server.serve(ready=ready))
        return 0
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    finally:
        if reporter is not None:
            reporter.close()
        for record in records:
            record.close()
        task.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
