"""Triton's protocol on the router: the real tritonclient.http and tritonclient.grpc clients, as code
written for Triton's vLLM backend uses them, against a real router process with room for one of
two tiny models (every switch is a swap), keys set, a small queue and a small message limit."""

from __future__ import annotations

import asyncio
import json
import queue
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from clearml_umem.catalog import write_manifest
from clearml_umem.config import ConfigError, parse_serve_args
from clearml_umem.demo import room_for_one
from clearml_umem.engines import EngineContext
from clearml_umem.router.triton_request import (
    TritonInputError,
    build_request,
    check_tensor,
    deserialize_bytes,
    serialize_bytes,
)
from clearml_umem.spec import ModelSpec, spec_from_mapping
from tests.routerproc import RouterProcess, start_router
from tests.test_router_http import metric

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException, serialize_byte_tensor  # noqa: E402

API_KEY = "triton-api-key"
ADMIN_KEY = "triton-admin-key"
AUTH = {"authorization": f"Bearer {API_KEY}"}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
MAX_MESSAGE = 1 << 20
GREEDY = {"max_tokens": 6, "temperature": 0}
GRPC_PREFIX = "umem: triton grpc on "
ALIAS = "llama-alias"
ALIAS_MAX_TOKENS = 3


# -- pure: the request mapping -----------------------------------------------------------------

SPEC = ModelSpec(name="m", weights="/nowhere", size_bytes=1, context_length=64)


def test_the_vllm_backends_request_becomes_the_engine_request() -> None:
    """Numbers as strings (as vLLM-backend clients send them) are converted; parameters and the
    JSON sampling_parameters merge; the prompt is prepended unless excluded."""
    req = build_request(SPEC, {"text_input": "hi", "sampling_parameters": json.dumps(
        {"temperature": "0", "top_p": "0.5", "max_tokens": "7", "stop": ["x"], "top_k": -1})},
                        {"seed": 3, "exclude_input_in_output": True, "triton_enable_empty_final_response": True})
    g = req.generation
    assert (g.prompt, g.max_tokens, g.temperature, g.top_p, g.stop, g.seed) == ("hi", 7, 0.0, 0.5, ["x"], 3)
    assert req.exclude_input and not req.stream
    defaults = build_request(SPEC, {"text_input": "hi"}, {}).generation
    assert (defaults.max_tokens, defaults.temperature, defaults.top_p) == (16, 1.0, 1.0)  # vLLM's SamplingParams


def test_the_models_defaults_fill_what_the_client_left_unset() -> None:
    spec = ModelSpec(name="m", weights="/nowhere", size_bytes=1, context_length=64,
                     defaults={"max_tokens": 5, "temperature": 0.0})
    assert build_request(spec, {"text_input": "hi"}, {}).generation.max_tokens == 5
    asked = build_request(spec, {"text_input": "hi"}, {"max_tokens": 9, "temperature": 0.5}).generation
    assert (asked.max_tokens, asked.temperature) == (9, 0.5)


@pytest.mark.parametrize(("inputs", "parameters", "field"), [
    ({}, {}, "text_input"),
    ({"text_input": "a", "sampling_parameters": "{"}, {}, "sampling_parameters"),
    ({"text_input": "a", "sampling_parameters": "[1]"}, {}, "sampling_parameters"),
    ({"text_input": "a"}, {"temperature": 9}, "temperature"),
    ({"text_input": "a"}, {"max_tokens": "many"}, "max_tokens"),
    ({"text_input": "a"}, {"max_tokens": 65}, "max_tokens"),
    ({"text_input": "a"}, {"top_k": 5}, "top_k"),
    ({"text_input": "a"}, {"n": 2}, "n"),
    ({"text_input": "a"}, {"logprobs": 3}, "logprobs"),
    ({"text_input": "a"}, {"stream": "yes"}, "stream"),
])
def test_a_bad_request_names_its_field(inputs, parameters, field) -> None:
    with pytest.raises(TritonInputError) as caught:
        build_request(SPEC, inputs, parameters)
    assert caught.value.param == field and field in caught.value.message and caught.value.status == 400


