"""Idle expiry (Ollama's keep_alive, llama-swap's ttl), decided by the pure scheduler on a fake clock:
an unused model moves down one tier per keep-alive, never while a request runs or waits."""

from __future__ import annotations

import math

import pytest

from clearml_umem.keep_alive import NEVER, describe_keep_alive, parse_keep_alive
from clearml_umem.scheduler import SchedulerError
from clearml_umem.spec import SpecError, spec_from_mapping
from clearml_umem.tiers import Tier
from tests.sched_harness import GB, Harness, footprints


@pytest.mark.parametrize(("given", "seconds"), [
    ("never", NEVER), ("-1", NEVER), (-5, NEVER), ("0", 0.0), (0, 0.0), (300, 300.0), ("300", 300.0),
    ("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("250ms", 0.25), (" 2M ", 120.0),
])
def test_keep_alive_reads_ollamas_forms(given: object, seconds: float) -> None:
    assert parse_keep_alive(given) == seconds


@pytest.mark.parametrize("given", ["soon", "5 minutes", "", "m", "5x", True, None, float("nan")])
def test_a_wrong_keep_alive_says_what_is_accepted(given: object) -> None:
    with pytest.raises(ValueError, match="never, seconds"):
        parse_keep_alive(given)


def test_keep_alive_is_described_as_typed() -> None:
    assert [describe_keep_alive(s) for s in (NEVER, 0, 90, 300, 5400)] == ["never", "0s", "90s", "5m", "1h30m"]


def test_the_manifest_key_is_validated_and_kept(tmp_path) -> None:  # noqa: ANN001
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x" * 10)
    spec = spec_from_mapping({"name": "m", "weights": str(weights), "keep_alive": "10m"})
    assert spec.keep_alive == 600.0
    assert spec_from_mapping({"name": "m", "weights": str(weights)}).keep_alive is None
    with pytest.raises(SpecError, match="keep_alive"):
        spec_from_mapping({"name": "m", "weights": str(weights), "keep_alive": "later"})


def one_model(keep_alive: float, tiers: tuple[Tier, ...] = (Tier.GPU, Tier.RAM, Tier.DISK, Tier.COLD)) -> Harness:
    h = Harness(device_budget=4 * GB, host_budget=8 * GB, service_seconds=1.0)
    h.add_model("a", footprints(1 * GB, tiers), keep_alive=keep_alive)
    return h


def test_an_unused_model_moves_down_one_tier_per_keep_alive() -> None:
    h = one_model(keep_alive=60.0)
    h.request("a", "r1")
    h.run()  # cold -> gpu (5 s), served (1 s): last used at 6 s
    assert h.sched.state("a").tier is Tier.GPU
    assert h.sched.state("a").expires_at == pytest.approx(66.0)
    h.run(until=65.0)
    h.tick()
    assert h.sched.state("a").tier is Tier.GPU and h.sched.state("a").moving_to is None, "not before its time"
    h.run(until=66.0)
    h.tick()
    assert h.sched.state("a").moving_to is Tier.RAM
    assert h.moves[-1].reason.startswith("unused for 60 s")
    h.run()  # 0.25 s: in RAM at 66.25, which counts as settled there
    assert h.sched.state("a").tier is Tier.RAM
    assert h.sched.state("a").expires_at == pytest.approx(126.25)
    h.run(until=126.25)
    h.tick()
    h.run()
    assert h.sched.state("a").tier is Tier.DISK and h.sched.state("a").expires_at is None, "disk is the last step"
    h.run(until=1000.0)
    h.tick()
    assert [(m.src, m.dst) for m in h.moves] == [(Tier.COLD, Tier.GPU), (Tier.GPU, Tier.RAM), (Tier.RAM, Tier.DISK)]


def test_never_while_a_request_runs_or_waits() -> None:
    h = one_model(keep_alive=0.0)
    h.auto_finish = False
    h.request("a", "r1")
    h.run()
    assert h.sched.state("a").in_flight == 1
    h.run(until=100.0)
    h.tick()
    assert h.sched.state("a").tier is Tier.GPU and h.sched.state("a").expires_at is None
    h.finish("a", "r1")  # keep_alive 0: it moves down the moment its last request ends
    assert h.sched.state("a").moving_to is Tier.RAM


def test_a_requests_keep_alive_overrides_the_models_until_the_next_request() -> None:
    h = one_model(keep_alive=NEVER)
    h.request("a", "r1", keep_alive=10.0)
    h.run()
    assert h.sched.state("a").expires_at == pytest.approx(16.0)
    h.request("a", "r2", keep_alive=NEVER)
    h.run()
    assert h.sched.state("a").expires_at is None
    h.run(until=500.0)
    h.tick()
    assert h.sched.state("a").tier is Tier.GPU
    h.request("a", "r3")  # no keep_alive: the model's own (never) again
    h.run()
    assert h.sched.state("a").expires_at is None and h.sched.state("a").keep_alive == math.inf
    with pytest.raises(SchedulerError):
        h.sched.on_request("a", "r4", keep_alive=-1.0)


def test_without_room_in_ram_an_expired_model_goes_to_disk() -> None:
    h = Harness(device_budget=4 * GB, host_budget=int(0.5 * GB), service_seconds=1.0)
    h.add_model("a", footprints(1 * GB), keep_alive=5.0)
    h.request("a", "r1")
    h.run()
    h.run(until=h.clock.now + 5.0)
    h.tick()
    h.run()
    assert h.sched.state("a").tier is Tier.DISK


def test_an_engine_without_ram_or_disk_expires_to_cold() -> None:
    h = one_model(keep_alive=1.0, tiers=(Tier.GPU, Tier.COLD))
    h.request("a", "r1")
    h.run()
    h.run(until=h.clock.now + 1.0)
    h.tick()
    h.run()
    assert h.sched.state("a").tier is Tier.COLD


def test_a_placed_model_is_left_alone_until_its_placement_ends() -> None:
    h = one_model(keep_alive=1.0)
    h.place("a", Tier.GPU)
    h.run()
    assert h.sched.state("a").tier is Tier.GPU and h.sched.state("a").expires_at == pytest.approx(6.0)
    h.run(until=10.0)
    h.tick()
    h.run()
    assert h.sched.state("a").tier is Tier.RAM


def test_rows_hold_what_a_move_reserves_so_they_add_up_to_the_totals() -> None:
    h = one_model(keep_alive=NEVER)
    h.request("a", "r1")
    assert h.sched.state("a").moving_to is Tier.GPU
    st = h.sched.state("a")
    assert st.device_bytes == 1 * GB == h.sched.device_used, "mid-move the row shows the move's reservation"
    assert st.host_bytes == h.sched.host_used


def test_the_shipped_schema_takes_keep_alive_as_the_loader_does() -> None:
    import jsonschema

    from clearml_umem.manifest_schema import manifest_schema

    for value in ("10m", 300, "never"):
        jsonschema.validate({"models": [{"name": "m", "weights": "w", "keep_alive": value}]}, manifest_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"models": [{"name": "m", "weights": "w", "keep_alive": [1]}]}, manifest_schema())
