"""What the router does when a prompt is too long, a chat template refuses, the catalog reads
short and a config.json does not match its weights: one real router process on loopback,
real transformers engines, real HTTP (issue 17, points 3, 4, 8, 9)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from clearml_umem.engines.base import GenerationRequest, InvalidRequest
from clearml_umem.engines.prompt_check import PromptCounter
from tests.llamacpp_env import SKIP_REASON as LLAMA_SKIP
from tests.routerproc import RouterProcess, start_fake_vllm_router, start_router
from tests.waiting import wait_until

STRICT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System messages are not supported by this template.') }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)
"""Refuses as Mistral-Instruct's and Llama-2-chat's templates do, through `raise_exception`."""

WIDE = 16384
"""hidden_size written into a copy of tiny-llama's config.json: its weights say 256. Loading
that module through from_pretrained would allocate about 320 MB, against a 100 MB host budget."""


def _variant(source: Path, dest: Path, **replace: str) -> Path:
    """A model directory that links to `source`'s files except those given as new text."""
    dest.mkdir()
    for item in source.iterdir():
        if item.name not in replace:
            (dest / item.name).symlink_to(item)
    for name, text in replace.items():
        (dest / name).write_text(text)
    return dest


def _manifest(path: Path, models: dict[str, Path]) -> None:
    """Written in place, not renamed over: a poll may see it half-written, as `cat > models.yaml` does."""
    with open(path, "w") as fh:
        fh.write("models:\n" + "".join(f"  - name: {n}\n    weights: {p}\n" for n, p in models.items()))


