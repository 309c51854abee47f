"""The fleet on loopback: three real routers (CPU), the real front (`clearml-umem front`) and the
real forwarder (serving/preprocess.py), over real HTTP; faults by killing a router; discovery from
a static list and, through the ClearML SDK, from running serve tasks on the local API fixture."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.fixtures.clearml_api_server import running_fixture
from tests.fleetproc import Fleet3, FrontProcess, start_fleet3, start_front, wait_for

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Tell me about tiers."}]
MODELS = ["tiny-llama", "tiny-mistral", "tiny-qwen2"]


@pytest.fixture(scope="module")
def fleet(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    started = start_fleet3(tiny_models, tmp_path_factory.mktemp("fleet"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def front(fleet: Fleet3):
    proc = start_front("--routers", ",".join(fleet.urls), "--probe-seconds", "0.3")
    yield proc
    proc.stop()


def place(url: str, model: str, tier: str) -> None:
    resp = httpx.post(f"{url}/admin/models/{model}/place", json={"tier": tier}, timeout=120)
    assert resp.status_code == 200, resp.text


def front_sees(front: FrontProcess, url: str, model: str, tier: str) -> bool:
    status = httpx.get(front.url + "/fleet/status", timeout=10).json()
    return any(r["url"] == url and any(m["id"] == model and m["tier"] == tier for m in r["models"])
               for r in status["routers"])


def chat(front: FrontProcess, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(front.url + "/v1/chat/completions", timeout=120,
                      json={"model": model, "messages": CHAT, "max_tokens": 3, **extra})


def test_front_lists_the_fleet_and_routes_to_where_the_model_is_hot(fleet: Fleet3, front: FrontProcess) -> None:
    a, b, c = fleet.urls
    listed = httpx.get(front.url + "/v1/models", timeout=10).json()["data"]
    assert sorted(m["id"] for m in listed) == MODELS and all(m["routers"] == sorted(fleet.urls) for m in listed)
    health = httpx.get(front.url + "/health", timeout=10).json()
    assert health["alive"] == 3 and health["models"] == 3
    status = httpx.get(front.url + "/fleet/status", timeout=10).json()
    assert all(r["alive"] and r["device"].endswith("/cpu") for r in status["routers"])

    place(b, "tiny-qwen2", "gpu")
    wait_for(lambda: front_sees(front, b, "tiny-qwen2", "gpu"))
    for _ in range(3):
        resp = chat(front, "tiny-qwen2")
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-umem-router"] == b and resp.headers["x-umem-served-from"] == "gpu"
        assert resp.json()["choices"][0]["message"]["content"]

    # a replica hot on two routers: two requests at once go one to each
    place(a, "tiny-llama", "gpu")
    place(c, "tiny-llama", "gpu")
    wait_for(lambda: front_sees(front, a, "tiny-llama", "gpu") and front_sees(front, c, "tiny-llama", "gpu"))
    body = {"model": "tiny-llama", "messages": CHAT, "max_tokens": 40, "stream": True}
    url = front.url + "/v1/chat/completions"
    with httpx.Client(timeout=120) as client, client.stream("POST", url, json=body) as first:
        first_chunks = first.iter_raw()
        first_text = next(first_chunks).decode()
        with client.stream("POST", url, json=body) as second:
            routers = {first.headers["x-umem-router"], second.headers["x-umem-router"]}
            second_text = second.read().decode()
        first_text += b"".join(first_chunks).decode()
    assert routers == {a, c}, "the front spreads a model's load over the routers where it is hot"
    assert first_text.rstrip().endswith("data: [DONE]") and second_text.rstrip().endswith("data: [DONE]")


def test_front_speaks_openai(fleet: Fleet3, front: FrontProcess) -> None:
    client = openai.OpenAI(base_url=front.url + "/v1", api_key="none", max_retries=0)
    assert sorted(m.id for m in client.models.list()) == MODELS
    text = "".join((chunk.choices[0].delta.content or "") for chunk in client.chat.completions.create(
        model="tiny-mistral", messages=CHAT, max_tokens=4, stream=True) if chunk.choices)
    assert text
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=2)
    assert refused.value.status_code == 503
    error = refused.value.body
    assert "no-such-model" in error["message"] and error["code"] == "model_not_served" and error["param"] == "model"
    bad = httpx.post(front.url + "/v1/completions", json={"prompt": "hi"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
    bad = httpx.post(front.url + "/v1/completions", content=b"{not json", timeout=10)
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    wrong = chat(front, "tiny-mistral", max_tokens=-3)
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "max_tokens", "a router's 4xx passes through"


def test_fleet_view_on_the_command_line(fleet: Fleet3, front: FrontProcess,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from clearml_umem.cli import main

    assert main(["ps", "--fleet", "--url", front.url]) == 0
    out = capsys.readouterr().out
    for url in fleet.urls:
        assert url in out
    assert "3 of 3 router(s) up" in out and "tiny-qwen2" in out
    assert main(["ps", "--fleet", "--routers", ",".join(fleet.urls), "--json"]) == 0
    assert sorted(r["url"] for r in json.loads(capsys.readouterr().out)["routers"]) == sorted(fleet.urls)


def run_cli(*args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "clearml_umem", *args], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_discovery_through_clearml_running_serve_tasks(fleet: Fleet3, tmp_path: Path) -> None:
    """The running serve tasks of a project, read through the real SDK: stopped ones and other
    projects are not the fleet."""
    a, b, c = fleet.urls
    with running_fixture() as api:
        api.add_task("serve", "llm-fleet", properties={"router_url": a + "/v1", "served_models": "x"})
        api.add_task("serve", "llm-fleet", properties={"router_url": b + "/v1"})
        api.add_task("serve", "llm-fleet", status="stopped", properties={"router_url": c + "/v1"})
        api.add_task("serve", "elsewhere", properties={"router_url": c + "/v1"})
        env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("CLEARML_")}
        env.update(api.env(), CLEARML_CONFIG_FILE=str(tmp_path / "none.conf"))
        out = json.loads(run_cli("ps", "--fleet", "--clearml-project", "llm-fleet", "--json", env=env))
        assert sorted(r["url"] for r in out["routers"]) == sorted([a, b])
        assert all(sorted(m["id"] for m in r["models"]) == MODELS for r in out["routers"])
        assert "tasks.get_all" in api.calls


def load_preprocess(monkeypatch: pytest.MonkeyPatch, **env: str):  # type: ignore[no-untyped-def]
    from tests.test_clearml_serving import load_preprocess as load

    return load(monkeypatch, **env)


def test_forwarder_routes_by_model_and_skips_a_dead_router(fleet: Fleet3, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, c = fleet.urls
    place(b, "tiny-qwen2", "gpu")
    dead = "http://127.0.0.1:9"
    module = load_preprocess(monkeypatch, UMEM_ROUTER_URL=",".join([dead, a, b, c]), UMEM_FLEET_PROBE_SECONDS="0.2")
    pre = module.Preprocess()
    pre.model_endpoint = SimpleNamespace(serving_url="qwen", auxiliary_cfg={"model": "tiny-qwen2"})

    async def go() -> tuple[Any, dict[str, Any], dict[str, Any]]:
        state: dict[str, Any] = {}
        answer = await pre.process({"messages": CHAT, "max_tokens": 3}, state)
        client, view = module._fleet(pre.settings)
        return answer, state, view.status()

    answer, state, status = asyncio.run(go())
    assert answer["model"] == "tiny-qwen2" and state["umem_served_from"] == "gpu", "sent where the model is hot"
    down = [r for r in status["routers"] if not r["alive"]]
    assert [r["url"] for r in down] == [dead]

    async def not_served() -> Any:
        return await pre.process({"model": "no-such-model", "prompt": "hi"}, {})

    refused = asyncio.run(not_served())
    assert refused.status_code == 503 and b"no-such-model" in refused.body


class Named(BaseModel):
    """Stands for main's request model (vLLM's CompletionRequest | ChatCompletionRequest): a body naming a model."""

    model: str


def test_forwarder_holds_many_requests_at_once(fleet: Fleet3, monkeypatch: pytest.MonkeyPatch) -> None:
    """One async client, no pool of its own: 16 requests reach the router together (in threads
    from asyncio's default pool, `requests` held min(32, cores + 4) of them: 6 on 2 cores)."""
    a = fleet.urls[0]
    place(a, "tiny-llama", "gpu")
    module = load_preprocess(monkeypatch, UMEM_ROUTER_URL=a)
    pre = module.Preprocess()
    pre.model_endpoint = SimpleNamespace(serving_url="tiny-llama", auxiliary_cfg=None)
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        with httpx.Client(timeout=10) as client:
            while not done.is_set():
                rows = client.get(a + "/status").json()["models"]
                seen.append(sum(m["in_flight"] + m["waiting"] for m in rows))

    async def burst() -> list[Any]:
        return await asyncio.gather(*(pre.process({"messages": CHAT, "max_tokens": 24}, {}) for _ in range(16)))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        answers = asyncio.run(burst())
    finally:
        done.set()
        watcher.join(timeout=10)
    assert all(answer["choices"][0]["message"]["content"] is not None for answer in answers)
    assert max(seen) >= 12, f"the router saw at most {max(seen)} of 16 at once"


def test_models_list_on_clearml_serving_main_route(fleet: Fleet3, monkeypatch: pytest.MonkeyPatch) -> None:
    """clearml-serving main's route (`/serve/openai/{endpoint_type:path}`, GET and POST) wants a JSON
    body naming a model; an OpenAI client's `models.list()` sends none. Its app is stood in for here
    by the same route declaration (main itself needs vLLM to import); loading the forwarder puts
    a body-less list route ahead of it."""
    from fastapi import APIRouter, FastAPI
    from starlette.testclient import TestClient

    app = FastAPI()
    router = APIRouter(prefix="/serve")

    @router.post("/openai/{endpoint_type:path}")
    @router.get("/openai/{endpoint_type:path}")
    async def openai_serve_model(endpoint_type: str, request: Named) -> dict[str, Any]:
        return {"endpoint": request.model}

    app.include_router(router)
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/serve/openai/v1", api_key="none", http_client=http,
                               max_retries=0)
        with pytest.raises(openai.UnprocessableEntityError):
            client.models.list()
        monkeypatch.setitem(sys.modules, "clearml_serving.serving.main", SimpleNamespace(app=app))
        load_preprocess(monkeypatch, UMEM_ROUTER_URL=",".join(fleet.urls))
        assert sorted(m.id for m in client.models.list()) == MODELS
        assert http.post("/serve/openai/v1/chat/completions", json={"model": "m"}).json() == {"endpoint": "m"}


