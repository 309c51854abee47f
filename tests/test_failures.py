"""What the router does when a prompt is too long, a chat template refuses, the catalog reads
short and a config.json does not match its weights: one real router process on loopback,
real transformers engines, real HTTP (issue 17, points 3, 4, 8, 9)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from clearml_umem.engines.base import GenerationRequest, InvalidRequest
from clearml_umem.engines.prompt_check import PromptCounter
from tests.routerproc import RouterProcess, start_router
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