@pytest.fixture(scope="module")
def served(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("failures")
    llama = tiny_models["tiny-llama"]
    config = json.loads((llama / "config.json").read_text())
    models = {
        "tiny-llama": llama,
        "strict": _variant(llama, root / "strict", **{"chat_template.jinja": STRICT_TEMPLATE}),
        "wide": _variant(llama, root / "wide", **{"config.json": json.dumps({**config, "hidden_size": WIDE})}),
    }
    manifest = root / "models.yaml"
    _manifest(manifest, models)
    router = start_router(manifest, root / "work", "--device", "cpu", "--device-budget", "100MB",
                          "--host-budget", "100MB", "--catalog-poll-seconds", "0.2",
                          env={"UMEM_CATALOG_REMOVAL_GRACE_SECONDS": "3"})
    yield router, manifest, models
    router.kill()


def _client(router: RouterProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _row(router: RouterProcess, name: str) -> dict:
    rows = httpx.get(router.url + "/admin/models", timeout=30).json()["data"]
    return next(r for r in rows if r["name"] == name)


# -- 3: a long prompt -----------------------------------------------------------------------


def test_a_prompt_that_cannot_fit_is_refused_from_its_length_without_tokenizing(served) -> None:
    """8 MB for a 2048-token context: refused from its bytes (the message says "at least"), and
    a small request for the same model is answered while nothing tokenizes it."""
    router, _, _ = served
    small: list[int] = []

    def other() -> None:
        small.append(httpx.post(router.url + "/v1/completions", timeout=120, json={
            "model": "tiny-llama", "prompt": "Hello", "max_tokens": 2, "temperature": 0}).status_code)

    thread = threading.Thread(target=other)
    thread.start()
    big = httpx.post(router.url + "/v1/completions", timeout=120, json={
        "model": "tiny-llama", "prompt": "x" * 8_000_000, "max_tokens": 4})
    thread.join(120)
    assert big.status_code == 400, big.text
    error = big.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "at least 615385 tokens" in error["message"]  # 8,000,000 bytes / 13 (its longest token)
    assert small == [200]


class _SlowTokenizer:
    """Blocks its first call until released: a long prompt being tokenized."""

    chat_template = None

    def __init__(self, started: threading.Event, release: threading.Event) -> None:
        self.started, self.release = started, release

    def __call__(self, text: str) -> dict[str, list[int]]:
        if text == "long":
            self.started.set()
            assert self.release.wait(30)
        return {"input_ids": list(range(len(text)))}


def test_no_lock_is_held_across_a_tokenization() -> None:
    """A tokenization in progress (one thread) does not make another request's check wait."""
    started, release = threading.Event(), threading.Event()
    counter = PromptCounter("m", Path("/nowhere"), loader=lambda _: _SlowTokenizer(started, release))
    long = threading.Thread(target=counter.count, args=(GenerationRequest(prompt="long"),))
    long.start()
    try:
        assert started.wait(30)
        done: list[int | None] = []
        short = threading.Thread(target=lambda: done.append(counter.count(GenerationRequest(prompt="hi"))))
        short.start()
        short.join(10)
        assert done == [2]
        assert counter.tokenizers == 2
    finally:
        release.set()
        long.join(30)


def test_the_tokenizer_pool_is_bounded_and_every_check_ends() -> None:
    from clearml_umem.engines import prompt_check

    started, release = threading.Event(), threading.Event()
    counter = PromptCounter("m", Path("/nowhere"), loader=lambda _: _SlowTokenizer(started, release))
    done: list[int | None] = []
    threads = [threading.Thread(target=lambda: done.append(counter.count(GenerationRequest(prompt="long"))))
               for _ in range(prompt_check.TOKENIZERS_PER_MODEL + 2)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: counter.tokenizers == prompt_check.TOKENIZERS_PER_MODEL, 10)
    time.sleep(0.2)
    assert counter.tokenizers == prompt_check.TOKENIZERS_PER_MODEL and done == []
    release.set()
    for thread in threads:
        thread.join(30)
    assert done == [4] * len(threads) and counter.tokenizers == prompt_check.TOKENIZERS_PER_MODEL


def test_the_length_bound_refuses_before_the_tokenizer_is_called(tiny_models: dict[str, Path]) -> None:
    calls: list[str] = []

    def loader(path: Path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        real = tokenizer.__class__.__call__

        class Counting(tokenizer.__class__):
            def __call__(self, text, **kw):
                calls.append(text)
                return real(self, text, **kw)

        tokenizer.__class__ = Counting
        return tokenizer

    counter = PromptCounter("tiny-llama", tiny_models["tiny-llama"], loader=loader)
    assert counter.count(GenerationRequest(prompt="hello"), context_length=2048) == 5
    with pytest.raises(InvalidRequest, match="at least 2308 tokens"):
        counter.count(GenerationRequest(prompt="y" * 30_000, max_tokens=1), context_length=2048)
    assert calls == ["hello"]


# -- 4: a chat template that refuses ----------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_template_that_refuses_the_messages_is_a_400_with_its_message(served, stream: bool) -> None:
    router, _, _ = served
    client = _client(router)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="strict", stream=stream, max_tokens=2, messages=[
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert caught.value.status_code == 400
    error = caught.value.body
    assert "System messages are not supported by this template." in error["message"]
    assert error["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="roles must alternate"):
        client.chat.completions.create(model="strict", max_tokens=2, messages=[
            {"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}])
    ok = client.chat.completions.create(model="strict", max_tokens=2, temperature=0,
                                        messages=[{"role": "user", "content": "Hi"}])
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert not [line for line in router.log if "Traceback" in line]


# -- 9: config.json that does not match its weights -----------------------------------------


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_config_that_does_not_match_the_checkpoint_is_refused_naming_the_shapes(served) -> None:
    router, _, _ = served
    before = _peak_rss(router.proc.pid)
    answer = httpx.post(router.url + "/v1/completions", timeout=120, json={
        "model": "wide", "prompt": "Hello", "max_tokens": 2})
    assert answer.status_code == 503, answer.text
    error = _row(router, "wide")["last_error"]
    assert "config.json does not match the checkpoint" in error
    assert f"(261, 256) on disk, (261, {WIDE})" in error
    assert _peak_rss(router.proc.pid) - before < 100 * 10**6  # the budget; a from_pretrained takes 320 MB
    assert httpx.get(router.url + "/health", timeout=30).status_code == 200


# -- 8: a catalog read short ----------------------------------------------------------------


def test_a_catalog_read_short_or_empty_keeps_its_models_and_serves_their_requests(served) -> None:
    """The manifest shows only its first entry for about 1.5 s (seven polls), then lists nothing:
    the other models stay listed and answer; a removal that lasts past the grace takes effect."""
    router, manifest, models = served
    body = {"model": "strict", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    statuses: list[int] = []
    _manifest(manifest, {"tiny-llama": models["tiny-llama"]})
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        statuses.append(httpx.post(router.url + "/v1/completions", json=body, timeout=120).status_code)
    manifest.write_text("models: []\n")
    time.sleep(1.0)
    statuses.append(httpx.post(router.url + "/v1/completions", json=body, timeout=120).status_code)
    listed = {m["id"] for m in httpx.get(router.url + "/v1/models", timeout=30).json()["data"]}
    _manifest(manifest, models)
    assert set(statuses) == {200}, statuses
    assert listed == set(models)
    assert sum("lists no models" in line for line in router.log) == 1

    _manifest(manifest, {n: p for n, p in models.items() if n != "strict"})
    assert wait_until(lambda: httpx.post(router.url + "/v1/completions", json=body,
                                         timeout=120).status_code == 404, timeout=30)
    _manifest(manifest, models)
    assert wait_until(lambda: httpx.post(router.url + "/v1/completions", json=body,
                                         timeout=120).status_code == 200, timeout=30)


# -- 5: a hung engine ----------------------------------------------------------------------


def _fake_vllm_router(tmp_path: Path, behaviour: dict) -> RouterProcess:
    """The vLLM stand-in's router with a one-second stall timeout."""
    return start_fake_vllm_router(tmp_path, behaviour, env={"UMEM_ENGINE_STALL_SECONDS": "1"})


def _stream_until_hung(router: RouterProcess, model: str,
                       on_stop: Callable[[], threading.Thread] | None = None, max_tokens: int = 400
                       ) -> tuple[dict, int]:
    """Stream a long answer, SIGSTOP the engine after its first chunk (then call `on_stop`, which
    starts another client); the error the client got and the engine's pid. The error is the stream's
    error event, which must be followed by [DONE]. If the engine hung before its first token, it is
    the body of a 503 instead.

    A tiny model can finish its answer before the stop lands (the whole stream already sits in
    socket buffers): then the engine is stopped before the next request is sent instead, which
    is a hang with a request in flight just the same. The other client started by the try that did
    not hang is waited for first: its request moves the models, and the engine stopped next would
    otherwise be one it is already evicting."""
    import os
    import signal

    def hot_pid() -> int:
        warm = httpx.post(router.url + "/v1/completions", timeout=60,
                          json={"model": model, "prompt": "Hi", "max_tokens": 1})
        assert warm.status_code == 200, warm.text
        return _row(router, model)["engine_details"]["pid"]

    body = {"model": model, "prompt": "Hello", "max_tokens": max_tokens, "stream": True}
    lines: list[str] = []
    for stop_first in (False, True):
        pid = hot_pid()
        stopped = stop_first
        other: threading.Thread | None = None
        error: dict | None = None
        if stop_first:
            os.kill(pid, signal.SIGSTOP)
        lines = []
        with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=30) as resp:
            if resp.status_code != 200:  # hung before its first token: the status can still say so
                resp.read()
                assert resp.status_code == 503, resp.text
                error = resp.json()["error"]
            else:
                for line in resp.iter_lines():
                    if not line:
                        continue
                    lines.append(line)
                    if not stopped:
                        os.kill(pid, signal.SIGSTOP)
                        stopped = True
                        if on_stop is not None:
                            other = on_stop()
                if len(lines) >= 2 and "error" in lines[-2]:
                    assert lines[-1] == "data: [DONE]", lines[-3:]
                    error = json.loads(lines[-2].removeprefix("data: "))["error"]
        if error is not None:
            if on_stop is not None and other is None:
                on_stop()
            return error, pid
        with contextlib.suppress(ProcessLookupError):  # stopped long enough, it was found hung and replaced
            os.kill(pid, signal.SIGCONT)
        if other is not None:
            other.join(60)
    raise AssertionError(f"the engine never hung under a request: {lines[-3:]}")


def test_a_hung_vllm_process_is_detected_its_stream_ends_with_an_error_and_it_serves_again(tmp_path: Path) -> None:
    """SIGSTOP of the engine mid-stream: within seconds the stream ends with an error event and
    [DONE], the process is stopped, the model shows cold with the reason, the next request starts
    it again."""
    router = _fake_vllm_router(tmp_path, {"token_delay_s": 0.05})
    try:
        started = time.monotonic()
        error, pid = _stream_until_hung(router, "fake-vllm")
        assert time.monotonic() - started < 30
        assert error["message"]
        row = _row(router, "fake-vllm")
        assert row["tier"] == "cold" and "hung" in row["last_error"] and "/health" in row["last_error"]
        assert wait_until(lambda: not psutil_alive(pid), 15)
        again = httpx.post(router.url + "/v1/completions", timeout=60,
                           json={"model": "fake-vllm", "prompt": "hi", "max_tokens": 2})
        assert again.status_code == 200 and again.headers["x-umem-served-from"] == "cold"
    finally:
        router.kill()


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_stuck_transformers_generation_errors_its_client_and_the_model_reloads_once_it_returns(
        tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A generation thread that makes no step (blocked here in its first decoding step): its client
    gets an error after the stall timeout, the runtime counts the model hung and cold, a new load is
    refused while the thread still holds the old copy, and allowed once the thread returns."""
    import asyncio

    from clearml_umem.engines import EngineContext, EngineError, create_engine
    from clearml_umem.runtime import Runtime
    from clearml_umem.spec import spec_from_mapping
    from clearml_umem.tiers import Tier

    release = threading.Event()
    engines = []

    def factory(spec, ctx):
        engine = create_engine(spec, ctx)
        real = engine._generate_sync

        def stuck_once(job, model, tokenizer):
            if not release.is_set():
                release.wait(60)
            return real(job, model, tokenizer)

        engine._generate_sync = stuck_once
        engines.append(engine)
        return engine

    async def scenario() -> None:
        # the per-request path's thread (a batched request never calls _generate_sync: test_batching)
        ctx = EngineContext(work_dir=tmp_path, device="cpu", options={"stall_timeout_s": 0.5, "batching": "off"})
        runtime = Runtime(10**9, 10**9, ctx, engine_factory=factory)
        runtime.add_model(spec_from_mapping({"name": "m", "weights": str(tiny_models["tiny-llama"])}))
        request = GenerationRequest(prompt="Hello", max_tokens=2, temperature=0)
        with pytest.raises(EngineError, match="no progress for 0.5 s"):
            async with runtime.lease("m", "r1") as lease:
                async for _ in lease.engine.generate(request):
                    pass
        assert await runtime.check_engines() == ["m"]
        row = runtime.admin_view()[0]
        assert row["tier"] == "cold" and "hung" in row["last_error"]
        with pytest.raises(Exception, match="still holds its previous copy"):
            async with runtime.lease("m", "r2"):
                pass
        release.set()
        assert await asyncio.to_thread(lambda: wait_until(lambda: engines[0].active_generations == 0, 30))
        async with runtime.lease("m", "r3") as lease:
            deltas = [d async for d in lease.engine.generate(request)]
        assert deltas[-1].finish_reason in ("stop", "length")
        assert runtime.state("m").tier is Tier.GPU
        await runtime.close()

    try:
        asyncio.run(scenario())
    finally:
        release.set()


def _gguf_router(tmp_path: Path, models: int) -> tuple[RouterProcess, list[str]]:
    """A router on the CPU serving the first `models` tiny GGUF models (with room for only one of them
    when there are more), whose engines count as hung after 1 s without progress."""
    from clearml_umem.catalog import write_manifest
    from clearml_umem.demo import room_for_one
    from clearml_umem.engines import EngineContext
    from clearml_umem.spec import spec_from_mapping
    from clearml_umem.tinygguf import DEMO_GGUF, ensure_tiny_gguf
    from tests.llamacpp_env import server_env

    files = ensure_tiny_gguf(tmp_path / "gguf", DEMO_GGUF[:models])
    specs = [spec_from_mapping({"name": n, "weights": str(p)}) for n, p in files.items()]
    manifest = tmp_path / "models.yaml"
    write_manifest(manifest, specs)
    budgets: list[str] = []
    if models > 1:
        device_budget, host_budget, _ = room_for_one(specs, EngineContext(work_dir=tmp_path, device="cpu"))
        budgets = ["--device-budget", str(device_budget), "--host-budget", str(host_budget)]
    router = start_router(manifest, tmp_path / "work", "--device", "cpu", *budgets,
                          env={**server_env(), "UMEM_ENGINE_STALL_SECONDS": "1"})
    return router, [spec.name for spec in specs]


@pytest.mark.skipif(LLAMA_SKIP is not None, reason=LLAMA_SKIP or "")
def test_a_hung_llama_server_frees_its_room_for_another_model(tmp_path: Path) -> None:
    """Two GGUF models with room for one; llama-server SIGSTOPped mid-stream: its stream ends with an
    error event, and the other model's request, which needs that room, is answered."""
    router, (first, other) = _gguf_router(tmp_path, models=2)
    try:
        other_status: list[int] = []

        def ask_other() -> None:
            other_status.append(httpx.post(router.url + "/v1/completions", timeout=20, json={
                "model": other, "prompt": "Hi", "max_tokens": 2}).status_code)

        askers: list[threading.Thread] = []

        def start_asker() -> threading.Thread:
            askers.append(threading.Thread(target=ask_other))
            askers[-1].start()
            return askers[-1]

        error, pid = _stream_until_hung(router, first, on_stop=start_asker)
        askers[-1].join(30)
        assert error["message"]
        assert other_status and set(other_status) == {200}, other_status
        row = _row(router, first)
        # cold with the reason; or, when the move that makes room for the other model ran right after
        # the stream's error, already on its way down (ram: the file held, no server)
        assert row["tier"] in ("cold", "ram")
        assert row["tier"] == "ram" or "hung" in row["last_error"]
        assert wait_until(lambda: not psutil_alive(pid), 15)
    finally:
        router.kill()


@pytest.mark.parametrize("engine", [
    pytest.param("llamacpp", marks=pytest.mark.skipif(LLAMA_SKIP is not None, reason=LLAMA_SKIP or "")),
    "vllm"])
def test_a_server_hung_before_the_first_token_is_not_started_again_under_the_request(
        engine: str, tmp_path: Path) -> None:
    """SIGSTOP of an idle server, then a request: the router finds it hung and stops it. The request
    had got nothing yet, so it used to take that stop for a crash and start a server of its own,
    outside the scheduler (llama-server's socket then went with the closed engine's, and the
    client waited until its timeout). Now the request gets a 503, and no server runs until the
    scheduler starts one."""
    import os
    import signal

    import psutil

    if engine == "llamacpp":
        router, (name,) = _gguf_router(tmp_path, models=1)
        program = "llama-server"
    else:
        router, name = _fake_vllm_router(tmp_path, {"token_delay_s": 0.05}), "fake-vllm"
        program = "fake_vllm_server"
    try:
        body = {"model": name, "prompt": "Hi", "max_tokens": 2}
        assert httpx.post(router.url + "/v1/completions", json=body, timeout=60).status_code == 200
        pid = _row(router, name)["engine_details"]["pid"]
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        answer = httpx.post(router.url + "/v1/completions", json={**body, "stream": True}, timeout=60)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "engine_error"
        assert time.monotonic() - started < 30
        # the 503 leaves as soon as the request sees its server gone; the model counts cold once the stop ends
        assert wait_until(lambda: _row(router, name)["tier"] == "cold", 15), _row(router, name)
        assert "hung" in _row(router, name)["last_error"]
        assert wait_until(lambda: not psutil_alive(pid), 15)
        servers = [p for p in psutil.Process(router.proc.pid).children(recursive=True)
                   if program in " ".join(p.cmdline())]
        assert servers == [], "a server was started under the request, behind the scheduler's back"
        log = "\n".join(router.log)
        assert "stopped under this request" in log and "started again" not in log
        again = httpx.post(router.url + "/v1/completions", json=body, timeout=60)
        assert again.status_code == 200 and again.headers["x-umem-served-from"] == "cold"
    finally:
        router.kill()


def test_a_check_whose_caller_left_is_abandoned_and_holds_nothing() -> None:
    """A prompt check runs in a daemon thread of its own: a cancelled caller (its client hung up)
    stops waiting at once, and the thread is no executor worker that shutdown would wait for."""
    import asyncio

    from clearml_umem.daemon_workers import DaemonWorkers, run_abandonable

    release = threading.Event()
    seen: list[threading.Thread] = []

    def tokenizing() -> int:
        seen.append(threading.current_thread())
        release.wait(30)
        return 1

    async def scenario() -> None:
        task = asyncio.ensure_future(run_abandonable(DaemonWorkers("umem-check"), tokenizing))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        started = time.monotonic()
        asyncio.run(scenario())
        # neither the cancelled caller nor asyncio.run's shutdown waited the 30 s the thread blocks
        assert time.monotonic() - started < 15
        assert seen and seen[0].daemon and seen[0].is_alive()
    finally:
        release.set()


def test_without_a_direct_read_from_pretrained_is_refused_when_the_config_is_larger_than_counted(
        tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path without accelerate (or without safetensors) loads through from_pretrained: it too
    refuses a config.json that describes more than the checkpoint holds, before allocating it."""
    import asyncio

    from clearml_umem.engines import EngineContext, EngineError
    from clearml_umem.engines import transformers_engine as te
    from clearml_umem.spec import spec_from_mapping
    from clearml_umem.tiers import Tier

    llama = tiny_models["tiny-llama"]
    config = json.loads((llama / "config.json").read_text())
    wide = _variant(llama, tmp_path / "wide", **{"config.json": json.dumps({**config, "hidden_size": WIDE})})
    engine = te.TransformersEngine(spec_from_mapping({"name": "wide", "weights": str(wide)}),
                                   EngineContext(work_dir=tmp_path, device="cpu"))
    monkeypatch.setattr(engine, "_empty_model", lambda: None)
    loaded: list[bool] = []
    monkeypatch.setattr(engine, "_load_on_cpu", lambda: loaded.append(True))
    with pytest.raises(EngineError, match=r"config.json describes \d+\.\d MB of parameters but the checkpoint holds"):
        asyncio.run(engine.move(Tier.COLD, Tier.GPU))
    assert loaded == []


def test_a_slow_step_that_progresses_layer_by_layer_is_not_a_stall(tiny_models: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    """Each decoding step takes about 1.2 s (0.3 s per layer, 4 layers) against a 0.5 s stall
    timeout: every layer that ends counts as progress (a long prefill), so the answer completes."""
    import asyncio

    from clearml_umem.engines import EngineContext
    from clearml_umem.engines.transformers_engine import TransformersEngine
    from clearml_umem.spec import spec_from_mapping
    from clearml_umem.tiers import Tier

    engine = TransformersEngine(spec_from_mapping({"name": "m", "weights": str(tiny_models["tiny-llama"])}),
                                EngineContext(work_dir=tmp_path, device="cpu", options={"stall_timeout_s": 0.5}))

    async def scenario() -> list:
        await engine.move(Tier.COLD, Tier.GPU)
        for layer in engine.model.model.layers:
            layer.register_forward_pre_hook(lambda *_: time.sleep(0.3))
        deltas = [d async for d in engine.generate(GenerationRequest(prompt="Hello", max_tokens=2, temperature=0))]
        await engine.close()
        return deltas

    deltas = asyncio.run(scenario())
    assert deltas[-1].finish_reason in ("stop", "length")
