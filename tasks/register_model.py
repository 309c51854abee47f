"""ClearML task: register an LLM in the ClearML model repository for clearml-unified-memory.

Run it once from a shell; afterwards the web UI can clone it, edit the `Args` section
(source, name, tags...) and enqueue it to an agent, because every argument is connected
to the task as a hyperparameter and read back from it.

    python tasks/register_model.py --source /models/llama-3-8b --name llama-3-8b --tags chat
    python tasks/register_model.py --source s3://bucket/llama/ --size-bytes 16060522496 --dtype bfloat16
    python tasks/register_model.py --source ./tiny --manifest models.yaml     # no server: offline
    python tasks/register_model.py --source ./model-q8_0.gguf                 # engine llamacpp, facts from the header

With no ClearML server configured the task runs in offline mode: the model is recorded
as the task's output model in the offline session, and `--manifest` writes the entry the
local catalog serves from.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from clearml_umem.clearml_io.registry import DEFAULT_PROJECT, Registration, register_model
from clearml_umem.clearml_io.session import use_offline_unless_configured

TASK_PROJECT = "clearml-umem"
TASK_NAME = "register model"

log = logging.getLogger("umem.register")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="", help="local Hugging Face directory, GGUF file, or weights URI (s3://, "
                                                "gs://, https://, file://, fileserver URL)")
    p.add_argument("--name", default="", help="model name in the registry (default: directory or file name)")
    p.add_argument("--project", default=DEFAULT_PROJECT, help="registry project of the model")
    p.add_argument("--tags", default="", help="comma-separated extra tags (umem-servable is always added)")
    p.add_argument("--engine", default="auto", help="preferred engine: transformers, vllm, llamacpp, or auto: "
                                                    "llamacpp for a GGUF file, else transformers")
    p.add_argument("--dtype", default="", help="weights dtype (default: from config.json / safetensors)")
    p.add_argument("--context-length", type=int, default=0, help="max context (default: from config.json)")
    p.add_argument("--parameters", type=int, default=0, help="parameter count (default: from the weights)")
    p.add_argument("--size-bytes", type=int, default=0, help="weights size; required for remote sources")
    p.add_argument("--quantization", default="", help="quantization method, if any (awq, gptq, fp8...)")
    p.add_argument("--serve-name", default="", help="name clients use, when it differs from the registry name")
    p.add_argument("--framework", default="PyTorch", help="ClearML framework of the entry")
    p.add_argument("--comment", default="", help="description shown in the model repository")
    p.add_argument("--upload", action="store_true", help="zip and upload local weights instead of referencing them")
    p.add_argument("--upload-uri", default="", help="where --upload puts them (default: task output / fileserver)")
    p.add_argument("--manifest", default="", help="also write the entry into this local manifest (YAML/JSON)")
    p.add_argument("--task-project", default=TASK_PROJECT, help="project of this task (not a hyperparameter)")
    p.add_argument("--task-name", default=TASK_NAME, help="name of this task (not a hyperparameter)")
    return p


def hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments the web UI edits; the task's own project and name are not among them."""
    params = {k: v for k, v in vars(args).items() if k not in ("task_project", "task_name")}
    params["tags"] = params.get("tags") or ""
    return params


def register_from_params(params: dict[str, Any], task: Any = None) -> Registration:
    """Register from hyperparameters as the web UI stores them (strings, "0" for unset numbers)."""
    def number(key: str) -> int | None:
        value = params.get(key)
        return int(value) if value not in (None, "", 0, "0") else None

    def text(key: str) -> str | None:
        value = params.get(key)
        return str(value).strip() or None if value is not None else None

    def flag(key: str) -> bool:
        value = params.get(key)
        return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")

    source = text("source")
    if not source:
        raise SystemExit("register_model: --source is required (a local model directory or a weights URI)")
    return register_model(
        source,
        name=text("name"),
        project=text("project") or DEFAULT_PROJECT,
        tags=[t for t in (text("tags") or "").split(",") if t.strip()],
        engine=None if (text("engine") or "auto").lower() == "auto" else text("engine"),
        dtype=text("dtype"),
        context_length=number("context_length"),
        parameters=number("parameters"),
        size_bytes=number("size_bytes"),
        quantization=text("quantization"),
        serve_name=text("serve_name"),
        framework=text("framework") or "PyTorch",
        comment=text("comment"),
        upload=flag("upload"),
        upload_uri=text("upload_uri"),
        task=task,
        manifest=text("manifest"),
    )


def main(argv: Sequence[str] | None = None) -> Registration:
    from clearml import Task

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    offline = use_offline_unless_configured()
    task = Task.init(project_name=args.task_project, task_name=args.task_name,
                     task_type=Task.TaskTypes.data_processing, auto_connect_arg_parser=False,
                     auto_connect_frameworks=False, auto_resource_monitoring=False, reuse_last_task_id=False)
    params = task.connect(hyperparameters(args), name="Args")
    try:
        registration = register_from_params(params, task=task)
        result = {k: (str(v) if v is not None and k in ("manifest",) else v)
                  for k, v in asdict(registration).items() if k != "spec"}
        task.upload_artifact("registration", artifact_object=result, wait_on_upload=True)
        verb = "registered" if registration.created else "updated"
        log.info("%s %s (%s) -> %s%s", verb, registration.name, registration.model_id or "manifest only",
                 registration.uri, " [offline]" if offline else "")
        print(json.dumps(result, default=str))
    finally:
        task.close()
    return registration


if __name__ == "__main__":
    main(sys.argv[1:])
