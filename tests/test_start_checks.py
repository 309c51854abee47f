"""What can be known at start is said at start: the banner flags a GGUF model with no
llama-server and a model over the device budget, their requests get a 503 naming the reason
(no traceback in the log), `--strict` / `UMEM_STRICT` refuses to start; and a model's aliases
and default request settings, through the real router and the openai client."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import openai
import pytest

from clearml_umem.catalog import ManifestCatalog, write_manifest
from clearml_umem.engines import EngineContext, create_engine
from clearml_umem.spec import spec_from_mapping
from clearml_umem.tiers import Tier
from tests.routerproc import start_router

pytest.importorskip("gguf")
pytestmark = pytest.mark.slow


def _no_llama_server_env(tmp_path: Path) -> dict[str, str]:
    """A user who never built llama-server: not given, not on PATH, not in the install cache."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and not (Path(p) / "llama-server").exists())
    env = {**os.environ, "HOME": str(home), "PATH": path, "UMEM_LLAMA_SERVER": ""}
    env.pop("UMEM_LLAMA_CACHE", None)
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models):
    from clearml_umem.tinygguf import ensure_tiny_gguf

    tmp = tmp_path_factory.mktemp("startchecks")
    gguf_name, gguf_path = next(iter(ensure_tiny_gguf(tmp / "gguf").items()))
    specs = [
        spec_from_mapping({"name": "tiny-llama", "weights": str(tiny_models["tiny-llama"]),
                           "aliases": ["llama", "default"], "defaults": {"max_tokens": 3, "temperature": 0}}),
        spec_from_mapping({"name": "tiny-mistral", "weights": str(tiny_models["tiny-mistral"])}),
        spec_from_mapping({"name": gguf_name, "weights": str(gguf_path)}),
    ]
    ctx = EngineContext(work_dir=tmp, device="cpu")
    hot = {s.name: create_engine(s, ctx).footprint(Tier.GPU).device_bytes for s in specs[:2]}
    assert hot["tiny-mistral"] > hot["tiny-llama"]
    manifest = tmp / "models.yaml"
    write_manifest(manifest, specs)
    budget = ("--device", "cpu", "--device-budget", str(hot["tiny-llama"]), "--host-budget", "1GB")
    return tmp, manifest, budget, gguf_name


def test_the_banner_flags_what_will_not_load_and_requests_say_why(setup):
    tmp, manifest, budget, gguf_name = setup
    env = _no_llama_server_env(tmp)
    router = start_router(manifest, tmp / "work", *budget, env=env)
    try:
        banner = "\n".join(router.log)
        assert f"{gguf_name}: llamacpp" in banner and "WILL NOT LOAD: no llama-server binary" in banner, banner
        assert "tiny-mistral: transformers" in banner, banner
        assert "on the device but the device budget is" in banner and "it can never be loaded" in banner, banner
        assert "aliases llama, default" in banner, banner

        with httpx.Client(base_url=router.url, timeout=120) as http:
            for model, reason in ((gguf_name, "no llama-server binary"), ("tiny-mistral", "can never be loaded")):
                r = http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user",
                                                                                          "content": "hi"}]})
                assert r.status_code == 503, r.text
                assert reason in r.json()["error"]["message"], r.text
            r = http.post(f"/admin/models/{gguf_name}/place", json={"tier": "gpu"})
            assert r.status_code == 503 and "no llama-server binary" in r.text, r.text
            cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
            assert cards["tiny-llama"]["aliases"] == ["llama", "default"]
            assert set(cards) == {"tiny-llama", "tiny-mistral", gguf_name}, "aliases are not listed as models"
            assert http.get("/v1/models/llama").json()["id"] == "tiny-llama"

        client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": "Tell me a story"}]
        # the defaults (max_tokens 3, greedy) apply when the request leaves them unset, through an alias too
        a = client.chat.completions.create(model="llama", messages=msgs)
        b = client.chat.completions.create(model="tiny-llama", messages=msgs)
        assert a.model == "tiny-llama"
        assert (a.usage.completion_tokens, a.choices[0].finish_reason) == (3, "length")
        assert a.choices[0].message.content == b.choices[0].message.content, "greedy by default: same answer"
        # what the request sends wins
        c = client.chat.completions.create(model="default", messages=msgs, max_tokens=8)
        assert (c.usage.completion_tokens, c.choices[0].finish_reason) == (8, "length")
        assert c.choices[0].message.content.startswith(a.choices[0].message.content)
    finally:
        router.stop()
    assert "Traceback" not in "\n".join(router.log), "\n".join(router.log[-40:])


