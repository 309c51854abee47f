"""The router as a real process on loopback, three tiny real models, the official openai client."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from clearml_umem.catalog import write_manifest
from clearml_umem.spec import spec_from_mapping
from tests.routerproc import RouterProcess, start_room_for_one, start_router

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

CHAT = [{"role": "user", "content": "Tell me about tiers."}]


@pytest.fixture(scope="module")
def served(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    router, names = start_room_for_one(tiny_models, tmp_path_factory.mktemp("router"))
    yield router, names
    router.kill()


def _client(router: RouterProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus series' samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        label_text = line[len(name) + 1:line.index("}")]
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_every_model_answers_streaming_and_not_with_swaps(served) -> None:
    router, names = served
    client = _client(router)
    listed = {m.id for m in client.models.list().data}
    assert listed == set(names)

    first_answers = {}
    for name in names:
        raw = client.chat.completions.with_raw_response.create(model=name, messages=CHAT, max_tokens=8,
                                                               temperature=0)
        assert raw.headers["x-umem-served-from"] == "cold"
        chat = raw.parse()
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content
        assert chat.choices[0].finish_reason in ("length", "stop")
        assert chat.usage is not None and chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 0
        first_answers[name] = chat.choices[0].message.content

        pieces = []
        finish = None
        for chunk in client.chat.completions.create(model=name, messages=CHAT, max_tokens=8, temperature=0,
                                                    stream=True):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        assert "".join(pieces) == first_answers[name]
        assert finish in ("length", "stop")

        comp = client.completions.create(model=name, prompt="Once upon a time", max_tokens=6, temperature=0)
        assert comp.choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=name, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True) if c.choices)
        assert streamed == comp.choices[0].text

    # Each model was evicted by the next one: answering again means swapping back from RAM,
    # and greedy output must be identical to the answer before the swap.
    for name in names:
        raw = client.chat.completions.with_raw_response.create(model=name, messages=CHAT, max_tokens=8,
                                                               temperature=0)
        assert raw.headers["x-umem-served-from"] == "ram"
        assert raw.parse().choices[0].message.content == first_answers[name]

    admin = httpx.get(router.url + "/admin/models").json()["data"]
    tiers = {row["name"]: row["tier"] for row in admin}
    assert sorted(tiers.values()) == ["gpu", "ram", "ram"], tiers
    assert all(row["uses"] >= 5 and row["last_used"] for row in admin)
    assert all(row["size_bytes"] > 0 for row in admin)

    metrics = httpx.get(router.url + "/metrics").text
    for name in names:
        assert _metric(metrics, "umem_move_seconds_count", model=name, direction="in") >= 2
        assert _metric(metrics, "umem_move_seconds_count", model=name, direction="out") >= 1
        assert _metric(metrics, "umem_ttft_seconds_count", model=name, tier="cold") >= 1
        assert _metric(metrics, "umem_ttft_seconds_count", model=name, tier="ram") >= 1
        assert _metric(metrics, "umem_ttft_seconds_count", model=name, tier="gpu") >= 1
    assert _metric(metrics, "umem_memory_bytes", kind="device", what="used") > 0


def test_concurrent_requests_for_three_models_with_room_for_one(served) -> None:
    router, names = served
    client = _client(router)
    answers: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int, model: str) -> None:
        try:
            out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, temperature=0)
            answers[i] = out.choices[0].message.content or ""
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i, names[i % 3])) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert len(answers) == 9 and all(answers.values())


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "json"),
        (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}', 404, "no-such-model"),
        (b'{"model": "MODEL"}', 400, "messages"),
        (b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000000}', 400,
         "max_tokens"),
        (b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}', 400, "max_tokens"),
    ],
)
def test_bad_input_gets_openai_errors_and_server_keeps_serving(served, body: bytes, status: int,
                                                               needle: str) -> None:
    router, names = served
    body = body.replace(b"MODEL", names[0].encode())
    resp = httpx.post(router.url + "/v1/chat/completions", content=body,
                      headers={"content-type": "application/json"}, timeout=60)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert needle in error["message"].lower() or needle == error.get("param")
    assert error["type"]
    ok = _client(router).chat.completions.create(model=names[0], messages=CHAT, max_tokens=2, temperature=0)
    assert ok.choices[0].message.content


def test_openai_client_example_runs_against_the_router(served) -> None:
    router, names = served
    out = subprocess.run([sys.executable, str(REPO / "examples" / "openai_client.py"), "--base-url",
                          router.url + "/v1"], capture_output=True, text=True, timeout=300, check=True).stdout
    lines = out.strip().splitlines()
    assert sorted(line.split(" ")[0] for line in lines) == sorted(names)
    assert all(re.search(r"\(from (gpu|ram|disk|cold)\): first token after \d+ ms: .+", line) for line in lines), out


def test_openai_client_raises_typed_errors(served) -> None:
    router, _ = served
    with pytest.raises(openai.NotFoundError):
        _client(router).chat.completions.create(model="missing", messages=CHAT, max_tokens=2)


def test_stop_and_kill_leave_no_process_behind(served, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    served_router, _ = served
    specs = [spec_from_mapping({"name": n, "weights": str(p)}) for n, p in list(tiny_models.items())[:1]]
    manifest = tmp_path / "one.yaml"
    write_manifest(manifest, specs)
    for how in ("terminate", "kill"):
        router = start_router(manifest, tmp_path, "--device", "cpu", "--device-budget", "1GB",
                              "--host-budget", "1GB")
        client = _client(router)
        assert client.chat.completions.create(model=specs[0].name, messages=CHAT, max_tokens=2).choices
        # a body over 64 KiB starts the parser processes: they end with the router too
        with pytest.raises(openai.BadRequestError, match="at most 10000"):
            client.chat.completions.create(model=specs[0].name, messages=[{"role": "user", "content": "x"}] * 20_000)
        parsers = [p for p in router.descendants() if "clearml_umem.parser_child" in " ".join(p.cmdline())]
        assert parsers
        assert router.end_leaving(how) == []
    assert served_router.proc.poll() is None


def test_a_prompt_over_the_context_is_refused_before_any_move(served) -> None:
    """With one model hot, a too-long prompt for another is a 400 naming the field, and nothing moves."""
    router, names = served
    first, other = names[0], names[1]
    client = _client(router)
    client.chat.completions.create(model=first, messages=CHAT, max_tokens=2)

    def tiers() -> dict[str, str]:
        return {r["name"]: r["tier"] for r in httpx.get(router.url + "/admin/models", timeout=30).json()["data"]}

    def moves() -> float:
        return _metric(httpx.get(router.url + "/metrics", timeout=30).text, "umem_move_seconds_count")

    before_tiers, before_moves = tiers(), moves()
    assert before_tiers[first] == "gpu" and before_tiers[other] != "gpu"
    for kind, body in (("messages", {"messages": [{"role": "user", "content": "x" * 5000}]}),
                       ("prompt", {"prompt": "y" * 5000})):
        path = "/v1/chat/completions" if kind == "messages" else "/v1/completions"
        resp = httpx.post(router.url + path, json={"model": other, "max_tokens": 4, **body}, timeout=120)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == kind and error["code"] == "context_length_exceeded"
        assert "context length" in error["message"]
    assert tiers() == before_tiers and moves() == before_moves, "nothing moved for a request that could never fit"


def test_clients_that_hang_up_cost_their_model_nothing(served) -> None:
    """Streaming and non-streaming clients ask for long answers and hang up; the next request for
    another model (room for one) moves the first to RAM as usual: no failed move, no drop to cold."""
    router, names = served
    first, other = names[0], names[1]

    def failures() -> float:
        return _metric(httpx.get(router.url + "/metrics", timeout=30).text, "umem_move_failures_total")

    before = failures()
    body = {"model": first, "messages": CHAT, "max_tokens": 1500, "temperature": 0}
    for _ in range(4):
        with httpx.stream("POST", router.url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=120) as resp:
            assert resp.status_code == 200
            next(resp.iter_lines())  # the first chunk, then hang up
    for _ in range(2):  # non-streaming: give up while the answer is being written
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(router.url + "/v1/chat/completions", json=body, timeout=0.5)
    answer = _client(router).chat.completions.create(model=other, messages=CHAT, max_tokens=2)
    assert answer.choices[0].message.content is not None
    rows = {r["name"]: r for r in httpx.get(router.url + "/admin/models", timeout=30).json()["data"]}
    assert rows[other]["tier"] == "gpu"
    assert rows[first]["tier"] == "ram", rows[first]
    assert rows[first]["last_error"] is None and failures() == before


def test_conflicting_placements_all_answer_promptly(served) -> None:
    """All models to gpu at once (room for one), then one model to gpu, cold and ram at once: every call
    answers, done or a 409 naming the later placement that overtook it."""
    router, names = served
    from concurrent.futures import ThreadPoolExecutor

    def place(model: str, tier: str) -> httpx.Response:
        return httpx.post(f"{router.url}/admin/models/{model}/place", json={"tier": tier}, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda n: place(n, "gpu"), names))
    assert [a.status_code for a in answers] == [200] * len(names), [a.text for a in answers]

    target = names[0]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(place, target, tier) for tier in ("gpu", "cold", "ram")]
        answers = [f.result(timeout=120) for f in futures]
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 409} and 200 in codes, [a.text for a in answers]
    for a in answers:
        if a.status_code == 409:
            assert a.json()["error"]["code"] == "placement_overtaken" and "overtook" in a.json()["error"]["message"]
    done = {t for a, t in zip(answers, ("gpu", "cold", "ram"), strict=True) if a.status_code == 200}
    final = {r["name"]: r["tier"] for r in httpx.get(router.url + "/admin/models", timeout=30).json()["data"]}
    assert final[target] in done


def test_a_full_queue_answers_429_with_retry_after_and_bounds_the_work(tiny_models, tmp_path) -> None:
    """Many clients at once for one model: it runs at most its concurrency, queues a bounded number,
    and answers the rest at once with a 429 and Retry-After (which OpenAI SDKs honour), never a 5xx."""
    from concurrent.futures import ThreadPoolExecutor

    spec = spec_from_mapping({"name": "tiny-llama", "weights": str(tiny_models["tiny-llama"])})
    manifest = tmp_path / "models.yaml"
    write_manifest(manifest, [spec])
    router = start_router(manifest, tmp_path / "work", "--device", "cpu", "--max-waiting", "2")
    try:
        peak = [0]
        over: list[dict] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                row = httpx.get(router.url + "/admin/models", timeout=30).json()["data"][0]
                peak[0] = max(peak[0], row["in_flight"])
                if row["in_flight"] > row["engine_details"]["max_concurrency"] or row["waiting"] > 2:
                    over.append(row)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 200, "temperature": 0}
        assert httpx.post(router.url + "/v1/completions", json={**body, "max_tokens": 1}, timeout=120).is_success
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: httpx.post(router.url + "/v1/completions", json=body, timeout=120),
                                    range(16)))
        stop.set()
        watcher.join(timeout=30)
        codes = sorted(a.status_code for a in answers)
        assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 2 + 1, codes
        assert peak[0] >= 1 and over == [], over
        busy = next(a for a in answers if a.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"
        assert busy.json()["error"]["type"] == "rate_limit_error"
    finally:
        router.kill()


def test_a_killed_engine_is_shown_cold_with_the_reason_and_serves_again(tmp_path) -> None:
    """kill -9 of an engine process between requests: the router notices within seconds, shows the
    model cold with the exit as last_error, counts the death, and the next request starts it again.
    The engine is the vLLM stand-in (tests/fixtures/fake_vllm_server.py) run as vLLM is."""
    import os
    import signal

    from tests.routerproc import start_fake_vllm_router
    from tests.waiting import wait_until

    router = start_fake_vllm_router(tmp_path)
    try:
        body = {"model": "fake-vllm", "prompt": "hi", "max_tokens": 2}
        assert httpx.post(router.url + "/v1/completions", json=body, timeout=60).status_code == 200

        def row() -> dict:
            return httpx.get(router.url + "/admin/models", timeout=30).json()["data"][0]

        assert row()["tier"] == "gpu" and row()["last_error"] is None
        os.kill(row()["engine_details"]["pid"], signal.SIGKILL)
        assert wait_until(lambda: row()["tier"] == "cold", 15), row()
        assert "exited with code -9" in row()["last_error"]
        assert _metric(httpx.get(router.url + "/metrics", timeout=30).text, "umem_engine_deaths_total") == 1
        again = httpx.post(router.url + "/v1/completions", json=body, timeout=60)
        assert again.status_code == 200 and again.headers["x-umem-served-from"] == "cold"
    finally:
        router.kill()
