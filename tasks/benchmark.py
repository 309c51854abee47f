"""ClearML task: time-to-first-token per tier, and swap speed against the measured bandwidth.

For each selected model, before every measured request the model is put in a tier with
`POST /admin/models/{name}/place`: hot (GPU), after a swap from RAM, after an engine
reload from disk, and from a cold start; each several times (median and spread).
Host-to-device bandwidth is probed in the same run, with as many bytes as each model's
weights, so a swap's GB/s is reported as a share of what the link did that day for that
size rather than of a datasheet number.

Recorded on the task as scalars, a table and a bar chart, as Markdown text (shown on the
console), and as the artifact `benchmark` (every measurement, JSON).

    python tasks/benchmark.py --manifest models.yaml --runs 5
    python tasks/benchmark.py --clearml-project llms --device-budget 70GB --models llama-8b,qwen-7b
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict

from clearml_umem.clearml_io.benchmark import BenchmarkResult, run_benchmark
from clearml_umem.clearml_io.session import use_offline_unless_configured
from clearml_umem.config import ServeConfig, add_serve_arguments

TASK_PROJECT = "clearml-umem"
TASK_NAME = "benchmark"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(parser)
    parser.add_argument("--models", default="", help="comma-separated model names (default: all served)")
    parser.add_argument("--runs", type=int, default=3, help="measured requests per model and scenario")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--probe-mb", type=int, default=0,
                        help="bytes copied by the bandwidth probe, in MiB; 0 (default): one probe per model, "
                             "of the model's own size")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument("--task-project", default=TASK_PROJECT, help="project of this task (not a hyperparameter)")
    parser.add_argument("--task-name", default=TASK_NAME, help="name of this task (not a hyperparameter)")
    return parser


def main(argv: Sequence[str] | None = None) -> BenchmarkResult:
    from clearml import Task

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    use_offline_unless_configured()
    task = Task.init(project_name=args.task_project, task_name=args.task_name, task_type=Task.TaskTypes.testing,
                     auto_connect_arg_parser=False, auto_connect_frameworks=False, reuse_last_task_id=False)
    serve_params = {k: ("" if v is None else ",".join(v) if isinstance(v, list) else v)
                    for k, v in ServeConfig(**{k: v for k, v in vars(args).items()
                                               if k in ServeConfig.__dataclass_fields__}).public_dict().items()}
    serve_params = task.connect(serve_params, name="Serve")
    bench = task.connect({"models": args.models, "runs": args.runs, "max_tokens": args.max_tokens,
                          "probe_mb": args.probe_mb}, name="Benchmark")
    try:
        config = ServeConfig.from_mapping(serve_params).validate()
        result = run_benchmark(config, models=[m.strip() for m in str(bench["models"]).split(",") if m.strip()],
                               runs=int(bench["runs"]), max_tokens=int(bench["max_tokens"]),
                               probe_bytes=int(bench["probe_mb"]) * 2**20 or None, logger=task.get_logger())
        # the table reaches the console once: report() logs it as the task's text, which the SDK echoes
        # the results as an artifact: the numbers travel with the task, not in a local file
        task.upload_artifact("benchmark", artifact_object={**asdict(result), "table": result.rows()},
                             wait_on_upload=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(asdict(result), fh, indent=2)
        return result
    finally:
        task.close()


if __name__ == "__main__":
    main(sys.argv[1:])
