"""A ClearML pipeline in Python: register a model, then benchmark it per tier, by its model ID.

    python examples/pipeline.py                                  # builds a tiny model, runs offline
    python examples/pipeline.py --source /models/llama-3-8b --device-budget 20GB
    python examples/pipeline.py --source hf://org/name --queue gpu   # every step on an agent of queue gpu

Each step is a `PipelineDecorator.component`. The register step returns the registry model
ID; the benchmark step serves that entry from the model repository by its ID (what a serve
task does), so the steps pass models, not paths.

Where the steps run is one switch: `--queue NAME` enqueues every step to agents of that
queue (each component then names this checkout's remote and commit and the packages it
needs, so an agent can clone and install it; run from a clone with a remote). Without it, with a ClearML server,
`PipelineDecorator.run_locally()`: every step its own task, on this machine. With no server
(offline mode), `PipelineDecorator.debug_pipeline()`, steps as plain calls in this process:
run_locally needs the server to create the step tasks (clearml 2.1 fails offline with "Job
was not created and is also not cached/executed"), and offline there is no registry to serve
from, so the benchmark step serves the manifest the register step wrote, picking the entry
by the same model ID.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clearml import PipelineDecorator

PACKAGES = ["-e .[transformers]", "torch>=2.2"]
"""What a step needs on an agent, as the serve task records it: the package from the clone, torch."""


def agent_options(checkout: Path) -> dict[str, Any]:
    """What an agent needs to run a step: the repository to clone (this checkout's remote, at its
    commit) and the packages to install. A checkout without a remote cannot be run elsewhere."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    remote, commit = git("remote", "get-url", "origin"), git("rev-parse", "HEAD")
    if not remote or not commit:
        raise SystemExit(f"--queue: {checkout} has no git remote 'origin' (or no commit) for an agent to clone")
    return {"repo": remote, "repo_commit": commit, "packages": PACKAGES}


def register_model_step(source: str, manifest: str, tags: str = "pipeline") -> str:
    """Register the model (and write the manifest entry, for offline runs); hand its ID on."""
    from clearml import Task

    from clearml_umem.clearml_io.registry import register_model

    reg = register_model(source, tags=[t for t in tags.split(",") if t], manifest=manifest,
                         task=Task.current_task())
    print(f"registered {reg.name} ({reg.model_id or 'manifest only'}) -> {reg.uri}")
    return str(reg.model_id or "")


def benchmark_model_step(model_id: str, manifest: str = "", runs: int = 2, device_budget: str = "",
                         work_dir: str = "") -> dict[str, Any]:
    """Serve the registry entry `model_id`, measure TTFT per tier, report on the step's task."""
    from clearml import Task

    from clearml_umem.clearml_io.benchmark import run_benchmark, serve_config_for_model

    config, models = serve_config_for_model(model_id, manifest=manifest, port=0, device_budget=device_budget or None,
                                            work_dir=work_dir or None)
    task = Task.current_task()
    result = run_benchmark(config, models=models, runs=runs, probe_bytes=64 * 2**20,
                           logger=task.get_logger() if task is not None else None)
    print(result.markdown())
    return {"model_id": model_id, "probe_gbps": result.probe_gbps, "rows": result.rows()}


register_step: Any = None
benchmark_step: Any = None


def define_steps(on_agents: dict[str, Any] | None = None) -> None:
    """The two components, with what an agent needs when they run on agents (`on_agents`)."""
    global register_step, benchmark_step
    options = on_agents or {}
    register_step = PipelineDecorator.component(return_values=["model_id"], cache=False,
                                                task_type="data_processing", **options)(register_model_step)
    benchmark_step = PipelineDecorator.component(return_values=["results"], cache=False, task_type="testing",
                                                 **options)(benchmark_model_step)


@PipelineDecorator.pipeline(name="register and benchmark", project="clearml-umem", version="0.2.0")
def register_and_benchmark(source: str, manifest: str, runs: int = 2, device_budget: str = "",
                           work_dir: str = "") -> dict[str, Any]:
    model_id = register_step(source=source, manifest=manifest)
    return benchmark_step(model_id=model_id, manifest=manifest, runs=runs, device_budget=device_budget,
                          work_dir=work_dir)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from clearml_umem.clearml_io.session import use_offline_unless_configured
    from clearml_umem.tinymodels import DEMO_MODELS, ensure_tiny_models

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="", help="model directory or URI (default: build a tiny Llama)")
    parser.add_argument("--manifest", default="", help="manifest the register step writes (default: work dir)")
    parser.add_argument("--work-dir", default="~/.cache/clearml-umem/pipeline")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--device-budget", default="")
    parser.add_argument("--queue", default="", help="run every step on agents of this queue (default: this machine)")
    args = parser.parse_args(argv)

    work = Path(args.work_dir).expanduser()
    source = args.source or str(ensure_tiny_models(work / "models", DEMO_MODELS[:1], progress=print)["tiny-llama"])
    manifest = args.manifest or str(work / "models.yaml")
    if use_offline_unless_configured():
        if args.queue:
            raise SystemExit("--queue needs a ClearML server (clearml-init): agents take their work from it")
        define_steps()
        PipelineDecorator.debug_pipeline()
    elif args.queue:
        define_steps(agent_options(Path(__file__).resolve().parents[1]))
        PipelineDecorator.set_default_execution_queue(args.queue)
    else:
        define_steps()
        PipelineDecorator.run_locally()
    return register_and_benchmark(source=source, manifest=manifest, runs=args.runs,
                                  device_budget=args.device_budget, work_dir=str(work / "serve"))


if __name__ == "__main__":
    main(sys.argv[1:])
