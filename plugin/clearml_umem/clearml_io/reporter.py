"""Serving metrics as ClearML scalars, without ever touching the request path.

`on_event` runs on whatever thread emitted the event (often the router's event loop), so
it only appends to a bounded deque. A background thread drains it every `flush_period_s`
and talks to the ClearML Logger; if that thread falls behind, the oldest events are
dropped and counted rather than growing memory or blocking a request.

Every scalar's x axis is the same: seconds since the reporter started (a point per flush
window), never a per-series request counter.

Scalars (title / series):
- `TTFT {model} (s)` / `{tier} p50`, `{tier} p95`, and `TTFT {model} (requests)` / tier: the
  requests that got their first token in the window, per tier served from (an aggregate per
  window, so a busy router does not send a point per request); `TTFT by tier (s)` / `{tier} p50`,
  `{tier} p95` over all models
- `swap-in (s)`, `swap-in (GB/s)`, `swap-out (s)`, `swap-out (GB/s)` / `{model} {src}->{dst}`; a
  swap-out says how its host copy was had: `... gpu->ram (copy kept)` or `(copied)`
- `requests by tier on arrival` / tier, and `cache` / hits, misses, hit rate: cumulative
- `memory (GB)` / device used, device budget, host used, host budget
- `throughput` / requests/s over each flush period
- `model tier` / model: where each model sits after its last move, as a number (gpu 3, ram 2,
  disk 1, cold 0: higher is hotter), and a `models by tier` table (model, tier, moves), both
  reported when a model moved, so the task's web UI shows which model sits where
The `TTFT summary` table (model x tier, median ms and count) and single values are reported
every `summary_period_s` and on close, so a task killed without a close (aborted from the web
UI, crashed) still shows them as of the last period; the serve task also closes the reporter
from its abort callback.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from clearml_umem.events import (
    EngineLost,
    Event,
    EventBus,
    FirstToken,
    MemorySnapshot,
    MoveFinished,
    RequestArrived,
)
from clearml_umem.tiers import ALL_TIERS, Tier

log = logging.getLogger(__name__)

TITLE_TTFT_BY_TIER = "TTFT by tier (s)"
TITLE_ARRIVALS = "requests by tier on arrival"
TITLE_CACHE = "cache"
TITLE_MEMORY = "memory (GB)"
TITLE_THROUGHPUT = "throughput"
TABLE_TTFT = "TTFT summary"
TITLE_TIER = "model tier"
TABLE_TIERS = "models by tier"


def tier_value(tier: Tier) -> int:
    """A tier as a number for a plot: gpu 3, ram 2, disk 1, cold 0 (higher is hotter)."""
    return len(ALL_TIERS) - 1 - tier.rank


def ttft_title(model: str) -> str:
    return f"TTFT {model} (s)"


def ttft_count_title(model: str) -> str:
    return f"TTFT {model} (requests)"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list: a value that was measured."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def swap_titles(direction: str) -> tuple[str, str]:
    """Titles of the seconds and GB/s plots of swap-ins ("in") or swap-outs ("out")."""
    return f"swap-{direction} (s)", f"swap-{direction} (GB/s)"


class ClearMLReporter:
    """Subscribe it to an EventBus; `close()` flushes and writes the summary.

    `logger` is a `clearml.Logger` (from `task.get_logger()`); anything with the same
    report_* methods works, which keeps the reporter usable from a benchmark that
    collects numbers itself.
    """

    def __init__(self, logger: Any, *, flush_period_s: float = 1.0, max_buffer: int = 100_000,
                 summary_period_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.flush_period_s = flush_period_s
        self.summary_period_s = summary_period_s
        self._clock = clock
        self._buffer: deque[Event] = deque(maxlen=max_buffer)
        self._received = 0
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._unsubscribe: list[Callable[[], None]] = []
        self._started = clock()
        self._last_tick = self._started
        self._last_rate_reported = False
        self.dropped = 0
        # aggregates, touched only under _flush_lock (the worker, or close())
        self._ttft: dict[tuple[str, Tier], list[float]] = defaultdict(list)
        self._window_ttft: dict[tuple[str, Tier], list[float]] = defaultdict(list)
        self._last_summary = self._started
        self._arrivals: dict[Tier, int] = defaultdict(int)
        self._swaps: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self._memory: MemorySnapshot | None = None
        self._requests_total = 0
        self._tiers: dict[str, Tier] = {}
        self._moves: dict[str, int] = defaultdict(int)
        self._tiers_changed = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="umem-clearml-reporter", daemon=True)
        self._thread.start()

    # --- request path: cheap and non-blocking ------------------------------------------

    def attach(self, bus: EventBus) -> ClearMLReporter:
        self._unsubscribe.append(bus.subscribe(self.on_event))
        return self

    def on_event(self, event: Event) -> None:
        if isinstance(event, (FirstToken, MoveFinished, RequestArrived, MemorySnapshot, EngineLost)):
            if len(self._buffer) == self._buffer.maxlen:
                self.dropped += 1
            self._buffer.append(event)
            self._received += 1

    # --- worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.flush_period_s):
            try:
                self.flush()
                if self.summary_period_s > 0 and self._clock() - self._last_summary >= self.summary_period_s:
                    self.report_summary()
            except Exception:  # noqa: BLE001 - a reporting failure must never end serving
                log.exception("ClearML reporter flush failed")

    def flush(self) -> None:
        """Report everything buffered so far; safe from any thread."""
        with self._flush_lock:
            arrivals_now = 0
            while self._buffer:
                try:
                    event = self._buffer.popleft()
                except IndexError:
                    break
                arrivals_now += self._report(event)
            self._report_periodic(arrivals_now)

    def _scalar(self, title: str, series: str, value: float, iteration: int) -> None:
        self.logger.report_scalar(title=title, series=series, value=float(value), iteration=iteration)

    def _report(self, event: Event) -> int:
        if isinstance(event, FirstToken):
            tier = Tier(event.served_from)
            self._ttft[(event.model, tier)].append(event.ttft_s)
            self._window_ttft[(event.model, tier)].append(event.ttft_s)
        elif isinstance(event, MoveFinished):
            seconds_title, gbps_title = swap_titles(event.direction)
            series = f"{event.model} {event.src.value}->{event.dst.value}"
            if event.host_copy is not None:
                series += " (copy kept)" if event.host_copy == "kept" else " (copied)"
            self._swaps[event.direction].append((event.seconds, event.gbps))
            self._tiers[event.model] = event.dst
            self._moves[event.model] += 1
            self._tiers_changed = True
            self._scalar(seconds_title, series, event.seconds, self._elapsed_iter())
            if event.bytes_moved > 0 and event.seconds > 0:
                self._scalar(gbps_title, series, event.gbps, self._elapsed_iter())
        elif isinstance(event, RequestArrived):
            self._arrivals[Tier(event.tier)] += 1
            self._requests_total += 1
            return 1
        elif isinstance(event, MemorySnapshot):
            self._memory = event
        elif isinstance(event, EngineLost):
            self._tiers[event.model] = Tier.COLD
            self._tiers_changed = True
        return 0

    def _elapsed_iter(self) -> int:
        return int(round(self._clock() - self._started))

    def _report_periodic(self, arrivals_now: int) -> None:
        now = self._clock()
        window = max(now - self._last_tick, 1e-9)
        self._last_tick = now
        it = self._elapsed_iter()
        if self._window_ttft:
            by_tier: dict[Tier, list[float]] = defaultdict(list)
            for (model, tier), values in sorted(self._window_ttft.items(), key=lambda kv: (kv[0][0], kv[0][1].rank)):
                self._scalar(ttft_title(model), f"{tier.value} p50", percentile(values, 50), it)
                self._scalar(ttft_title(model), f"{tier.value} p95", percentile(values, 95), it)
                self._scalar(ttft_count_title(model), tier.value, len(values), it)
                by_tier[tier].extend(values)
            for tier, values in by_tier.items():
                self._scalar(TITLE_TTFT_BY_TIER, f"{tier.value} p50", percentile(values, 50), it)
                self._scalar(TITLE_TTFT_BY_TIER, f"{tier.value} p95", percentile(values, 95), it)
            self._window_ttft.clear()
        if arrivals_now:
            for tier in ALL_TIERS:
                if self._arrivals.get(tier):
                    self._scalar(TITLE_ARRIVALS, tier.value, self._arrivals[tier], it)
            hits = self._arrivals.get(Tier.GPU, 0)
            misses = self._requests_total - hits
            self._scalar(TITLE_CACHE, "hits", hits, it)
            self._scalar(TITLE_CACHE, "misses", misses, it)
            self._scalar(TITLE_CACHE, "hit rate", hits / self._requests_total, it)
        if arrivals_now or self._last_rate_reported:
            self._scalar(TITLE_THROUGHPUT, "requests/s", arrivals_now / window, it)
            self._last_rate_reported = arrivals_now > 0
        if self._memory is not None:
            m = self._memory
            for series, value in (("device used", m.device_used), ("device budget", m.device_budget),
                                  ("host used", m.host_used), ("host budget", m.host_budget)):
                self._scalar(TITLE_MEMORY, series, value / 1e9, it)
            self._memory = None
        if self._tiers_changed:
            self._tiers_changed = False
            rows: list[list[Any]] = [["model", "tier", "moves"]]
            for model, tier in sorted(self._tiers.items()):
                self._scalar(TITLE_TIER, model, tier_value(tier), it)
                rows.append([model, tier.value, self._moves[model]])
            self.logger.report_table(TABLE_TIERS, "now", iteration=it, table_plot=rows)

    # --- summary --------------------------------------------------------------------------

    def summary_rows(self) -> list[list[Any]]:
        """The TTFT table: a header, then one row per model with median ms and count per tier."""
        header: list[Any] = ["model"]
        for tier in ALL_TIERS:
            header += [f"{tier.value} median ms", f"{tier.value} n"]
        rows: list[list[Any]] = [header]
        for model in sorted({m for m, _ in self._ttft}):
            row: list[Any] = [model]
            for tier in ALL_TIERS:
                values = self._ttft.get((model, tier), [])
                row += [round(statistics.median(values) * 1000, 2) if values else "", len(values)]
            rows.append(row)
        return rows

    def headline(self) -> dict[str, float]:
        """Single values for the task's summary: medians per tier, swap speeds, hit rate, totals."""
        values: dict[str, float] = {"requests": float(self._requests_total)}
        if self._requests_total:
            values["hit rate"] = self._arrivals.get(Tier.GPU, 0) / self._requests_total
        for tier in ALL_TIERS:
            samples = [v for (_, t), vs in self._ttft.items() if t is tier for v in vs]
            if samples:
                values[f"TTFT median {tier.value} (s)"] = statistics.median(samples)
        for direction, swaps in self._swaps.items():
            values[f"swap-{direction} median (s)"] = statistics.median(s for s, _ in swaps)
            speeds = [g for _, g in swaps if g > 0]
            if speeds:
                values[f"swap-{direction} median (GB/s)"] = statistics.median(speeds)
        if self.dropped:
            values["reporter dropped events"] = float(self.dropped)
        return values

    def report_summary(self) -> None:
        """The TTFT table and single values as of now; reported again later, the newest stands."""
        with self._flush_lock:
            self._last_summary = self._clock()
            if self._ttft:
                self.logger.report_table(TABLE_TTFT, "by model x tier", iteration=0, table_plot=self.summary_rows())
            for name, value in self.headline().items():
                self.logger.report_single_value(name, value)

    def close(self) -> None:
        """Stop the worker, report what is left, then the summary table and single values.

        Safe from any thread (the serve task's abort callback runs on the SDK's own)."""
        with self._flush_lock:
            if self._closed:
                return
            self._closed = True
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, self.flush_period_s * 2))
        self.flush()
        self.report_summary()
        flush = getattr(self.logger, "flush", None)
        if callable(flush):
            flush()

    def __enter__(self) -> ClearMLReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
