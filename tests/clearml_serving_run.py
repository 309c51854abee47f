"""Child process for tests/test_clearml_serving.py: clearml-serving's own request processor,
offline, with endpoints whose code is serving/preprocess.py, forwarding to a live router.

Run as `python tests/clearml_serving_run.py PREPROCESS_FILE` with UMEM_ROUTER_URL set and the
ClearML SDK in offline mode; prints one JSON object with each request's answer or error.

Two routes: `/serve/<endpoint>` through the installed release's `process_request`, and the
`/serve/openai/v1/...` route of clearml-serving's main branch (not released on PyPI), whose
per-request steps (`ModelRequestProcessor._process_request` at commit c0ee96e: the engine
object's `preprocess`, then the method named by the route with "/" turned into "_", then
`postprocess`) are taken here on the release's own engine object with the route's input, a
dict holding the parsed request and the FastAPI request.

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
from clearml_serving.serving.preprocess_service import BasePreprocessRequest
from starlette.requests import Request


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
            out[label] = answered(await processor.process_request(base_url=endpoint, version=version,
                                                                  request_body=body))
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out[label] = {"error": type(exc).__name__, "message": str(exc)}
    out["openai"] = await openai_route(processor, chat)
    return out


def answered(answer: Any) -> dict[str, Any]:
    """An answer as the test reads it: a response object (an error status the endpoint chose) as
    its status and JSON body, anything else as it is."""
    if hasattr(answer, "status_code") and hasattr(answer, "body"):
        return {"response": {"status": answer.status_code, "body": json.loads(answer.body)}}
    return {"answer": answer}


def fastapi_request(path: str, body: dict[str, Any]) -> Request:
    """The FastAPI request the route hands over, its body still to be read (as the endpoint reads it)."""
    payload = json.dumps(body).encode()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": payload, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/serve/openai" + path, "headers": [
        (b"content-type", b"application/json")], "query_string": b""}
    return Request(scope, receive)


async def openai_call(processor: ModelRequestProcessor, serve_type: str, body: dict[str, Any]) -> Any:
    """One `/serve/openai/<serve_type>` request as clearml-serving main carries it out."""
    url = processor._normalize_endpoint_url(body["model"], None)
    endpoint = processor._endpoints.get(url)
    if endpoint is None:
        raise LookupError(f"no endpoint {url!r}")
    engine = BasePreprocessRequest.get_engine_cls(endpoint.engine_type)(model_endpoint=endpoint, task=processor._task)
    data = {"request": body, "raw_request": fastapi_request("/" + serve_type, body)}
    state: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    preprocessed = await engine.preprocess(data, state, stats.update)
    processed = await getattr(engine, serve_type.replace("/", "_"))(preprocessed, state, stats.update)
    answer = await engine.postprocess(processed, state, stats.update)
    if hasattr(answer, "body_iterator"):
        raw = b"".join([chunk async for chunk in answer.body_iterator])
        return {"stream": raw.decode(), "media_type": answer.media_type, "keys": list(answer.keys()),
                "headers": dict(answer.headers), "stats": stats}
    return {**answered(answer), "stats": stats}


async def openai_route(processor: ModelRequestProcessor, chat: dict[str, Any]) -> dict[str, Any]:
    calls: dict[str, tuple[str, dict[str, Any]]] = {
        "chat": ("v1/chat/completions", {**chat, "model": "tiny-llama"}),
        "chat_stream": ("v1/chat/completions", {**chat, "model": "tiny-llama", "stream": True}),
        "completion": ("v1/completions", {"model": "qwen", "prompt": "Once upon", "max_tokens": 4,
                                          "temperature": 0}),
        "completion_stream": ("v1/completions", {"model": "qwen", "prompt": "Once upon", "max_tokens": 4,
                                                 "temperature": 0, "stream": True}),
        "models": ("v1/models", {"model": "tiny-llama"}),
        "bad_field": ("v1/chat/completions", {**chat, "model": "tiny-llama", "max_tokens": -3}),
        "bad_field_stream": ("v1/chat/completions", {**chat, "model": "tiny-llama", "max_tokens": -3,
                                                     "stream": True}),
    }
    out: dict[str, Any] = {}
    for label, (serve_type, body) in calls.items():
        try:
            out[label] = await openai_call(processor, serve_type, body)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out[label] = {"error": type(exc).__name__, "message": str(exc)}
    return out


if __name__ == "__main__":
    Task.set_offline(True)
    print("RESULT " + json.dumps(asyncio.run(main(sys.argv[1]))), flush=True)