def test_tensors_are_checked_by_name_datatype_and_shape() -> None:
    assert check_tensor("text_input", "BYTES", [1, 1], [b"caf\xc3\xa9"]) == "café"
    for args, words in [(("text_input", "FP32", [1], [1.0]), "datatype BYTES"),
                        (("text_input", "BYTES", [2], [b"a", b"b"]), "exactly one element"),
                        (("text_input", "BYTES", [1], []), "the data 0"),
                        (("text_input", "BYTES", [-1], [b"a"]), "whole numbers"),
                        (("text_input", "BYTES", [1], [b"\xff"]), "UTF-8"),
                        (("stream", "BOOL", [1], ["true"]), "true or false"),
                        (("prompt", "BYTES", [1], [b"a"]), "unexpected inference input 'prompt'")]:
        with pytest.raises(TritonInputError, match=re.escape(words)):
            check_tensor(*args)


def test_bytes_tensors_use_tritons_layout_and_truncation_is_refused() -> None:
    items = [b"hello", b"", "é".encode()]
    raw = serialize_bytes(items)
    assert raw == serialize_byte_tensor(np.array(items, dtype=object)).item()
    assert deserialize_bytes("x", raw) == items
    for cut in (raw[:2], raw[:-1]):
        with pytest.raises(TritonInputError, match="'x'"):
            deserialize_bytes("x", cut)


def test_the_grpc_port_is_off_by_default_read_from_the_environment_and_checked(tmp_path: Path) -> None:
    manifest = tmp_path / "models.yaml"
    manifest.write_text("models: []\n")
    base = ["--manifest", str(manifest)]
    assert parse_serve_args(base, env={}).grpc_port is None
    assert parse_serve_args(base, env={"UMEM_GRPC_PORT": "9001"}).grpc_port == 9001
    assert parse_serve_args([*base, "--grpc-port", "0"], env={"UMEM_GRPC_PORT": "9001"}).grpc_port == 0
    with pytest.raises(ConfigError, match="grpc_port must be 0..65535"):
        parse_serve_args([*base, "--grpc-port", "70000"], env={})
    with pytest.raises(ConfigError, match="a port each"):
        parse_serve_args([*base, "--port", "9000", "--grpc-port", "9000"], env={})


def test_a_grpc_port_in_use_is_refused_not_shared() -> None:
    """SO_REUSEPORT is off: a second router on the same port fails to start instead of splitting calls."""
    from clearml_umem.router.triton_grpc import start_grpc_server

    async def main() -> None:
        first, port = await start_grpc_server(None, None, "127.0.0.1", 0, None, None, 1024)  # type: ignore[arg-type]
        try:
            with pytest.raises(OSError, match=f"cannot listen for gRPC on 127.0.0.1:{port}"):
                await start_grpc_server(None, None, "127.0.0.1", port, None, None, 1024)  # type: ignore[arg-type]
        finally:
            await first.stop(None)

    asyncio.run(main())


