"""Child process for tests/test_clearml_serving.py: clearml-serving's own request processor,
offline, with endpoints whose code is serving/preprocess.py, forwarding to a live router.

Run as `python tests/clearml_serving_run.py PREPROCESS_FILE` with UMEM_ROUTER_URL set and the
ClearML SDK in offline mode; prints one JSON object with each request's answer or error.

One substitution, and only because of offline mode: clearml-serving makes its control-plane
task with `Task.create`, which the SDK refuses offline, so it is made with `Task.init` (the
same kind of task, offline). Everything after that is clearml-serving's code: the preprocess
file uploaded as a task artifact, loaded back from it, and called per request.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from clearml import Task
from clearml.utilities.pyhocon import ConfigFactory
from clearml_serving.serving.endpoints import ModelEndpoint
from clearml_serving.serving.model_request_processor import ModelRequestProcessor


def _offline_control_plane(cls: type, name: str | None = None, project: str | None = None,
                           tags: list[str] | None = None) -> Task:
    return Task.init(project_name=project or "DevOps", task_name=name or "Serving Service",
                     task_type=Task.TaskTypes.service, auto_connect_frameworks=False,
                     auto_resource_monitoring=False)


def aux_config(*pairs: str) -> dict[str, Any]:
    """`--aux-config key=value ...` parsed as the clearml-serving CLI does."""
    text = "\n".join(pairs).replace('"', '\\"').replace("'", "\\'")
    return ConfigFactory.parse_string(text).as_plain_ordered_dict()


async def main(preprocess: str) -> dict[str, Any]:
    ModelRequestProcessor._create_task = classmethod(_offline_control_plane)  # type: ignore[method-assign]
    processor = ModelRequestProcessor(force_create=True, name="umem serving", project="umem-tests")
    processor.add_endpoint(ModelEndpoint(engine_type="custom_async", serving_url="tiny-llama"),
                           preprocess_code=preprocess)
    processor.add_endpoint(ModelEndpoint(engine_type="custom_async", serving_url="llm", version="1"),
                           preprocess_code=preprocess)
    processor.add_endpoint(ModelEndpoint(engine_type="custom_async", serving_url="qwen",
                                         auxiliary_cfg=aux_config("model=tiny-qwen2")), preprocess_code=preprocess)
    chat = {"messages": [{"role": "user", "content": "Tell me about tiers."}], "max_tokens": 6, "temperature": 0}
    requests: dict[str, tuple[str, str | None, dict[str, Any]]] = {
        "chat_by_endpoint_name": ("tiny-llama", None, chat),
        "chat_again": ("tiny-llama", None, chat),
        "completion_by_body_model": ("llm", "1", {"model": "tiny-qwen2", "prompt": "Once upon", "max_tokens": 4}),
        "completion_by_aux_config": ("qwen", None, {"prompt": "Once upon", "max_tokens": 4, "temperature": 0}),
        "stream": ("tiny-llama", None, {**chat, "stream": True}),
        "unknown_model": ("llm", "1", {"model": "no-such-model", "prompt": "hi"}),
        "neither_prompt_nor_messages": ("tiny-llama", None, {"max_tokens": 3}),
        "unknown_endpoint": ("nowhere", None, chat),
    }
    out: dict[str, Any] = {}
    for label, (endpoint, version, body) in requests.items():
        try:
            out[label] = {"answer": await processor.process_request(base_url=endpoint, version=version,
                                                                    request_body=body)}
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out[label] = {"error": type(exc).__name__, "message": str(exc)}
    return out


if __name__ == "__main__":
    Task.set_offline(True)
    print("RESULT " + json.dumps(asyncio.run(main(sys.argv[1]))), flush=True)
