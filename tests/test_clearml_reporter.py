"""The reporter's contract with the request path: emitting never waits on ClearML."""

from __future__ import annotations

import threading
import time
from typing import Any

from clearml_umem.clearml_io.reporter import ClearMLReporter
from clearml_umem.events import EventBus, FirstToken, RequestArrived, RequestFinished
from clearml_umem.tiers import Tier


class SlowLogger:
    """A ClearML logger stand-in that can hang, as over a bad network, until released."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.released.set()
        self.calls: list[tuple[str, Any]] = []
        self.threads: set[str] = set()

    def _record(self, name: str, payload: Any) -> None:
        self.released.wait()
        self.threads.add(threading.current_thread().name)
        self.calls.append((name, payload))

    def report_scalar(self, title: str, series: str, value: float, iteration: int) -> None:
        self._record("scalar", (title, series, value, iteration))

    def report_table(self, title: str, series: str, iteration: int, table_plot: list[list[Any]]) -> None:
        self._record("table", (title, table_plot))

    def report_single_value(self, name: str, value: float) -> None:
        self._record("single", (name, value))


def test_emitting_does_not_wait_for_a_hung_logger() -> None:
    logger = SlowLogger()
    logger.released.clear()
    bus = EventBus()
    reporter = ClearMLReporter(logger, flush_period_s=0.01).attach(bus)
    bus.emit(FirstToken("m", 0.0, "first", Tier.GPU, 0.001))
    time.sleep(0.05)
    start = time.perf_counter()
    for i in range(2000):
        bus.emit(RequestArrived("m", 0.0, str(i), Tier.GPU))
        bus.emit(FirstToken("m", 0.0, str(i), Tier.GPU, 0.001))
    emit_seconds = time.perf_counter() - start
    assert emit_seconds < 1.0, emit_seconds
    assert not logger.calls
    logger.released.set()
    reporter.close()
    assert "umem-clearml-reporter" in logger.threads
    counts = [c[1][2] for c in logger.calls if c[0] == "scalar" and c[1][0] == "TTFT m (requests)"]
    assert sum(counts) == 2001 and len(counts) <= 3, "aggregated per window, not a point per request"


def test_bounded_buffer_drops_oldest_and_counts_them() -> None:
    logger = SlowLogger()
    reporter = ClearMLReporter(logger, flush_period_s=3600, max_buffer=10)
    for i in range(25):
        reporter.on_event(FirstToken("m", 0.0, str(i), Tier.RAM, 0.1))
    reporter.on_event(RequestFinished("m", 0.0, "x", Tier.RAM, True, 3, 0.2))
    assert reporter.dropped == 15
    reporter.close()
    counts = [c[1][2] for c in logger.calls if c[0] == "scalar" and c[1][0] == "TTFT m (requests)"]
    assert counts == [10]
    singles = dict(c[1] for c in logger.calls if c[0] == "single")
    assert singles["reporter dropped events"] == 15


def test_close_is_idempotent_and_unsubscribes() -> None:
    logger = SlowLogger()
    bus = EventBus()
    reporter = ClearMLReporter(logger, flush_period_s=0.01).attach(bus)
    reporter.close()
    reporter.close()
    bus.emit(FirstToken("m", 0.0, "late", Tier.GPU, 0.1))
    assert reporter.flush() is None
    assert not [c for c in logger.calls if c[0] == "scalar"]


def test_each_models_tier_is_reported_when_it_moves() -> None:
    from clearml_umem.events import EngineLost, MoveFinished

    logger = SlowLogger()
    reporter = ClearMLReporter(logger, flush_period_s=3600)
    reporter.on_event(MoveFinished("a", 0.0, Tier.COLD, Tier.GPU, 1.0, 100))
    reporter.on_event(MoveFinished("b", 0.0, Tier.COLD, Tier.RAM, 1.0, 100))
    reporter.flush()
    reporter.on_event(EngineLost("a", 0.0, Tier.GPU, "killed"))
    reporter.close()
    tiers = [c[1][:3] for c in logger.calls if c[0] == "scalar" and c[1][0] == "model tier"]
    assert tiers == [("model tier", "a", 3), ("model tier", "b", 2), ("model tier", "a", 0), ("model tier", "b", 2)]
    tables = [c[1] for c in logger.calls if c[0] == "table" and c[1][0] == "models by tier"]
    assert tables[-1][1] == [["model", "tier", "moves"], ["a", "cold", 1], ["b", "ram", 1]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ttft_is_reported_per_window_as_count_p50_p95_on_elapsed_seconds() -> None:
    from clearml_umem.events import MoveFinished

    logger = SlowLogger()
    clock = FakeClock()
    reporter = ClearMLReporter(logger, flush_period_s=3600, summary_period_s=0, clock=clock)
    for i in range(1, 21):
        reporter.on_event(FirstToken("m", 0.0, str(i), Tier.GPU, i / 1000))
    reporter.on_event(FirstToken("m", 0.0, "r", Tier.RAM, 0.5))
    clock.now += 7.4
    reporter.flush()
    reporter.on_event(FirstToken("m", 0.0, "x", Tier.GPU, 0.003))
    reporter.on_event(MoveFinished("m", 0.0, Tier.RAM, Tier.GPU, 0.2, 10**9))
    clock.now += 5.0
    reporter.flush()
    scalars = [c[1] for c in logger.calls if c[0] == "scalar"]
    first = {(t, s): v for t, s, v, it in scalars if it == 7}
    assert first[("TTFT m (s)", "gpu p50")] == 0.010 and first[("TTFT m (s)", "gpu p95")] == 0.019
    assert first[("TTFT m (requests)", "gpu")] == 20 and first[("TTFT m (requests)", "ram")] == 1
    assert first[("TTFT by tier (s)", "ram p95")] == 0.5
    second = {(t, s): v for t, s, v, it in scalars if it == 12}
    assert second[("TTFT m (requests)", "gpu")] == 1 and ("TTFT m (requests)", "ram") not in second
    assert second[("swap-in (s)", "m ram->gpu")] == 0.2
    assert {it for *_, it in scalars} == {7, 12}, "every scalar on the same elapsed-seconds axis"
    reporter.close()


def test_the_summary_is_reported_every_period_before_any_close() -> None:
    logger = SlowLogger()
    reporter = ClearMLReporter(logger, flush_period_s=0.02, summary_period_s=0.05)
    reporter.on_event(RequestArrived("m", 0.0, "1", Tier.COLD))
    reporter.on_event(FirstToken("m", 0.0, "1", Tier.COLD, 0.25))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(c[0] == "single" for c in list(logger.calls)):
        time.sleep(0.02)
    singles = dict(c[1] for c in list(logger.calls) if c[0] == "single")
    assert singles["TTFT median cold (s)"] == 0.25 and singles["requests"] == 1
    assert any(c[0] == "table" and c[1][0] == "TTFT summary" for c in list(logger.calls))
    reporter.close()