def test_the_base_install_does_not_load_grpc() -> None:
    """grpc and tritonclient are the [triton] extra: the router and its HTTP /v2 routes work without."""
    code = ("import sys, clearml_umem.server, clearml_umem.router.app; "
            "print(sorted(m for m in ('grpc', 'tritonclient') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- a real router -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("triton")
    specs = [spec_from_mapping({"name": "tiny-llama", "weights": str(tiny_models["tiny-llama"]),
                                "aliases": [ALIAS], "defaults": {"max_tokens": ALIAS_MAX_TOKENS},
                                # batched, this CPU would run 32 at once: two keep the full-queue test's burst full
                                "max_concurrency": 2}),
             spec_from_mapping({"name": "tiny-qwen2", "weights": str(tiny_models["tiny-qwen2"])})]
    write_manifest(work / "models.yaml", specs)
    device_budget, host_budget, _ = room_for_one(specs, EngineContext(work_dir=work, device="cpu"))
    router = start_router(work / "models.yaml", work, "--device", "cpu", "--device-budget", str(device_budget),
                          "--host-budget", str(host_budget), "--grpc-port", "0", "--max-waiting", "2",
                          "--max-request-bytes", str(MAX_MESSAGE),
                          env={"UMEM_API_KEY": API_KEY, "UMEM_ADMIN_KEY": ADMIN_KEY})
    names = [s.name for s in specs]
    grpc_address = next(line[len(GRPC_PREFIX):] for line in router.log if line.startswith(GRPC_PREFIX))
    yield router, names, grpc_address
    router.kill()


def _inputs(module, prompt: str, stream: bool | None = None, **sampling) -> list:
    text = module.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    params = module.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps({**GREEDY, **sampling}).encode()], dtype=object))
    tensors = [text, params]
    if stream is not None:
        flag = module.InferInput("stream", [1], "BOOL")
        flag.set_data_from_numpy(np.array([stream]))
        tensors.append(flag)
    return tensors


def _exclude(module) -> object:
    flag = module.InferInput("exclude_input_in_output", [1], "BOOL")
    flag.set_data_from_numpy(np.array([True]))
    return flag


def _metric(router: RouterProcess, name: str, **labels: str) -> float:
    return metric(httpx.get(router.url + "/metrics", headers=AUTH, timeout=30).text, name, **labels)


def _stream(client, model: str, prompt: str, empty_final: bool, **sampling) -> list:
    """Every response of one streamed request: (text or None, final flag, served_from)."""
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)), headers=AUTH)
    try:
        client.async_stream_infer(model, [*_inputs(grpcclient, prompt, stream=True, **sampling)],
                                  enable_empty_final_response=empty_final)
        out = []
        while True:
            result, error = got.get(timeout=120)
            assert error is None, error
            response = result.get_response()
            text = result.as_numpy("text_output")[0].decode() if response.outputs else None
            final = response.parameters["triton_final_response"].bool_param
            out.append((text, final, response.parameters["served_from"].string_param))
            if final:
                return out
    finally:
        client.stop_stream()


