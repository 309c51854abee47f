"""Events in, Prometheus text and the summary out."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry

from clearml_umem.events import (
    EventBus,
    FirstToken,
    MemorySnapshot,
    MoveFailed,
    MoveFinished,
    RequestArrived,
    RequestDispatched,
    RequestFinished,
    RequestRejected,
)
from clearml_umem.metrics import Metrics
from clearml_umem.tiers import Tier


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample of `name` whose labels are exactly `labels`, None if absent."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if found == labels:
            return float(m.group(3))
    return None


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


def test_events_become_prometheus_series(bus: EventBus) -> None:
    metrics = Metrics(bus)
    bus.emit(RequestArrived(model="a", t=0, request_id="r1", tier=Tier.RAM))
    bus.emit(RequestArrived(model="a", t=0, request_id="r2", tier=Tier.GPU))
    bus.emit(MoveFinished(model="a", t=1, src=Tier.RAM, dst=Tier.GPU, seconds=0.5, bytes_moved=2_000_000_000))
    bus.emit(MoveFinished(model="b", t=1, src=Tier.GPU, dst=Tier.RAM, seconds=2.0, bytes_moved=1_000_000_000))
    bus.emit(RequestDispatched(model="a", t=1, request_id="r1", served_from=Tier.RAM, waited_s=0.6))
    bus.emit(FirstToken(model="a", t=1, request_id="r1", served_from=Tier.RAM, ttft_s=0.7))
    bus.emit(FirstToken(model="a", t=1, request_id="r2", served_from=Tier.GPU, ttft_s=0.02))
    bus.emit(RequestFinished(model="a", t=2, request_id="r1", served_from=Tier.RAM, ok=True,
                             completion_tokens=5, duration_s=1.0))
    bus.emit(RequestFinished(model="a", t=2, request_id="r2", served_from=Tier.GPU, ok=False,
                             completion_tokens=0, duration_s=1.0))
    bus.emit(RequestRejected(model="huge", t=2, request_id="r3", reason="never fits"))
    bus.emit(MoveFailed(model="c", t=3, src=Tier.COLD, dst=Tier.GPU, error="boom"))
    bus.emit(MemorySnapshot(model="", t=3, device_used=100, device_budget=1000, host_used=200, host_budget=5000))

    text = metrics.render().decode()
    assert metrics.content_type.startswith("text/plain")
    assert sample(text, "umem_ttft_seconds_count", model="a", tier="ram") == 1
    assert sample(text, "umem_ttft_seconds_sum", model="a", tier="ram") == pytest.approx(0.7)
    assert sample(text, "umem_ttft_seconds_bucket", model="a", tier="gpu", le="0.025") == 1
    assert sample(text, "umem_ttft_seconds_bucket", model="a", tier="gpu", le="0.005") == 0
    assert sample(text, "umem_ttft_seconds_bucket", model="a", tier="ram", le="120.0") == 1
    assert sample(text, "umem_move_seconds_count", model="a", direction="in", src="ram", dst="gpu") == 1
    assert sample(text, "umem_move_seconds_count", model="b", direction="out", src="gpu", dst="ram") == 1
    assert sample(text, "umem_move_bytes_total", model="a", direction="in", src="ram", dst="gpu") == 2e9
    assert sample(text, "umem_move_gbps", model="a", direction="in") == pytest.approx(4.0)
    assert sample(text, "umem_move_gbps", model="b", direction="out") == pytest.approx(0.5)
    assert sample(text, "umem_requests_total", model="a", tier="ram", result="miss") == 1
    assert sample(text, "umem_requests_total", model="a", tier="gpu", result="hit") == 1
    assert sample(text, "umem_request_rejections_total", model="huge") == 1
    assert sample(text, "umem_requests_finished_total", model="a", ok="true") == 1
    assert sample(text, "umem_requests_finished_total", model="a", ok="false") == 1
    assert sample(text, "umem_move_failures_total", model="c", src="cold", dst="gpu") == 1
    assert sample(text, "umem_memory_bytes", kind="device", what="used") == 100
    assert sample(text, "umem_memory_bytes", kind="host", what="budget") == 5000
    assert sample(text, "umem_queue_wait_seconds_count", model="a", tier="ram") == 1
    assert sample(text, "umem_model_tier", model="a", tier="gpu") == 1
    assert sample(text, "umem_model_tier", model="a", tier="ram") == 0
    assert sample(text, "umem_model_tier", model="b", tier="ram") == 1
    assert sample(text, "umem_model_tier", model="c", tier="cold") == 0, "a failed move leaves the tier unknown"


def test_summary_medians_swaps_and_hits(bus: EventBus) -> None:
    metrics = Metrics(bus)
    for i, ttft in enumerate([0.1, 0.2, 0.3, 0.4, 1.0]):
        bus.emit(FirstToken(model="m", t=i, request_id=f"r{i}", served_from=Tier.DISK, ttft_s=ttft))
    bus.emit(FirstToken(model="m", t=9, request_id="h", served_from=Tier.GPU, ttft_s=0.01))
    bus.emit(MoveFinished(model="m", t=1, src=Tier.RAM, dst=Tier.GPU, seconds=1.0, bytes_moved=10_000_000_000))
    bus.emit(MoveFinished(model="m", t=2, src=Tier.RAM, dst=Tier.GPU, seconds=2.0, bytes_moved=10_000_000_000))
    bus.emit(MoveFinished(model="m", t=3, src=Tier.GPU, dst=Tier.DISK, seconds=0.1, bytes_moved=0))
    for tier in (Tier.GPU, Tier.GPU, Tier.RAM, Tier.COLD):
        bus.emit(RequestArrived(model="m", t=4, request_id="x", tier=tier))
    bus.emit(RequestRejected(model="m", t=5, request_id="y", reason="no"))
    bus.emit(MemorySnapshot(model="", t=3, device_used=1, device_budget=2, host_used=3, host_budget=4))

    s = metrics.summary()
    disk = s["ttft"]["m"]["disk"]
    assert disk["count"] == 5
    assert disk["median_s"] == pytest.approx(0.3)
    assert disk["p90_s"] == pytest.approx(1.0)
    assert s["ttft"]["m"]["gpu"] == {"count": 1, "median_s": 0.01, "p90_s": 0.01}
    assert list(s["ttft"]["m"]) == ["gpu", "disk"], "tiers are listed hottest first"
    swap_in = s["swaps"]["m"]["in"]
    assert swap_in["count"] == 2
    assert swap_in["mean_s"] == pytest.approx(1.5)
    assert swap_in["mean_gbps"] == pytest.approx((10 + 5) / 2)
    assert swap_in["bytes"] == 20_000_000_000
    assert s["swaps"]["m"]["out"]["count"] == 1
    req = s["requests"]["m"]
    assert (req["hits"], req["misses"], req["rejected"]) == (2, 2, 1)
    assert req["by_tier"] == {"gpu": 2, "ram": 1, "cold": 1}
    assert s["tiers"] == {"m": "disk"}
    assert s["memory"] == {"device_used": 1, "device_budget": 2, "host_used": 3, "host_budget": 4}


def test_set_model_tiers_covers_unmoved_and_removed_models(bus: EventBus) -> None:
    metrics = Metrics(bus)
    metrics.set_model_tiers({"a": Tier.COLD, "b": "ram"})
    text = metrics.render().decode()
    assert sample(text, "umem_model_tier", model="a", tier="cold") == 1
    assert sample(text, "umem_model_tier", model="b", tier="ram") == 1
    metrics.set_model_tiers({"b": "gpu"})
    text = metrics.render().decode()
    assert sample(text, "umem_model_tier", model="a", tier="cold") is None
    assert sample(text, "umem_model_tier", model="b", tier="gpu") == 1
    assert metrics.summary()["tiers"] == {"b": "gpu"}


def test_servers_in_one_process_keep_separate_registries() -> None:
    bus1, bus2 = EventBus(), EventBus()
    m1, m2 = Metrics(bus1), Metrics(bus2)
    bus1.emit(RequestArrived(model="a", t=0, request_id="r", tier=Tier.GPU))
    assert sample(m1.render().decode(), "umem_requests_total", model="a", tier="gpu", result="hit") == 1
    assert sample(m2.render().decode(), "umem_requests_total", model="a", tier="gpu", result="hit") is None
    shared = CollectorRegistry()
    m3 = Metrics(EventBus(), registry=shared)
    assert m3.registry is shared


def test_unsubscribe_stops_updates(bus: EventBus) -> None:
    metrics = Metrics(bus)
    metrics.unsubscribe()
    bus.emit(RequestArrived(model="a", t=0, request_id="r", tier=Tier.GPU))
    assert metrics.summary()["requests"] == {}


def test_swap_outs_say_whether_the_host_copy_was_kept_or_copied(bus: EventBus) -> None:
    metrics = Metrics(bus)
    bus.emit(MoveFinished(model="a", t=1, src=Tier.GPU, dst=Tier.RAM, seconds=0.5, bytes_moved=2_000_000_000,
                                host_copy="copied"))
    bus.emit(MoveFinished(model="a", t=2, src=Tier.GPU, dst=Tier.RAM, seconds=0.004, bytes_moved=0,
                                host_copy="kept"))
    bus.emit(MoveFinished(model="a", t=3, src=Tier.GPU, dst=Tier.RAM, seconds=0.003, bytes_moved=0,
                                host_copy="kept"))
    text = metrics.render().decode()
    assert sample(text, "umem_swap_out_host_copy_total", model="a", host_copy="kept") == 2
    assert sample(text, "umem_swap_out_host_copy_total", model="a", host_copy="copied") == 1
    assert sample(text, "umem_move_gbps", model="a", direction="out") == pytest.approx(4.0), \
        "a kept copy moves nothing: the last copying swap-out's speed stays"


def test_an_engine_death_is_counted_and_its_model_shown_cold(bus: EventBus) -> None:
    from clearml_umem.events import EngineLost

    metrics = Metrics(bus)
    bus.emit(MoveFinished(model="a", t=1, src=Tier.COLD, dst=Tier.GPU, seconds=1.0, bytes_moved=10))
    bus.emit(EngineLost(model="a", t=2, tier=Tier.GPU, reason="exited with code -9"))
    text = metrics.render().decode()
    assert sample(text, "umem_engine_deaths_total", model="a") == 1
    assert sample(text, "umem_model_tier", model="a", tier="cold") == 1
    assert sample(text, "umem_model_tier", model="a", tier="gpu") == 0
