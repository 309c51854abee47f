"""Catalog polling: the poller's change detection (fake catalog), then a live router that
follows edits of its manifest over real HTTP."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from clearml_umem.catalog import CatalogSnapshot, write_manifest
from clearml_umem.catalog_poller import CatalogPoller
from clearml_umem.config import ServeConfig
from clearml_umem.engines.base import EngineContext, EngineError, Footprint
from clearml_umem.runtime import Runtime
from clearml_umem.server import UnifiedMemoryServer
from clearml_umem.spec import ModelSpec, SpecError, spec_from_mapping
from clearml_umem.tiers import Tier
from tests.waiting import wait_until


def _spec(name: str) -> ModelSpec:
    return spec_from_mapping({"name": name, "weights": f"/models/{name}", "size_bytes": 1000}, resolve_local=False)


class ScriptedCatalog:
    """Answers each snapshot() with the next scripted result (an exception is raised)."""

    def __init__(self, *results: CatalogSnapshot | Exception) -> None:
        self.results = list(results)

    def snapshot(self) -> CatalogSnapshot:
        result = self.results.pop(0) if len(self.results) > 1 else self.results[0]
        if isinstance(result, Exception):
            raise result
        return result


def snap(*names: str, errors: tuple[SpecError, ...] = ()) -> CatalogSnapshot:
    return CatalogSnapshot(specs=[_spec(n) for n in names], errors=list(errors))


def test_seeded_poller_reports_only_real_changes() -> None:
    seen: list[list[str]] = []
    catalog = ScriptedCatalog(snap("a"), snap("a", "b"), snap("a", "b"), snap("b"))
    poller = CatalogPoller(catalog, lambda s: seen.append([x.name for x in s.specs]), period_s=60,
                           removal_grace_s=0)
    poller.seed(snap("a"))
    # a's removal is applied on the second poll that misses it
    assert [poller.poll_once() for _ in range(5)] == [False, True, False, False, True]
    assert seen == [["a", "b"], ["b"]]
    assert poller.last is not None and [s.name for s in poller.last.specs] == ["b"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_short_read_removes_nothing_and_a_removal_waits_for_two_polls_and_the_grace() -> None:
    """A manifest caught half-written (only its first entry) for a few polls must not drop the
    other model; it goes once missing on two polls in a row and for the grace period."""
    seen: list[list[str]] = []
    clock = FakeClock()
    catalog = ScriptedCatalog(snap("a"), snap("a"), snap("a", "b"), snap("a"), snap("a"), snap("a"))
    poller = CatalogPoller(catalog, lambda s: seen.append([x.name for x in s.specs]), period_s=1,
                           removal_grace_s=5, clock=clock)
    poller.seed(snap("a", "b"))
    for t in (0, 3, 4):  # b missing for 3 s, then back: nothing changes
        clock.now = t
        assert poller.poll_once() is False
    outcomes = []
    for t in (5, 6, 10.5):  # missing again: a second poll at 6 s, the grace ends at 10 s
        clock.now = t
        outcomes.append(poller.poll_once())
    assert outcomes == [False, False, True]
    assert seen == [["a"]]


def test_an_empty_catalog_keeps_the_models_served(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[CatalogSnapshot] = []
    poller = CatalogPoller(ScriptedCatalog(snap(), snap(), snap(), snap("a", "c")), seen.append, period_s=1,
                           removal_grace_s=0)
    poller.seed(snap("a", "b"))
    with caplog.at_level("WARNING"):
        assert [poller.poll_once() for _ in range(3)] == [False, False, False]
    assert sum("lists no models" in r.message for r in caplog.records) == 1  # once, not every poll
    assert poller.poll_once() is True  # b is only missing once here: kept, c added
    assert [s.name for s in seen[-1].specs] == ["a", "c", "b"]


def test_unsettled_snapshot_is_offered_again_until_applied() -> None:
    answers = [False, False, True]
    calls: list[int] = []

    def on_change(snapshot: CatalogSnapshot) -> bool:
        calls.append(len(snapshot.specs))
        return answers.pop(0)

    poller = CatalogPoller(ScriptedCatalog(snap("a", "b")), on_change, period_s=60)
    poller.seed(snap("a"))
    assert [poller.poll_once() for _ in range(4)] == [True, True, True, False]
    assert calls == [2, 2, 2]


def test_outage_keeps_the_last_snapshot_and_a_failing_callback_retries() -> None:
    seen: list[CatalogSnapshot] = []
    boom = {"armed": True}

    def on_change(snapshot: CatalogSnapshot) -> None:
        if boom.pop("armed", False):
            raise RuntimeError("apply failed")
        seen.append(snapshot)

    catalog = ScriptedCatalog(ConnectionError("registry down"), snap("a", "b"), snap("a", "b"), snap("a", "b"))
    poller = CatalogPoller(catalog, on_change, period_s=60)
    poller.seed(snap("a"))
    assert poller.poll_once() is False and poller.failures == 1
    with pytest.raises(RuntimeError):
        poller.poll_once()
    assert poller.poll_once() is True
    assert poller.poll_once() is False
    assert [[s.name for s in x.specs] for x in seen] == [["a", "b"]]


def test_errors_alone_count_as_a_change() -> None:
    seen: list[CatalogSnapshot] = []
    bad = SpecError("entry 2", "size_bytes", "must be positive")
    poller = CatalogPoller(ScriptedCatalog(snap("a", errors=(bad,))), seen.append, period_s=60)
    poller.seed(snap("a"))
    assert poller.poll_once() is True and seen[0].errors == [bad]


class _IdleEngine:
    """Never asked to move: sync_catalog only builds engines and registers their footprints."""

    tiers = frozenset(Tier)
    transits: dict[tuple[Tier, Tier], Tier] = {}

    def footprint(self, tier: Tier) -> Footprint:
        return Footprint(device_bytes=1000 if tier is Tier.GPU else 0, host_bytes=1000 if tier is Tier.RAM else 0)


def test_runtime_sync_says_when_a_model_could_not_be_added(tmp_path: Path) -> None:
    built: list[str] = []

    def factory(spec: ModelSpec, ctx: EngineContext) -> _IdleEngine:
        built.append(spec.name)
        if spec.name == "b" and built.count("b") == 1:
            raise EngineError("no driver yet")
        return _IdleEngine()

    runtime = Runtime(10_000, 10_000, EngineContext(work_dir=tmp_path, device="cpu"), engine_factory=factory)
    assert runtime.sync_catalog(snap("a", "b")) is False
    assert runtime.has_model("a") and not runtime.has_model("b")
    assert runtime.sync_catalog(snap("a", "b")) is True
    assert runtime.has_model("b") and built == ["a", "b", "b"]


def test_period_must_be_positive() -> None:
    with pytest.raises(ValueError, match="period_s"):
        CatalogPoller(ScriptedCatalog(snap()), print, period_s=0)


@pytest.mark.slow
def test_router_follows_manifest_edits(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A model added to the manifest becomes servable and a removed one disappears, without a restart."""
    llama, qwen = (spec_from_mapping({"name": n, "weights": str(tiny_models[n])}) for n in ("tiny-llama", "tiny-qwen2"))
    manifest = tmp_path / "models.yaml"
    write_manifest(manifest, [llama])
    config = ServeConfig(manifest=str(manifest), port=0, device="cpu", device_budget="1GB", host_budget="1GB",
                         work_dir=str(tmp_path / "work"), catalog_poll_seconds=0.1,
                         catalog_removal_grace_seconds=0)
    server = UnifiedMemoryServer(config.validate())
    with server.run_in_thread() as url:
        def listed() -> list[str]:
            return sorted(m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"])

        assert listed() == ["tiny-llama"]
        write_manifest(manifest, [llama, qwen])
        assert wait_until(lambda: listed() == ["tiny-llama", "tiny-qwen2"], timeout=30)
        answer = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": "tiny-qwen2", "prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"]

        write_manifest(manifest, [qwen])
        assert wait_until(lambda: listed() == ["tiny-qwen2"], timeout=30)
        gone = httpx.post(url + "/v1/completions", timeout=30, json={
            "model": "tiny-llama", "prompt": "Hello", "max_tokens": 3})
        assert gone.status_code == 404 and "tiny-llama" in gone.json()["error"]["message"]
        assert server._poller is not None and server._poller.failures == 0
    assert not [t for t in threading.enumerate() if t.name == "umem-catalog-poller"]