@pytest.mark.slow
def test_tritonclient_http_and_grpc_reach_every_model_through_swaps(served) -> None:
    """Alternating models with room for one: each answer comes from a swap, over both protocols;
    the non-streamed answer starts with the prompt (the vLLM backend's default) unless excluded,
    and the streamed pieces make the excluded answer; TTFT is counted per tier as for OpenAI."""
    router, names, grpc_address = served
    http = httpclient.InferenceServerClient(router.url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(grpc_address)
    assert http.is_server_live(headers=AUTH) and http.is_server_ready(headers=AUTH)
    assert grpc.is_server_live(headers=AUTH) and grpc.is_server_ready(headers=AUTH)
    assert grpc.get_server_metadata(headers=AUTH).name == "clearml-umem"
    index = {m.name: m.reason for m in grpc.get_model_repository_index(headers=AUTH).models}
    assert set(index) == set(names) and all(reason.startswith("tier ") for reason in index.values())
    ttft_before = sum(_metric(router, "umem_ttft_seconds_count", model=n) for n in names)
    tiers = []
    prompt = "Tell me about tiers"
    for name in names + names:
        assert http.is_model_ready(name, headers=AUTH) and grpc.is_model_ready(name, headers=AUTH)
        assert http.get_model_metadata(name, headers=AUTH)["inputs"][0]["name"] == "text_input"
        assert grpc.get_model_metadata(name, headers=AUTH).outputs[0].name == "text_output"
        # HTTP infer, binary BYTES both ways (tritonclient's default)
        full = http.infer(name, _inputs(httpclient, prompt), headers={**AUTH})  # it adds to the dict
        full_text = full.as_numpy("text_output")[0].decode()
        tiers.append(full.get_response()["parameters"]["served_from"])
        assert full_text.startswith(prompt) and len(full_text) > len(prompt)
        answer = full_text[len(prompt):]
        # gRPC unary, prompt excluded, after a swap to the other model and back
        other = names[1 - names.index(name)]
        assert grpc.infer(other, _inputs(grpcclient, "x"), headers=AUTH).as_numpy("text_output")[0]
        unary = grpc.infer(name, [*_inputs(grpcclient, prompt), _exclude(grpcclient)], headers=AUTH)
        assert unary.as_numpy("text_output")[0].decode() == answer
        tiers.append(unary.get_response().parameters["served_from"].string_param)
        # gRPC stream with and without the empty final response
        pieces = _stream(grpc, name, prompt, empty_final=True)
        assert pieces[-1][0] is None and pieces[-1][1] and not any(final for _, final, _ in pieces[:-1])
        assert "".join(text for text, _, _ in pieces[:-1]) == answer
        plain = _stream(grpc, name, prompt, empty_final=False)  # the flag rides on the last text ("" or not)
        assert all(text is not None for text, _, _ in plain) and "".join(text for text, _, _ in plain) == answer
        # the generate extension, JSON
        generated = httpx.post(f"{router.url}/v2/models/{name}/generate", headers=AUTH, timeout=120,
                               json={"text_input": prompt, "parameters": {**GREEDY, "exclude_input_in_output": True}})
        assert generated.status_code == 200 and generated.json() == {"model_name": name, "model_version": "1",
                                                                     "text_output": answer}
        with httpx.stream("POST", f"{router.url}/v2/models/{name}/generate_stream", headers=AUTH, timeout=120,
                          json={"text_input": prompt, "parameters": GREEDY}) as events:
            assert events.status_code == 200 and events.headers["content-type"].startswith("text/event-stream")
            datas = [json.loads(line[6:]) for line in events.iter_lines() if line.startswith("data: ")]
        assert "".join(d["text_output"] for d in datas) == answer and all(d["model_name"] == name for d in datas)
    assert set(tiers) - {"gpu"}, tiers  # some answers came from a swap
    ttft_after = sum(_metric(router, "umem_ttft_seconds_count", model=n) for n in names)
    assert ttft_after - ttft_before == 4 * 7  # each request above, whichever protocol, counted its first token
    stats = grpc.get_inference_statistics(names[0], headers=AUTH).model_stats[0]
    assert stats.inference_stats.success.count >= 8 and stats.inference_stats.queue.count >= 8


@pytest.mark.slow
def test_keys_guard_both_protocols_and_only_the_admin_key_loads_and_unloads(served) -> None:
    router, names, grpc_address = served
    grpc = grpcclient.InferenceServerClient(grpc_address)
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY}):
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            grpc.infer(names[0], _inputs(grpcclient, "hi"), headers=headers)
        assert httpx.post(f"{router.url}/v2/models/{names[0]}/generate", headers=headers,
                          json={"text_input": "hi"}).status_code == 401
    http = httpclient.InferenceServerClient(router.url.removeprefix("http://"))
    with pytest.raises(InferenceServerException, match=r"\[401\] Incorrect or missing API key"):
        http.infer(names[0], _inputs(httpclient, "hi"), headers={"authorization": "Bearer wrong"})
    nowhere = httpx.get(f"{router.url}/v2/nowhere", headers=AUTH)
    assert nowhere.status_code == 404 and isinstance(nowhere.json()["error"], str)  # Triton's shape here too
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED.*admin key"):
        grpc.unload_model(names[0], headers=AUTH)
    assert grpc.infer(names[0], _inputs(grpcclient, "hi"), headers=ADMIN).as_numpy("text_output")[0]
    grpc.unload_model(names[0], headers=ADMIN)
    tiers = {m.name: m.reason for m in grpc.get_model_repository_index(headers=AUTH).models}
    assert tiers[names[0]] == "tier cold"
    grpc.load_model(names[1], headers=ADMIN)
    tiers = {m.name: m.reason for m in grpc.get_model_repository_index(headers=AUTH).models}
    assert tiers[names[1]] == "tier gpu"
    with pytest.raises(InferenceServerException, match="NOT_FOUND.*'nope'"):
        grpc.load_model("nope", headers=ADMIN)