def test_fleet_routing_benchmark_runs_both_variants(fleet: Fleet3, tiny_models: dict[str, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmark stays runnable (smoke: few requests, on this module's routers)."""
    from benchmarks.fleet_routing import main

    aware, turns = main(["--routers", ",".join(fleet.urls), "--requests", "9", "--max-tokens", "2",
                         "--models-dir", str(tiny_models["tiny-llama"].parent)])
    for run in (aware, turns):
        assert len(run.ttft) == 9 and not run.errors and run.swaps >= 1
    assert aware.swaps <= turns.swaps
    out = capsys.readouterr().out
    assert "| model-aware | 9/9 |" in out and "round-robin / model-aware: swaps" in out


def test_a_killed_router_fails_its_own_requests_only_and_rejoins(fleet: Fleet3, front: FrontProcess) -> None:
    a, b, c = fleet.urls
    for url in (a, b):
        place(url, "tiny-mistral", "cold")
    for url in (a, c):
        place(url, "tiny-qwen2", "cold")
    place(c, "tiny-mistral", "gpu")
    place(b, "tiny-qwen2", "gpu")
    wait_for(lambda: front_sees(front, c, "tiny-mistral", "gpu") and front_sees(front, b, "tiny-qwen2", "gpu")
             and front_sees(front, a, "tiny-mistral", "cold"))
    stream = {"messages": CHAT, "max_tokens": 60, "stream": True, "temperature": 0}
    url = front.url + "/v1/chat/completions"
    held: list[httpx.Response] = []

    def load_on_c() -> int:
        """requests for tiny-mistral on router C, running or queued"""
        rows = httpx.get(c + "/status", timeout=10).json()["models"]
        return sum(m["in_flight"] + m["waiting"] for m in rows if m["id"] == "tiny-mistral")

    with httpx.Client(timeout=120) as client, \
            client.stream("POST", url, json={**stream, "model": "tiny-qwen2"}) as other, \
            client.stream("POST", url, json={**stream, "model": "tiny-mistral", "max_tokens": 1500}) as victim:
        assert victim.headers["x-umem-router"] == c and other.headers["x-umem-router"] == b
        victim_chunks = victim.iter_raw()
        cut = next(victim_chunks).decode()
        # a request that has had no byte of its answer yet (a JSON answer still being generated, or
        # queued behind the stream): started while the long stream holds C, so it cannot be done first
        waiting = threading.Thread(target=lambda: held.append(chat(front, "tiny-mistral", max_tokens=1500)),
                                   daemon=True)
        waiting.start()

        def second_on_c() -> bool:
            """the second request for tiny-mistral reached router C (if it was answered already, or
            refused, or C's status shows otherwise, say so instead of waiting out the timeout)"""
            if held:
                raise AssertionError(f"the second request ended before it was seen on C: {held[0].status_code} "
                                     f"{held[0].headers.get('x-umem-router')} {held[0].text[:300]}")
            return load_on_c() >= 2

        # generous: on a loaded 2-core CI the front's forward and C's queue can take a while
        wait_for(second_on_c, timeout=60)
        fleet.routers[2].kill()
        cut += b"".join(victim_chunks).decode()
        whole = other.read().decode()
    events = [line[len("data: "):] for line in cut.splitlines() if line.startswith("data: ")]
    assert json.loads(events[-1])["error"]["code"] == "router_gone", "the stream ends with a clean error"
    assert whole.rstrip().endswith("data: [DONE]"), "a request on another router is not disturbed"
    waiting.join(timeout=60)
    assert held and held[0].status_code == 502 and held[0].json()["error"]["code"] == "router_gone", \
        "a request the router held gets a clean 502"

    wait_for(lambda: not next(r for r in httpx.get(front.url + "/fleet/status", timeout=10).json()["routers"]
                              if r["url"] == c)["alive"], timeout=10)
    for _ in range(2):
        resp = chat(front, "tiny-mistral")
        assert resp.status_code == 200 and resp.headers["x-umem-router"] in (a, b)

    threading.Thread(target=fleet.start, args=(2,), daemon=True).start()
    wait_for(lambda: front_sees(front, c, "tiny-mistral", "cold"), timeout=120, period=0.3)
    assert httpx.get(front.url + "/health", timeout=10).json()["alive"] == 3


def test_front_cli_refuses_a_bad_setting(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from clearml_umem.cli import main

    for name in ("UMEM_FLEET_ROUTERS", "UMEM_FLEET_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["front", "--routers", "localhost:8000"]) == 2
    assert "--routers" in capsys.readouterr().err
    assert main(["front"]) == 2
    assert "--clearml-project" in capsys.readouterr().err
    assert main(["front", "--routers", "http://h:1", "--clearml-project", "p"]) == 2
    assert "not both" in capsys.readouterr().err