def test_strict_refuses_to_start_naming_each_model(setup, monkeypatch, capsys):
    """`UMEM_STRICT=1` (or `--strict`), through the CLI's `main` in this process: a new process
    would only add seconds of imports to what the router process above already showed."""
    from clearml_umem.cli import main

    tmp, manifest, budget, gguf_name = setup
    for key, value in {**_no_llama_server_env(tmp), "UMEM_STRICT": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("UMEM_LLAMA_CACHE", raising=False)
    code = main(["serve", "--manifest", str(manifest), "--port", "0", "--work-dir", str(tmp / "work-strict"), *budget])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "--strict: 2 model(s) cannot be served" in err, err[-2000:]
    assert f"model {gguf_name}: no llama-server binary" in err
    assert "model tiny-mistral: needs" in err
    assert "Traceback" not in err


def test_a_model_whose_engine_cannot_be_built_is_named_in_its_503(tmp_path, tiny_models):
    """As for a transformers model on an install without torch: the engine factory's error is the
    reason the banner lists and the model's clients get (not "does not exist")."""
    from clearml_umem.config import ServeConfig
    from clearml_umem.engines import EngineError
    from clearml_umem.server import UnifiedMemoryServer

    def factory(spec, ctx):
        if spec.name == "broken":
            raise EngineError("the transformers engine needs torch and transformers, which this Python lacks")
        return create_engine(spec, ctx)

    specs = [spec_from_mapping({"name": "ok", "weights": str(tiny_models["tiny-llama"]), "max_concurrency": 1}),
             spec_from_mapping({"name": "broken", "weights": str(tiny_models["tiny-qwen2"])})]
    write_manifest(tmp_path / "m.yaml", specs)
    config = ServeConfig(manifest=str(tmp_path / "m.yaml"), port=0, device="cpu", work_dir=str(tmp_path))
    server = UnifiedMemoryServer(config, engine_factory=factory)
    with server.run_in_thread() as url, httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/v1/completions", json={"model": "broken", "prompt": "hi"})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["param"] == "model"
        assert "cannot be served: the transformers engine needs torch" in r.json()["error"]["message"]
        assert http.post("/v1/completions", json={"model": "nope", "prompt": "hi"}).status_code == 404
        # the manifest's max_concurrency caps the engine's own limit (on a CPU: one request per core)
        row = next(m for m in http.get("/admin/models").json()["data"] if m["name"] == "ok")
        assert row["max_concurrency"] == 1


def test_a_binary_that_is_not_llama_server_is_known_at_start(setup, tmp_path):
    from clearml_umem.engines.llamacpp_engine import LlamaCppEngine

    _, manifest, _, gguf_name = setup
    spec = next(s for s in ManifestCatalog(manifest).snapshot().specs if s.name == gguf_name)
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\necho 'usage: not the server'\n")
    fake.chmod(0o755)
    engine = LlamaCppEngine(spec, EngineContext(work_dir=tmp_path, device="cpu", options={"llama_server": str(fake)}))
    assert "does not look like llama-server" in (engine.start_problem() or "")
    fake.chmod(0o644)
    engine = LlamaCppEngine(spec, EngineContext(work_dir=tmp_path, device="cpu", options={"llama_server": str(fake)}))
    assert engine.start_problem() == f"llama-server {fake} is not an executable file"


@pytest.mark.parametrize(("variable", "value"), [("UMEM_STRICT", "maybe"), ("UMEM_PIPELINED_SWAP_IN", "yess"),
                                                  ("UMEM_PORT", "80a")])
def test_a_bad_environment_value_is_one_line_naming_the_variable(monkeypatch, capsys, variable, value):
    """The flags' defaults are read from UMEM_* while the parser is built, before any command runs:
    a typo there was a traceback."""
    from clearml_umem.cli import main

    monkeypatch.setenv(variable, value)
    code = main(["serve", "--manifest", "models.yaml"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"clearml-umem: error: {variable}={value!r}: "), err
    assert "Traceback" not in err