@pytest.mark.slow
def test_an_alias_reaches_its_model_with_the_models_defaults(served) -> None:
    router, names, grpc_address = served
    grpc = grpcclient.InferenceServerClient(grpc_address)
    assert grpc.is_model_ready(ALIAS, headers=AUTH)
    tensors = _inputs(grpcclient, "hi")[:1]  # no sampling_parameters: the model's max_tokens applies
    flag = _grpc_tensor("return_num_output_tokens", "BOOL", [1], np.array([True]))
    result = grpc.infer(ALIAS, [*tensors, flag], headers=AUTH)
    assert 0 < result.as_numpy("num_output_tokens")[0] <= ALIAS_MAX_TOKENS
    answer = httpx.post(f"{router.url}/v2/models/{ALIAS}/generate", headers=AUTH, timeout=120,
                        json={"text_input": "hi", "return_num_output_tokens": True})
    assert answer.status_code == 200 and 0 < answer.json()["num_output_tokens"] <= ALIAS_MAX_TOKENS
    assert answer.json()["model_name"] == names[0]


@pytest.mark.slow
def test_the_return_flags_add_finish_reason_and_token_counts(served) -> None:
    router, names, grpc_address = served
    grpc = grpcclient.InferenceServerClient(grpc_address)
    flags = [_grpc_tensor(f"return_{name}", "BOOL", [1], np.array([True]))
             for name in ("finish_reason", "num_input_tokens", "num_output_tokens")]
    result = grpc.infer(names[0], [*_inputs(grpcclient, "hi", max_tokens=3), *flags], headers=AUTH)
    assert result.as_numpy("finish_reason")[0].decode() in ("length", "stop")
    assert result.as_numpy("num_input_tokens")[0] > 0 and 0 < result.as_numpy("num_output_tokens")[0] <= 3
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hi"]},
                       {"name": "return_finish_reason", "datatype": "BOOL", "shape": [1], "data": [True]}],
            "outputs": [{"name": "finish_reason"}], "parameters": {"max_tokens": 3, "temperature": 0}}
    answer = httpx.post(f"{router.url}/v2/models/{names[0]}/infer", json=body, headers=AUTH, timeout=120).json()
    assert [o["name"] for o in answer["outputs"]] == ["finish_reason"]
    assert answer["outputs"][0]["data"][0] in ("length", "stop") and answer["parameters"]["served_from"]
    body["outputs"] = [{"name": "num_output_tokens"}]
    refused = httpx.post(f"{router.url}/v2/models/{names[0]}/infer", json=body, headers=AUTH, timeout=120)
    assert refused.status_code == 400 and "'return_num_output_tokens'" in refused.json()["error"]


def _grpc_tensor(name: str, datatype: str, shape: list[int], values) -> object:
    tensor = grpcclient.InferInput(name, shape, datatype)
    tensor.set_data_from_numpy(values)
    return tensor


