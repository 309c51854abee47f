"""A ClearML pipeline in Python: register a model, then benchmark it per tier.

    python examples/pipeline.py                                  # builds a tiny model, runs offline
    python examples/pipeline.py --source /models/llama-3-8b --device-budget 20GB

Each step is a `PipelineDecorator.component`. With a ClearML server configured the
pipeline runs with `PipelineDecorator.run_locally()`: every step becomes its own task,
executed on this machine, no agent needed. With no server (offline mode) it runs with
`PipelineDecorator.debug_pipeline()`, steps as plain calls in this process: run_locally
needs the server to create the step tasks (clearml 2.1 fails offline with "Job was not
created and is also not cached/executed"). The pipeline task itself is recorded either way.

The register step writes a manifest as well as the registry entry, so the benchmark step
serves from it in both modes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from clearml import PipelineDecorator


@PipelineDecorator.component(return_values=["manifest"], cache=False, task_type="data_processing")
def register_step(source: str, manifest: str, tags: str = "pipeline") -> str:
    """Register the model and hand the manifest path to the next step."""
    from clearml import Task

    from clearml_umem.clearml_io.registry import register_model

    reg = register_model(source, tags=[t for t in tags.split(",") if t], manifest=manifest,
                         task=Task.current_task())
    print(f"registered {reg.name} ({reg.model_id or 'manifest only'}) -> {reg.uri}")
    return manifest


@PipelineDecorator.component(return_values=["results"], cache=False, task_type="testing")
def benchmark_step(manifest: str, runs: int = 2, device_budget: str = "", work_dir: str = "") -> dict[str, Any]:
    """Serve the manifest, measure TTFT per tier, report on the step's task (or the pipeline's)."""
    from clearml import Task

    from clearml_umem.clearml_io.benchmark import run_benchmark
    from clearml_umem.config import DEFAULT_WORK_DIR, ServeConfig

    config = ServeConfig(manifest=manifest, port=0, device_budget=device_budget or None,
                         work_dir=work_dir or DEFAULT_WORK_DIR).validate()
    task = Task.current_task()
    result = run_benchmark(config, runs=runs, probe_bytes=64 * 2**20,
                           logger=task.get_logger() if task is not None else None)
    print(result.markdown())
    return {"probe_gbps": result.probe_gbps, "rows": result.rows()}


@PipelineDecorator.pipeline(name="register and benchmark", project="clearml-umem", version="0.1.0")
def register_and_benchmark(source: str, manifest: str, runs: int = 2, device_budget: str = "",
                           work_dir: str = "") -> dict[str, Any]:
    registered = register_step(source=source, manifest=manifest)
    return benchmark_step(manifest=registered, runs=runs, device_budget=device_budget, work_dir=work_dir)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from pathlib import Path

    from clearml_umem.clearml_io.session import use_offline_unless_configured
    from clearml_umem.tinymodels import DEMO_MODELS, ensure_tiny_models

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="", help="model directory or URI (default: build a tiny Llama)")
    parser.add_argument("--manifest", default="", help="manifest the register step writes (default: work dir)")
    parser.add_argument("--work-dir", default="~/.cache/clearml-umem/pipeline")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--device-budget", default="")
    args = parser.parse_args(argv)

    work = Path(args.work_dir).expanduser()
    source = args.source or str(ensure_tiny_models(work / "models", DEMO_MODELS[:1], progress=print)["tiny-llama"])
    manifest = args.manifest or str(work / "models.yaml")
    if use_offline_unless_configured():
        PipelineDecorator.debug_pipeline()
    else:
        PipelineDecorator.run_locally()
    results = register_and_benchmark(source=source, manifest=manifest, runs=args.runs,
                                     device_budget=args.device_budget, work_dir=str(work / "serve"))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
