"""Served models on ClearML's Model Endpoints page, through the SDK's own EndpointTelemetry."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from clearml_umem.clearml_io.endpoints import endpoint_fields, reachable_url
from clearml_umem.spec import spec_from_mapping
from tests.clearml_env import offline_env, run_python

ENDPOINTS_SCRIPT = textwrap.dedent("""
    import json, sys
    from clearml import Task
    from clearml_umem.clearml_io.endpoints import ModelEndpoints, register_endpoints
    from clearml_umem.events import FirstToken, RequestFinished
    from clearml_umem.spec import spec_from_mapping
    from clearml_umem.tiers import Tier

    task = Task.init(project_name="umem-tests", task_name="endpoints", auto_resource_monitoring=False)
    specs = [spec_from_mapping({"name": "llama", "weights": sys.argv[1], "model_id": "0123abcd",
                                "tags": ["chat"]}),
             spec_from_mapping({"name": "qwen", "weights": sys.argv[1]})]
    offline = register_endpoints(task, specs, "http://0.0.0.0:8000")
    endpoints = ModelEndpoints(specs, "http://10.0.0.7:8000", "https://app.example", report=False)
    for i, duration in enumerate((0.2, 0.4)):
        endpoints.on_event(FirstToken("llama", 0.0, f"r{i}", Tier.GPU, 0.1))
        endpoints.on_event(RequestFinished("llama", 0.0, f"r{i}", Tier.GPU, True, 3, duration))
    endpoints.on_event(RequestFinished("not-served", 0.0, "x", Tier.GPU, True, 3, 1.0))
    out = {"offline": offline is None, "task": task.id}
    for name, telemetry in endpoints.telemetry.items():
        out[name] = {"info": telemetry.container_info, "requests": telemetry.requests_num,
                     "window": telemetry.requests_num_window, "latency_ms": telemetry.latency_sum_window}
    endpoints.close()
    task.close()
    print("RESULT " + json.dumps(out))
""")


def test_each_served_model_is_an_endpoint_with_its_requests(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    proc = run_python(["-c", ENDPOINTS_SCRIPT, str(tiny_models["tiny-llama"])], offline_env(tmp_path))
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    assert out["offline"], "offline, the SDK sends nothing: no endpoint is registered"

    llama = out["llama"]["info"]
    assert (llama["endpoint_name"], llama["model_name"]) == ("llama", "llama")
    assert llama["endpoint_url"] == "http://10.0.0.7:8000/v1"
    assert llama["model_source"] == "ClearML" and llama["tags"] == ["chat"]
    references = {ref["type"]: ref["value"] for ref in llama["reference"]}
    assert references == {"task": out["task"], "model": "0123abcd",
                          "url": "https://app.example/projects/*/models/0123abcd/general"}
    assert out["llama"]["requests"] == out["llama"]["window"] == 2
    assert 550 <= out["llama"]["latency_ms"] <= 700, "each request counted with its own duration (0.2 s + 0.4 s)"

    qwen = out["qwen"]["info"]
    assert {ref["type"] for ref in qwen["reference"]} == {"task"}, "no registry entry, no model link"
    assert out["qwen"]["requests"] == 0


def test_a_wildcard_listen_address_becomes_the_machines_address() -> None:
    ip = lambda: "10.1.2.3"  # noqa: E731
    assert reachable_url("http://0.0.0.0:8000", ip) == "http://10.1.2.3:8000"
    assert reachable_url("http://[::]:8000", ip) == "http://10.1.2.3:8000"
    assert reachable_url("http://[::]:8000", lambda: "fd00::5") == "http://[fd00::5]:8000"
    assert reachable_url("http://gpu-7.internal:8000", ip) == "http://gpu-7.internal:8000"


def test_endpoint_fields_name_the_openai_base_url(tiny_models: dict[str, Path]) -> None:
    spec = spec_from_mapping({"name": "m", "weights": str(tiny_models["tiny-llama"])})
    fields = endpoint_fields(spec, "http://10.0.0.7:8000/", "https://app.example")
    assert fields["endpoint_url"] == "http://10.0.0.7:8000/v1"
    assert "model" not in fields and "model_url" not in fields


def test_the_router_url_others_reach() -> None:
    from clearml_umem.clearml_io.serve_record import public_router_url

    ip = lambda: "10.1.2.3"  # noqa: E731
    assert public_router_url("http://0.0.0.0:8000", "", ip) == "http://10.1.2.3:8000"
    assert public_router_url("http://0.0.0.0:8000", "https://llm.example/ ", ip) == "https://llm.example", \
        "port publishing or a load balancer: the address given"