@pytest.mark.slow
def test_hostile_inputs_are_refused_naming_the_field_over_both_protocols(served) -> None:
    router, names, grpc_address = served
    model = names[0]
    grpc = grpcclient.InferenceServerClient(grpc_address)
    http = httpclient.InferenceServerClient(router.url.removeprefix("http://"))
    text = np.array([b"hi"], dtype=object)
    cases = [  # (inputs as name, datatype, shape, values; words the error must hold)
        ([("text_input", "FP32", [1], np.array([1.0], dtype=np.float32))], "'text_input' must have datatype BYTES"),
        ([("text_input", "BYTES", [2], np.array([b"a", b"b"], dtype=object))], "'text_input' must hold exactly one"),
        ([("stream", "BOOL", [1], np.array([False]))], "'text_input' is required"),
        ([("text_input", "BYTES", [1], text), ("prompt", "BYTES", [1], text)], "unexpected inference input 'prompt'"),
        ([("text_input", "BYTES", [1], text), ("stream", "INT32", [1], np.array([1], dtype=np.int32))],
         "'stream' must have datatype BOOL"),
        ([("text_input", "BYTES", [1], text),
          ("sampling_parameters", "BYTES", [1], np.array([b'{"temperature": 7}'], dtype=object))], "'temperature'"),
        ([("text_input", "BYTES", [1], text), ("stream", "BOOL", [1], np.array([True]))], "'stream' is true"),
    ]
    for spec, words in cases:
        with pytest.raises(InferenceServerException, match=re.escape(words)) as caught:
            grpc.infer(model, [_grpc_tensor(*t) for t in spec], headers=AUTH)
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        http_inputs = []
        for name, datatype, shape, values in spec:
            tensor = httpclient.InferInput(name, shape, datatype)
            tensor.set_data_from_numpy(values)
            http_inputs.append(tensor)
        with pytest.raises(InferenceServerException, match=re.escape(words)) as caught:
            http.infer(model, http_inputs, headers={**AUTH})
        assert caught.value.status() == "400"
    with pytest.raises(InferenceServerException, match="NOT_FOUND.*'nope'"):
        grpc.infer("nope", _inputs(grpcclient, "hi"), headers=AUTH)
    with pytest.raises(InferenceServerException, match="RESOURCE_EXHAUSTED"):
        grpc.infer(model, _inputs(grpcclient, "x" * (MAX_MESSAGE + 10)), headers=AUTH)
    with pytest.raises(InferenceServerException, match="unexpected inference output 'logits'"):
        grpc.infer(model, _inputs(grpcclient, "hi"), outputs=[grpcclient.InferRequestedOutput("logits")],
                   headers=AUTH)
    # raw HTTP: the binary extension's lengths, the generate extension's fields, routes' errors
    head = json.dumps({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": 50}}]}).encode()
    lying = head.replace(b'"binary_data_size": 50', b'"binary_data_size": 1000000000')
    raw = [(head + serialize_bytes([b"hi"]), {"Inference-Header-Content-Length": str(len(head))},
            "binary_data_size 50"),
           (head, {"Inference-Header-Content-Length": "999"}, "Inference-Header-Content-Length"),
           # a size far past the bytes sent: named as the lie it is, not taken for a long prompt
           (lying + b"\0" * 100_000, {"Inference-Header-Content-Length": str(len(lying))},
            "binary_data_size 1000000000"),
           (b'{"inputs": "x"}', {}, "'inputs' is required"),
           (b"{not json", {}, "JSON")]
    for body, headers, words in raw:
        answer = httpx.post(f"{router.url}/v2/models/{model}/infer", content=body,
                            headers={**AUTH, **headers, "content-type": "application/json"})
        assert answer.status_code == 400 and words in answer.json()["error"], answer.text
    generate = [({"text_input": 5}, "'text_input' must be text"), ({"text_input": "a", "stream": True}, "'stream'"),
                ({"text_input": "a", "parameters": {"max_tokens": 0}}, "'max_tokens'"),
                ({"text_input": "a", "parameters": []}, "'parameters'"),
                # over 64 KiB: checked in a parser process, the values cap names the field
                ({"text_input": "a", "junk": [0] * 200_000}, "most of them in 'junk'")]
    for body, words in generate:
        answer = httpx.post(f"{router.url}/v2/models/{model}/generate", json=body, headers=AUTH)
        assert answer.status_code == 400 and words in answer.json()["error"], answer.text
    too_big = httpx.post(f"{router.url}/v2/models/{model}/infer", content=b"x" * (MAX_MESSAGE + 1), headers=AUTH)
    assert too_big.status_code == 413 and str(MAX_MESSAGE) in too_big.json()["error"]
    answer = httpx.post(f"{router.url}/v2/models/nope/generate_stream", json={"text_input": "a"}, headers=AUTH)
    assert answer.status_code == 404 and "'nope'" in answer.json()["error"]
    assert httpx.get(f"{router.url}/v2/models/{model}/versions/2", headers=AUTH).status_code == 404
    # a bad request on a stream is an error response there, and the stream goes on
    got: queue.Queue = queue.Queue()
    grpc.start_stream(callback=lambda result, error: got.put((result, error)), headers=AUTH)
    try:
        grpc.async_stream_infer(model, [_grpc_tensor("text_input", "FP32", [1], np.array([1.0], dtype=np.float32))])
        grpc.async_stream_infer(model, _inputs(grpcclient, "hi"))
        first, second = got.get(timeout=120), got.get(timeout=120)
        assert first[0] is None and "datatype BYTES" in str(first[1])
        assert second[1] is None and second[0].as_numpy("text_output")[0].decode().startswith("hi")
    finally:
        grpc.stop_stream()


@pytest.mark.slow
def test_cancelled_clients_cost_only_their_request_and_full_queues_are_resource_exhausted(served) -> None:
    router, names, grpc_address = served
    model = names[0]
    grpc = grpcclient.InferenceServerClient(grpc_address)
    failed_before = _metric(router, "umem_requests_finished_total", model=model, ok="false")
    move_failures = _metric(router, "umem_move_failures_total")
    # a deadline that ends a long answer, a stream cancelled mid-answer, an SSE client that leaves
    with pytest.raises(InferenceServerException, match="DEADLINE_EXCEEDED"):
        grpc.infer(model, _inputs(grpcclient, "long", max_tokens=1000), headers=AUTH,
                   client_timeout=0.3)
    got: queue.Queue = queue.Queue()
    grpc.start_stream(callback=lambda result, error: got.put((result, error)), headers=AUTH)
    grpc.async_stream_infer(model, _inputs(grpcclient, "long", stream=True, max_tokens=1000))
    assert got.get(timeout=120)[1] is None
    grpc.stop_stream(cancel_requests=True)
    with httpx.stream("POST", f"{router.url}/v2/models/{model}/generate_stream", headers=AUTH, timeout=120,
                      json={"text_input": "long", "parameters": {"max_tokens": 1000}}) as events:
        next(events.iter_lines())
    # the leases are back: another model swaps in, then this one serves again
    assert grpc.infer(names[1], _inputs(grpcclient, "x"), headers=AUTH).as_numpy("text_output")[0]
    assert grpc.infer(model, _inputs(grpcclient, "x"), headers=AUTH).as_numpy("text_output")[0]
    deadline_lines = [line for line in router.log if "Traceback" in line or "internal error" in line]
    assert deadline_lines == []
    assert _metric(router, "umem_requests_finished_total", model=model, ok="false") - failed_before >= 2
    assert _metric(router, "umem_move_failures_total") == move_failures

    def one(_: int) -> str:
        try:
            grpc.infer(model, _inputs(grpcclient, "busy", max_tokens=150), headers=AUTH)
            return "ok"
        except InferenceServerException as exc:
            return str(exc.status())

    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(one, range(12)))
    assert set(codes) <= {"ok", "StatusCode.RESOURCE_EXHAUSTED"} and "StatusCode.RESOURCE_EXHAUSTED" in codes, codes
    assert codes.count("ok") >= 3
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda _: httpx.post(
            f"{router.url}/v2/models/{model}/generate", headers=AUTH, timeout=120,
            json={"text_input": "busy", "parameters": {"max_tokens": 150}}).status_code, range(12)))
    assert set(statuses) <= {200, 429} and 429 in statuses, statuses


