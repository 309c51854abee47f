"""The serve task against a server (the API fixture), as an agent would run it: what it records for
Docker and requirements, where it says it listens, lineage that follows the catalog, and an abort
from the web UI that still leaves the summary and takes the endpoints off the Model Endpoints page.

The real SDK in a child process (tasks/serve.py as users run it), the real router and a tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.clearml_env import offline_env
from tests.fixtures.clearml_api_server import ClearMLApiFixture
from tests.test_clearml_tasks import start_serve_task
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


def props(api: ClearMLApiFixture, task_id: str) -> dict[str, str]:
    section = api.tasks[task_id].get("hyperparams", {}).get("properties", {})
    return {name: item.get("value") for name, item in section.items()}


def inputs(api: ClearMLApiFixture, task_id: str) -> dict[str, str]:
    return {m["name"]: m["model"] for m in api.tasks[task_id]["models"]["input"]}


def endpoints(api: ClearMLApiFixture) -> set[str]:
    return {c["endpoint_name"] for c in list(api.containers.values())}


def test_serve_task_online_records_docker_requirements_lineage_and_survives_an_abort(
        tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    import openai

    api = ClearMLApiFixture().start()
    try:
        uri = tiny_models["tiny-llama"].resolve().as_uri()
        first = api.add_model("first", uri, project="srv/models", framework="TensorFlow", metadata={})
        env = offline_env(tmp_path, **api.env(), UMEM_API_KEY="k")
        env.pop("CLEARML_OFFLINE_MODE")
        proc, url, lines = start_serve_task(
            ["--clearml-project", "srv/models", "--catalog-poll-seconds", "0.3", "--host", "0.0.0.0", "--port", "0",
             "--device", "cpu", "--work-dir", str(tmp_path / "work"), "--report-period", "0.2",
             "--summary-period", "0"], env)
        try:
            (task_id,) = [t["id"] for t in api.tasks.values() if t["name"] == "serve"]
            port = url.rsplit(":", 1)[1]
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k")
            answer = client.chat.completions.create(model="first", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=3)
            assert answer.choices[0].message.content is not None

            assert wait_until(lambda: props(api, task_id).get("served_models") == "first", timeout=30)
            router_url = props(api, task_id)["router_url"]
            assert "0.0.0.0" not in router_url and router_url.endswith(f":{port}/v1"), router_url
            assert inputs(api, task_id) == {"first": first}
            assert wait_until(lambda: endpoints(api) == {"first"}, timeout=30)

            task = api.tasks[task_id]
            container = task.get("container") or {}
            assert container.get("image", "").startswith("nvidia/cuda:") and "runtime" in container["image"]
            assert {"--ipc=host", "--network=host"} <= set(container.get("arguments", "").split())
            assert "/root/.cache/huggingface" in container["arguments"]
            assert wait_until(lambda: "vllm" in json.dumps(api.tasks[task_id].get("script", {})), timeout=30)
            pip = api.tasks[task_id]["script"]["requirements"]["pip"]
            assert "-e .[transformers]" in pip and "torch>=2.2" in pip and "vllm" in pip
            for test_only in ("pytest", "selenium", "openai", "clearml-serving", "clearml_serving"):
                assert test_only not in pip, f"{test_only} recorded: {pip}"

            second = api.add_model("second", uri, project="srv/models", metadata={})
            assert wait_until(lambda: props(api, task_id).get("served_models") == "first,second", timeout=60)
            assert wait_until(lambda: inputs(api, task_id) == {"first": first, "second": second}, timeout=30)
            assert wait_until(lambda: endpoints(api) == {"first", "second"}, timeout=30)
            api.remove_model(first)
            assert wait_until(lambda: props(api, task_id).get("served_models") == "second", timeout=60)
            assert wait_until(lambda: inputs(api, task_id) == {"second": second}, timeout=30)
            assert wait_until(lambda: endpoints(api) == {"second"}, timeout=30), "a removed model leaves the page"

            api.events.clear()
            api.tasks[task_id]["status"] = "stopped"  # what the web UI's Abort does to a running task
            assert wait_until(lambda: proc.poll() is not None, timeout=90), "\n".join(lines[-40:])
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        out = "\n".join(lines)
        assert "task aborted: reporting the summary" in out, out[-4000:]
        assert not endpoints(api), "the abort callback took the endpoints off the page"
        summary = json.dumps(api.events)
        assert "TTFT summary" in summary and "TTFT median cold (s)" in summary, "the summary survived the abort"
    finally:
        api.stop()


def test_registering_online_links_the_model_and_the_task(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    from tests.clearml_env import run_python

    api = ClearMLApiFixture().start()
    try:
        env = offline_env(tmp_path, **api.env())
        env.pop("CLEARML_OFFLINE_MODE")
        (tmp_path / "files").mkdir()
        env["CLEARML_FILES_HOST"] = (tmp_path / "files").as_uri()  # the task's artifact: a local file store
        run_python(["tasks/register_model.py", "--source", str(tiny_models["tiny-llama"]), "--project", "reg/online",
                    "--tags", "chat"], env, timeout=240)
        (task,) = [t for t in api.tasks.values() if t["name"] == "register model"]
        (model,) = [m for m in api.models.values() if m["name"] == "tiny-llama"]
        assert model["task"] == task["id"], "the entry names the task that registered it"
        assert task["models"]["output"] == [{"name": "tiny-llama", "model": model["id"]}], "the task lists it"
    finally:
        api.stop()
