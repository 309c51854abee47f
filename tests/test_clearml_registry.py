"""Registration and the registry catalog with the real clearml SDK against the API test fixture.

The SDK builds, authenticates and parses every call itself; only the server is the
fixture in tests/fixtures/clearml_api_server.py (why: see its docstring). The SDK's
session is process-wide, so this module points it at one fixture for the whole run and
no test in this process uses offline mode.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clearml_umem.catalog import CatalogSnapshot
from clearml_umem.catalog_poller import CatalogPoller
from clearml_umem.clearml_io.metadata import SERVABLE_TAG
from clearml_umem.clearml_io.registry import (
    RegistryCatalog,
    RegistrySelector,
    register_model,
)
from clearml_umem.spec import SpecError, weights_size
from tests.clearml_env import write_sdk_config
from tests.fixtures.clearml_api_server import ApiError, ClearMLApiFixture
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClearMLApiFixture]:
    server = ClearMLApiFixture().start()
    tmp = tmp_path_factory.mktemp("clearml")
    env = {**server.env(), "CLEARML_CONFIG_FILE": str(write_sdk_config(tmp)),
           "CLEARML_CACHE_DIR": str(tmp / "cache")}
    env.pop("CLEARML_OFFLINE_MODE")
    saved = {k: os.environ.get(k) for k in [*env, "CLEARML_OFFLINE_MODE"]}
    os.environ.pop("CLEARML_OFFLINE_MODE", None)
    os.environ.update(env)
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def meta(**values: str) -> dict[str, str]:
    return {"size_bytes": "1000", "dtype": "bfloat16", "engine": "transformers", **values}


def test_registering_the_same_weights_twice_updates_one_entry(api: ClearMLApiFixture,
                                                              tiny_models: dict[str, Path]) -> None:
    first = register_model(str(tiny_models["tiny-llama"]), project="reg/dup", tags=["chat"])
    api.models[str(first.model_id)]["tags"].append("team-x")  # tagged by someone else in the web UI
    second = register_model(str(tiny_models["tiny-llama"]), project="reg/dup", tags=["v2"])
    assert first.created and not second.created
    assert first.model_id == second.model_id
    entries = [m for m in api.models.values() if m["uri"] == tiny_models["tiny-llama"].resolve().as_uri()]
    assert len(entries) == 1
    entry = entries[0]
    assert entry["name"] == "tiny-llama"
    assert api.projects[entry["project"]]["name"] == "reg/dup"
    assert entry["tags"] == [SERVABLE_TAG, "chat", "team-x", "v2"], "merged, not overwritten"
    assert entry["framework"] == "PyTorch"
    values = {k: v["value"] for k, v in entry["metadata"].items()}
    assert values["size_bytes"] == str(weights_size(tiny_models["tiny-llama"]))
    assert values["dtype"] == "bfloat16"
    assert values["architecture"] == "LlamaForCausalLM"
    assert values["context_length"] == "2048"
    assert values["engine"] == "transformers"
    assert values["weights_layout"] == "folder"
    assert int(values["parameters"]) > 0
    assert entry["metadata"]["size_bytes"]["type"] == "int"


def test_new_weights_under_the_same_name_update_the_entry(api: ClearMLApiFixture,
                                                          tiny_models: dict[str, Path]) -> None:
    first = register_model(str(tiny_models["tiny-llama"]), name="assistant", project="reg/rename")
    second = register_model(str(tiny_models["tiny-qwen2"]), name="assistant", project="reg/rename")
    assert first.model_id == second.model_id and not second.created
    entry = api.models[str(second.model_id)]
    assert entry["uri"] == tiny_models["tiny-qwen2"].resolve().as_uri()
    assert entry["metadata"]["architecture"]["value"] == "Qwen2ForCausalLM"


def test_a_remote_uri_is_referenced_and_needs_its_size(api: ClearMLApiFixture) -> None:
    with pytest.raises(SpecError) as info:
        register_model("s3://bucket/llama-70b/", project="reg/remote")
    assert info.value.field == "size_bytes"
    reg = register_model("https://files.example/llama-70b.tar.gz", project="reg/remote", size_bytes=140_000_000_000,
                         dtype="bfloat16", engine="vllm", context_length=8192)
    entry = api.models[str(reg.model_id)]
    assert entry["uri"] == "https://files.example/llama-70b.tar.gz"
    assert entry["name"] == "llama-70b"
    assert {k: v["value"] for k, v in entry["metadata"].items()} == {
        "size_bytes": "140000000000", "dtype": "bfloat16", "engine": "vllm", "context_length": "8192",
        "weights_layout": "archive"}


def test_uploaded_weights_are_fetched_back_through_clearml_storage(api: ClearMLApiFixture, tmp_path: Path,
                                                                   tiny_models: dict[str, Path]) -> None:
    store = tmp_path / "bucket"
    reg = register_model(str(tiny_models["tiny-mistral"]), project="reg/upload", upload=True,
                         upload_uri=store.as_uri())
    assert reg.uri.startswith(store.as_uri()) and reg.uri.endswith(".zip")
    assert reg.metadata["weights_layout"] == "archive"
    catalog = RegistryCatalog(RegistrySelector(ids=(str(reg.model_id),)), cache_dir=tmp_path / "cache")
    snap = catalog.snapshot()
    assert not snap.errors, snap.errors
    (spec,) = snap.specs
    local = Path(spec.weights)
    assert local.is_dir() and (local / "config.json").is_file()
    assert local.resolve() != tiny_models["tiny-mistral"].resolve()
    assert weights_size(local) == weights_size(tiny_models["tiny-mistral"]) == spec.size_bytes
    assert catalog.snapshot().specs[0].weights == spec.weights


def test_catalog_selects_by_project_tags_and_ids_and_reports_bad_entries(api: ClearMLApiFixture,
                                                                         tiny_models: dict[str, Path]) -> None:
    uri = {name: path.resolve().as_uri() for name, path in tiny_models.items()}
    good = api.add_model("llama", uri["tiny-llama"], project="sel/a", tags=[SERVABLE_TAG, "chat"], metadata=meta())
    qwen = api.add_model("qwen", uri["tiny-qwen2"], project="sel/a", tags=[SERVABLE_TAG], metadata=meta())
    other = api.add_model("mistral", uri["tiny-mistral"], project="sel/b", tags=[SERVABLE_TAG, "chat"],
                          metadata=meta())
    bad_size = api.add_model("broken", uri["tiny-llama"], project="sel/a", tags=[SERVABLE_TAG],
                             metadata=meta(size_bytes="16GB"))
    bad_engine = api.add_model("odd", uri["tiny-llama"], project="sel/a", tags=[SERVABLE_TAG],
                               metadata=meta(engine="onnxruntime"))
    missing = api.add_model("gone", (Path("/nonexistent") / "weights").as_uri() + ".zip", project="sel/a",
                            tags=[SERVABLE_TAG], metadata=meta())
    untagged = api.add_model("untagged", uri["tiny-llama"], project="sel/a", tags=["chat"], metadata=meta())
    api.add_model("archived", uri["tiny-llama"], project="sel/a", tags=[SERVABLE_TAG], metadata=meta(),
                  system_tags=["archived"])

    snap = RegistryCatalog(RegistrySelector(project="sel/a")).snapshot()
    assert sorted(s.name for s in snap.specs) == ["llama", "qwen", "untagged"], "a project selects without our tag"
    assert untagged in {s.model_id for s in snap.specs}
    by_id = {s.model_id: s for s in snap.specs}
    assert by_id[good].weights == str(tiny_models["tiny-llama"].resolve())
    errors = {e.entry.split(" ")[0]: e.field for e in snap.errors}
    assert errors == {bad_size: "metadata.size_bytes", bad_engine: "metadata.engine", missing: "uri"}

    chat = RegistryCatalog(RegistrySelector(tags=("__$all", SERVABLE_TAG, "chat"))).snapshot()
    assert {s.model_id for s in chat.specs} >= {good, other}
    assert qwen not in {s.model_id for s in chat.specs}

    ids = RegistryCatalog(RegistrySelector(ids=(other, "no-such-model"))).snapshot()
    assert [s.model_id for s in ids.specs] == [other]
    assert [(e.entry, e.field) for e in ids.errors] == [("no-such-model", "id")]

    by_name = RegistryCatalog(RegistrySelector(name="untagged"), fetch_weights=False).snapshot()
    assert [s.model_id for s in by_name.specs] == [untagged], "a name selects without our tag"
    everything = RegistryCatalog(RegistrySelector(), fetch_weights=False).snapshot()
    assert untagged not in {s.model_id for s in everything.specs} and good in {s.model_id for s in everything.specs}, \
        "selecting nothing falls back to the servable tag"

    nowhere = RegistryCatalog(RegistrySelector(project="sel/none")).snapshot()
    assert not nowhere.specs and [e.field for e in nowhere.errors] == ["project"]


def test_duplicate_serve_names_keep_the_newest_entry(api: ClearMLApiFixture, tiny_models: dict[str, Path]) -> None:
    uri = tiny_models["tiny-llama"].resolve().as_uri()
    api.add_model("twin", uri, project="sel/dup", tags=[SERVABLE_TAG], metadata=meta())
    time.sleep(0.01)
    newer = api.add_model("twin", uri, project="sel/dup", tags=[SERVABLE_TAG], metadata=meta())
    snap = RegistryCatalog(RegistrySelector(project="sel/dup")).snapshot()
    assert [s.model_id for s in snap.specs] == [newer]
    assert [e.field for e in snap.errors] == ["name"]


def test_poller_picks_up_new_and_removed_entries_and_survives_an_outage(api: ClearMLApiFixture,
                                                                          tiny_models: dict[str, Path]) -> None:
    uri = tiny_models["tiny-qwen2"].resolve().as_uri()
    first = api.add_model("p-one", uri, project="poll", tags=[SERVABLE_TAG], metadata=meta())
    seen: list[CatalogSnapshot] = []
    names = lambda: sorted(s.name for s in seen[-1].specs) if seen else []  # noqa: E731
    catalog = RegistryCatalog(RegistrySelector(project="poll"), fetch_weights=False)
    # no grace: a removal still needs two reads in a row, which 0.1 s polls give at once
    with CatalogPoller(catalog, seen.append, period_s=0.1, removal_grace_s=0) as poller:
        assert names() == ["p-one"]
        second = api.add_model("p-two", uri, project="poll", tags=[SERVABLE_TAG], metadata=meta())
        assert wait_until(lambda: names() == ["p-one", "p-two"])
        api.remove_model(first)
        assert wait_until(lambda: names() == ["p-two"])
        calls = len(seen)
        api.fail_next["models.get_all"] = ApiError(400, 0, "simulated outage")
        assert wait_until(lambda: poller.failures >= 1)
        assert len(seen) == calls and names() == ["p-two"]
        api.add_model("p-bad", uri, project="poll", tags=[SERVABLE_TAG], metadata=meta(size_bytes="oops"))
        assert wait_until(lambda: bool(seen[-1].errors))
        assert seen[-1].errors[0].field == "metadata.size_bytes" and names() == ["p-two"]
        # the last servable entry going bad leaves a catalog with no model: the served one is kept
        api.models[second]["metadata"]["size_bytes"]["value"] = "oops"
        calls = len(seen)
        time.sleep(0.5)  # five polls see it
        assert len(seen) == calls and names() == ["p-two"]


def test_a_crafted_archive_makes_its_entry_unservable_and_writes_nothing_outside(api: ClearMLApiFixture,
                                                                                  tmp_path: Path) -> None:
    import io
    import tarfile

    victim = tmp_path / "victim.txt"
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for k in range(40):
            link = tarfile.TarInfo(f"L{k}")
            link.type, link.linkname = tarfile.SYMTYPE, "." if k == 0 else f"L{k - 1}/.."
            tar.addfile(link)
        payload = tarfile.TarInfo("L39/" + str(victim).lstrip("/"))
        payload.size = 5
        tar.addfile(payload, io.BytesIO(b"pwned"))
    evil = api.add_model("evil", archive.as_uri(), project="arch/a", tags=[SERVABLE_TAG],
                         metadata=meta(weights_layout="archive"))
    snap = RegistryCatalog(RegistrySelector(project="arch/a"), cache_dir=tmp_path / "cache").snapshot()
    assert not snap.specs
    (error,) = snap.errors
    assert error.entry.startswith(evil) and error.field == "uri"
    assert "cannot be extracted safely" in str(error) and "symlink" in str(error)
    assert not victim.exists()


def test_a_standard_entry_without_metadata_is_served_with_what_the_files_tell(api: ClearMLApiFixture, tmp_path: Path,
                                                                             tiny_models: dict[str, Path]) -> None:
    """As `OutputModel` or `clearml-serving model upload` leave it: a URI, a name, no metadata."""
    plain = api.add_model("plain-llama", tiny_models["tiny-llama"].resolve().as_uri(), project="std/a",
                          tags=[SERVABLE_TAG], metadata={})
    snap = RegistryCatalog(RegistrySelector(project="std/a"), cache_dir=tmp_path / "cache").snapshot()
    assert not snap.errors, snap.errors
    (spec,) = snap.specs
    assert spec.model_id == plain and spec.size_bytes == weights_size(tiny_models["tiny-llama"])
    assert spec.architecture == "LlamaForCausalLM" and spec.context_length == 2048
    unfetched = RegistryCatalog(RegistrySelector(project="std/a"), fetch_weights=False).snapshot()
    assert [e.field for e in unfetched.errors] == ["metadata.size_bytes"], "unknowable without the files"


def test_tags_match_any_by_default_and_all_with_the_sdks_prefix(api: ClearMLApiFixture,
                                                                 tiny_models: dict[str, Path]) -> None:
    uri = tiny_models["tiny-llama"].resolve().as_uri()
    both = api.add_model("both", uri, project="tags/a", tags=["red", "blue"], metadata=meta())
    red = api.add_model("red", uri, project="tags/a", tags=["red"], metadata=meta())
    blue = api.add_model("blue", uri, project="tags/a", tags=["blue"], metadata=meta())

    def selected(*tags: str) -> set[str]:
        snap = RegistryCatalog(RegistrySelector(project="tags/a", tags=tags), fetch_weights=False).snapshot()
        return {s.model_id for s in snap.specs}

    assert selected("red", "blue") == {both, red, blue}, "any of them"
    assert selected("__$all", "red", "blue") == {both}, "all of them"
    assert selected("red", "__$not", "blue") == {red}, "red and not blue"


def test_only_published_entries_when_asked(api: ClearMLApiFixture, tiny_models: dict[str, Path]) -> None:
    uri = tiny_models["tiny-llama"].resolve().as_uri()
    draft = api.add_model("draft", uri, project="pub/a", tags=[SERVABLE_TAG], metadata=meta())
    published = api.add_model("published", uri, project="pub/a", tags=[SERVABLE_TAG], metadata=meta())
    api.models[published]["ready"] = True
    every = RegistryCatalog(RegistrySelector(project="pub/a"), fetch_weights=False).snapshot()
    assert {s.model_id for s in every.specs} == {draft, published}
    only = RegistryCatalog(RegistrySelector(project="pub/a", only_published=True), fetch_weights=False).snapshot()
    assert [s.model_id for s in only.specs] == [published]


def test_the_serve_settings_reach_the_selector() -> None:
    from clearml_umem.config import parse_serve_args

    cfg = parse_serve_args(["--clearml-project", "llms", "--clearml-tags", "__$all,umem-servable,chat",
                            "--clearml-published"], env={})
    selector = RegistryCatalog.from_config(cfg).selector
    assert selector.only_published and selector.tags == ("__$all", "umem-servable", "chat")
    default = parse_serve_args(["--clearml-project", "llms"], env={})
    assert not RegistryCatalog.from_config(default).selector.only_published
    assert RegistryCatalog.from_config(default).selector.query_tags == (), "a project needs no tag of ours"


# -- Hugging Face Hub sources (the real huggingface_hub, offline, on a cache laid out as it lays it out) ---------


def hub_cache(root: Path, repo_id: str, model: Path, revision: str = "main") -> str:
    """`HF_HOME/hub/models--org--name/{blobs,refs,snapshots}`: files as content-addressed blobs,
    snapshots as links to them, the revision's ref naming the commit."""
    import hashlib
    import shutil

    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in model.iterdir():
        if f.is_file() and not f.name.startswith("umem_"):
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, blob)
            (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return commit


@pytest.fixture
def offline_hub(tmp_path: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf"
    hub_cache(home, "acme/tiny-llama", tiny_models["tiny-llama"])
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


def test_a_hub_model_is_registered_with_facts_from_its_files_and_served_from_the_cache(
        api: ClearMLApiFixture, offline_hub: Path, tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    reg = register_model("hf://acme/tiny-llama", project="hub/a")
    commit = (offline_hub / "hub" / "models--acme--tiny-llama" / "refs" / "main").read_text()
    assert reg.name == "tiny-llama" and reg.uri == f"hf://acme/tiny-llama@{commit}", "pinned"
    assert reg.metadata["size_bytes"] == str(weights_size(tiny_models["tiny-llama"]))
    assert reg.metadata["architecture"] == "LlamaForCausalLM"
    snap = RegistryCatalog(RegistrySelector(project="hub/a"), cache_dir=tmp_path / "cache").snapshot()
    assert not snap.errors, snap.errors
    (spec,) = snap.specs
    local = Path(spec.weights)
    assert local.is_relative_to(offline_hub / "hub") and (local / "config.json").is_file()
    assert spec.size_bytes == weights_size(tiny_models["tiny-llama"])


def test_a_hub_model_missing_from_an_offline_cache_is_an_error_naming_it(api: ClearMLApiFixture, offline_hub: Path,
                                                                         tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="hf://acme/absent could not be fetched"):
        register_model("hf://acme/absent", project="hub/b")
    api.add_model("absent", "hf://acme/absent", project="hub/b", tags=[SERVABLE_TAG], metadata={})
    snap = RegistryCatalog(RegistrySelector(project="hub/b"), cache_dir=tmp_path / "cache").snapshot()
    assert not snap.specs and [e.field for e in snap.errors] == ["uri"]
    assert "hf://acme/absent" in str(snap.errors[0])
    with pytest.raises(SpecError, match="org/name"):
        register_model("hf://not-a-repo", project="hub/b")


# -- entries made the usual ClearML ways, by the real SDK calls -----------------------------------------------


def test_entries_made_by_the_sdk_and_clearml_serving_upload_are_served(api: ClearMLApiFixture, tmp_path: Path,
                                                                        tiny_models: dict[str, Path],
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """`OutputModel.update_weights(register_uri=DIR)`, `update_weights_package(DIR)` (recorded as TensorFlow, a
    .zip) and `clearml-serving model upload --path DIR`: no tag of ours, no metadata; selected by project."""
    import json

    from tests.clearml_env import offline_env, run_python

    env = offline_env(tmp_path, **api.env())
    env.pop("CLEARML_OFFLINE_MODE")
    proc = run_python(["tests/clearml_sdk_entries.py", "std/sdk", str(tiny_models["tiny-llama"]),
                       str(tmp_path / "store")], env, timeout=240)
    ids = json.loads(proc.stdout.split("ENTRIES ", 1)[1].splitlines()[0])
    assert api.models[ids["packaged"]]["framework"] == "TensorFlow", "what the SDK records for a package"
    assert all(SERVABLE_TAG not in api.models[ids[k]]["tags"] for k in ("referenced", "packaged"))
    with caplog.at_level("WARNING", logger="clearml_umem.clearml_io.registry"):
        snap = RegistryCatalog(RegistrySelector(project="std/sdk"), cache_dir=tmp_path / "cache").snapshot()
    assert not snap.errors, snap.errors
    served = {s.model_id: s for s in snap.specs}
    expected = {ids["referenced"], ids["packaged"]} | ({ids["clearml_serving_upload"]}
                                                        if ids.get("clearml_serving_upload") else set())
    assert set(served) == expected
    for spec in served.values():
        assert spec.engine == "transformers" and spec.architecture == "LlamaForCausalLM"
        assert spec.size_bytes == weights_size(tiny_models["tiny-llama"])
        assert (Path(spec.weights) / "config.json").is_file()
    assert any("TensorFlow" in r.getMessage() and ids["packaged"] in r.getMessage() for r in caplog.records), \
        "the contradiction is a warning"


def test_an_entry_whose_files_are_no_language_model_is_refused_by_its_files(api: ClearMLApiFixture,
                                                                             tmp_path: Path) -> None:
    folder = tmp_path / "keras-model"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"\0" * 64)
    entry = api.add_model("keras", folder.as_uri(), project="std/keras", framework="Keras")
    snap = RegistryCatalog(RegistrySelector(project="std/keras"), cache_dir=tmp_path / "cache").snapshot()
    assert not snap.specs
    assert [(e.entry.split(" ")[0], e.field) for e in snap.errors] == [(entry, "uri")]
    assert "not a language model" in str(snap.errors[0])


def test_a_gguf_repository_from_the_hub_is_registered_pinned_and_served_by_llamacpp(
        api: ClearMLApiFixture, offline_hub: Path, tmp_path: Path) -> None:
    from clearml_umem.tinygguf import TinyGGUF, write_tiny_gguf

    repo = tmp_path / "gguf-repo"
    repo.mkdir()
    gguf = write_tiny_gguf(repo / "tiny-q8_0.gguf", TinyGGUF("tiny", "q8_0"))
    (repo / "README.json").write_text("{}")
    commit = hub_cache(offline_hub, "acme/tiny-gguf", repo)
    reg = register_model("hf://acme/tiny-gguf", project="hub/gguf")
    assert reg.uri == f"hf://acme/tiny-gguf@{commit}", "pinned to the commit it read"
    assert reg.metadata["engine"] == "llamacpp" and reg.metadata["quantization"] == "q8_0"
    assert reg.metadata["size_bytes"] == str(gguf.stat().st_size)
    plain = api.add_model("plain-gguf", "hf://acme/tiny-gguf", project="hub/gguf2", metadata={})
    for project in ("hub/gguf", "hub/gguf2"):
        snap = RegistryCatalog(RegistrySelector(project=project), cache_dir=tmp_path / "cache").snapshot()
        assert not snap.errors, snap.errors
        (spec,) = snap.specs
        assert spec.engine == "llamacpp" and Path(spec.weights).name == "tiny-q8_0.gguf"
        assert spec.size_bytes == gguf.stat().st_size and spec.quantization == "q8_0"
    assert snap.specs[0].model_id == plain

    write_tiny_gguf(repo / "tiny-f16.gguf", TinyGGUF("tiny", "f16"))
    hub_cache(offline_hub, "acme/two-gguf", repo)
    with pytest.raises(SpecError, match="name one"):
        register_model("hf://acme/two-gguf", project="hub/gguf3")
    named = register_model("hf://acme/two-gguf/tiny-f16.gguf", project="hub/gguf3")
    assert named.metadata["quantization"] == "f16" and named.uri.endswith("/tiny-f16.gguf")
    assert "@" in named.uri