@pytest.mark.slow
def test_big_bodies_take_the_body_reader_and_are_answered_as_small_ones(served) -> None:
    """Triton's bodies over 64 KiB go where OpenAI's go (`body_handoff.py`): read by the body reader
    process, never across the event loop, parsed in a parser process; the connection then closes after
    the answer (it never read that body), and a client that leaves mid-body is counted as one.
    Padded with JSON whitespace, each request is the small one: its answer must be the same."""
    router, names, _ = served
    model, url = names[0], router.url
    pad = b" " * 100_000
    json_type = {**AUTH, "content-type": "application/json"}
    generate = json.dumps({"text_input": "Big bodies", "parameters": {**GREEDY, "exclude_input_in_output": True}})
    greedy = {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1], "data": [json.dumps(GREEDY)]}
    infer = json.dumps({"id": "b1", "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                                                "data": ["Big bodies"]}, greedy]})
    text = serialize_bytes([b"Big bodies"])
    head = json.dumps({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(text)}}, greedy],
                       "outputs": [{"name": "text_output", "parameters": {"binary_data": False}}]})
    prepared = _metric(router, "umem_big_request_bodies_total", outcome="prepared")
    for path, small, extra in ((f"/v2/models/{model}/generate", generate.encode(), {}),
                               (f"/v2/models/{model}/infer", infer.encode(), {}),
                               (f"/v2/models/{model}/versions/1/infer", head.encode() + text,
                                {"Inference-Header-Content-Length": str(len(head))})):
        split = len(head) if extra else len(small) - 1  # the padding goes inside the JSON, before its last brace
        big = small[:split - 1] + pad + small[split - 1:]
        big_extra = {"Inference-Header-Content-Length": str(len(head) + len(pad))} if extra else {}


        def slowly(body: bytes = big) -> Iterator[bytes]:  # the rest after the headers' packet: read by the reader
            yield body[:1000]
            time.sleep(0.3)
            yield body[1000:]

        with httpx.Client(base_url=url, timeout=120) as client:
            plain = client.post(path, content=small, headers={**json_type, **extra})
            padded = client.post(path, content=slowly(), headers={**json_type, **big_extra,
                                                                  "content-length": str(len(big))})
        assert plain.status_code == 200 and padded.status_code == 200, (plain.text, padded.text[:300])
        assert padded.json() == plain.json() and padded.json().get("model_name") == model
        assert plain.headers.get("connection") != "close" and padded.headers["connection"] == "close"
    assert _metric(router, "umem_big_request_bodies_total", outcome="prepared") == prepared + 3
    # a prompt that cannot fit is refused in the parser process, from its byte length: the router
    # never gets it back (as for OpenAI's routes)
    refused = _metric(router, "umem_big_request_bodies_total", outcome="refused")
    long_prompt = "word " * 40_000
    for path, body in ((f"/v2/models/{model}/generate", {"text_input": long_prompt}),
                       (f"/v2/models/{model}/infer", {"inputs": [{"name": "text_input", "datatype": "BYTES",
                                                                  "shape": [1], "data": [long_prompt]}]})):
        answer = httpx.post(url + path, json=body, headers=AUTH, timeout=120)
        assert answer.status_code == 400 and "context of" in answer.json()["error"], answer.text
    assert _metric(router, "umem_big_request_bodies_total", outcome="refused") == refused + 2
    # tritonclient's default: the prompt as binary data after the JSON, refused from its declared size
    http = httpclient.InferenceServerClient(url.removeprefix("http://"))
    text, params = _inputs(httpclient, long_prompt)
    params.set_data_from_numpy(np.array([json.dumps(GREEDY).encode()], dtype=object), binary_data=False)
    with pytest.raises(InferenceServerException, match="context of") as caught:
        http.infer(model, [text, params], headers={**AUTH})
    assert caught.value.status() == "400" and f"max_tokens={GREEDY['max_tokens']}" in str(caught.value)
    abandoned = _metric(router, "umem_big_request_bodies_total", outcome="abandoned")
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as leaver:
        leaver.sendall(f"POST /v2/models/{model}/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(pad) + 2}\r\n\r\n{{".encode() + pad[:50_000])
    deadline = time.monotonic() + 30
    while _metric(router, "umem_big_request_bodies_total", outcome="abandoned") < abandoned + 1:
        assert time.monotonic() < deadline, "the client that left was not counted"
        time.sleep(0.1)
    assert not [line for line in router.log if "Traceback" in line or "internal error" in line]
