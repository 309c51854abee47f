"""What a serve task records so that a clearml-agent can run it on a GPU machine, in Docker.

A task cloned in the web UI runs where an agent picks it up: `clearml-agent daemon --docker`
starts the task's base image with `docker run [task's docker arguments] IMAGE bash -c
"<install python, clone, pip install the recorded requirements, run>"`. So:

- The image must have no serving ENTRYPOINT: the agent passes `bash -c ...` as the container's
  command, and an ENTRYPOINT such as vllm/vllm-openai's (the API server) would get it as its
  arguments; the agent strips `--entrypoint` from the task's docker arguments
  (`agent.forbidden_docker_args`), so that cannot be fixed there. A CUDA runtime image fits:
  the agent installs Python from apt, then the recorded requirements (vLLM and torch bring
  their own CUDA libraries as wheels).
- `--ipc=host`: vLLM and torch share memory between processes through /dev/shm, which
  Docker caps at 64 MB.
- `--network=host`: the router listens on the machine's own address, so the `router_url`
  the task reports (this machine's private address) is the one others reach. With port
  publishing instead (`-p 8000:8000`), set the task's `Serve/public_url`.
- Cache mounts: the Hugging Face cache and the fetched weights survive the container, so a
  second run does not download 100 GB again.

All of it is the task's container setting (web UI: Execution -> Container), set only when the
script runs on a user's machine: an edited clone keeps its edits.

Requirements: the SDK's import scan records what the checkout it runs from imports (from a
clone with tests: pytest, selenium, openai, clearml-serving) and never vLLM, which the
engine runs as a separate process. The serve task records this list instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "nvidia/cuda:12.8.1-runtime-ubuntu22.04"
HOST_CACHE = "/var/cache/clearml-umem"
"""On the agent's machine: where the mounted caches live (Docker creates the folders)."""
CONTAINER_HOME_CACHE = "/root/.cache"


def docker_arguments() -> list[str]:
    return ["--ipc=host", "--network=host",
            "-v", f"{HOST_CACHE}/huggingface:{CONTAINER_HOME_CACHE}/huggingface",
            "-v", f"{HOST_CACHE}/work:{CONTAINER_HOME_CACHE}/clearml-umem"]


def serve_requirements(engine: str) -> list[str]:
    """What tasks/serve.py needs on an agent: the package from the checkout (it is not on PyPI),
    torch without this machine's build tag (the agent picks its CUDA build), and vLLM unless
    the engine setting rules it out (a GGUF needs only the llama-server binary, no package)."""
    lines = ["-e .[transformers]", "torch>=2.2"]
    if engine in ("auto", "vllm"):
        lines += ["vllm>=0.6", "nvidia-ml-py>=12"]
    return lines


def record_serve_requirements(engine: str, folder: Path) -> Path:
    """Make the SDK record `serve_requirements(engine)` instead of its import scan.

    Must run before `Task.init`. The SDK reads the file in its background repository
    analysis after `Task.init` returns, so it is written where it stays (the work dir)."""
    from clearml import Task

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"serve-requirements-{engine}.txt"
    text = ("# recorded by tasks/serve.py (clearml_io/deployment.py), not by the SDK's import scan\n"
            + "\n".join(serve_requirements(engine)) + "\n")
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    Task.force_requirements_env_freeze(force=False, requirements_file=str(path))
    return path


def set_default_container(task: Any) -> None:
    """The default image and docker arguments, when the script runs on a user's machine (never
    under an agent: a clone edited in the web UI keeps its container)."""
    from clearml import Task

    if not Task.running_locally():
        return
    try:
        task.set_base_docker(docker_image=DEFAULT_IMAGE, docker_arguments=docker_arguments())
    except Exception:  # noqa: BLE001 - the container is advice for agents; serving goes on without it
        log.warning("could not record the default container on the task", exc_info=True)
