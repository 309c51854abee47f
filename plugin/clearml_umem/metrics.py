"""Prometheus metrics and a small in-memory summary, both fed only by bus events.

Each `Metrics` owns its registry instead of using prometheus_client's global one, so
several servers (tests, the demo beside a benchmark) can live in one process without
"duplicated timeseries" errors. Listeners run on the emitter's thread (usually the
router's event loop): every update is a few dict operations under a lock, never I/O.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from clearml_umem.events import (
    EngineLost,
    Event,
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
from clearml_umem.tiers import ALL_TIERS, Tier

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
"""From a hot hit on a small model (milliseconds) to a cold start of a large vLLM engine (minutes)."""

SWAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

SAMPLES_KEPT = 10_000
"""TTFT samples kept per model x tier for the summary's quantiles; older ones fall off."""


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile: with few samples (a demo round) it is always an observed value."""
    index = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


class _SwapStats:
    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self.bytes = 0
        self.gbps_sum = 0.0

    def add(self, event: MoveFinished) -> None:
        self.count += 1
        self.seconds += event.seconds
        self.bytes += event.bytes_moved
        self.gbps_sum += event.gbps

    def as_dict(self) -> dict[str, float | int]:
        n = self.count
        return {
            "count": n,
            "mean_s": self.seconds / n if n else 0.0,
            "mean_gbps": self.gbps_sum / n if n else 0.0,
            "bytes": self.bytes,
        }


class Metrics:
    """Subscribes to a bus; `render()` is the /metrics body, `summary()` the demo's and reporter's numbers."""

    content_type: str = CONTENT_TYPE_LATEST

    def __init__(self, bus: EventBus, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("umem_ttft_seconds", "Time to first token, from request arrival at the router to the "
                              "first token sent, by the tier the model was served from (where it was on "
                              "arrival, or the tier it came back from if it left the GPU first)", ["model", "tier"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.move_seconds = Histogram("umem_move_seconds", "Duration of tier moves; direction in = toward the GPU",
                                      ["model", "direction", "src", "dst"], buckets=SWAP_BUCKETS, registry=r)
        self.move_bytes = Counter("umem_move_bytes", "Bytes moved by tier moves",
                                  ["model", "direction", "src", "dst"], registry=r)
        self.move_gbps = Gauge("umem_move_gbps", "Speed of the last tier move (GB/s)", ["model", "direction"],
                               registry=r)
        self.swap_out_host_copy = Counter(
            "umem_swap_out_host_copy", "Swap-outs by how the host copy was had: kept (made while hot, so only "
            "device memory was freed) or copied (copied off the device on eviction)", ["model", "host_copy"],
            registry=r)
        self.requests = Counter("umem_requests", "Requests by the model's tier on arrival; hit = it was on the GPU",
                                ["model", "tier", "result"], registry=r)
        self.rejections = Counter("umem_request_rejections", "Requests the scheduler refused", ["model"],
                                  registry=r)
        self.finished = Counter("umem_requests_finished", "Requests that ended, successfully or not",
                                ["model", "ok"], registry=r)
        self.move_failures = Counter("umem_move_failures", "Tier moves that failed",
                                           ["model", "src", "dst"], registry=r)
        self.engine_deaths = Counter("umem_engine_deaths", "Engines that died on their own (a killed process); "
                                     "their model counts as cold", ["model"], registry=r)
        self.memory = Gauge("umem_memory_bytes", "Budgeted memory: used and budget, on the device and the host",
                            ["kind", "what"], registry=r)
        self.model_tier = Gauge("umem_model_tier", "1 for the tier a model is in, 0 for the others",
                                ["model", "tier"], registry=r)
        self.queue_wait = Histogram("umem_queue_wait_seconds", "Time a request waited for its model to be hot",
                                    ["model", "tier"], buckets=QUEUE_BUCKETS, registry=r)
        self.big_bodies = Counter(
            "umem_big_request_bodies", "Request bodies over 64 KiB, by what the parser processes made of them: "
            "prepared (passed on to the router), refused (the client's 4xx: a bad field, a prompt that cannot fit "
            "its model's context), busy (503: too many waiting), failed (503: the parser process failed), "
            "abandoned (the client left first, while its body arrived or was checked), stalled (408: the body "
            "stopped arriving)", ["outcome"], registry=r)
        self.loop_lag = Histogram(
            "umem_event_loop_lag_seconds", "How late the router's event loop ran a timer due every 10 ms: how long "
            "other work held the loop (a parse, a garbage collection, a blocking call), which every client of the "
            "router waited for (loop_lag.py)", buckets=LOOP_LAG_BUCKETS, registry=r)

        self._lock = threading.Lock()
        self._ttft_samples: dict[tuple[str, Tier], deque[float]] = defaultdict(lambda: deque(maxlen=SAMPLES_KEPT))
        self._swaps: dict[tuple[str, str], _SwapStats] = defaultdict(_SwapStats)
        self._arrivals: dict[str, dict[Tier, int]] = defaultdict(lambda: defaultdict(int))
        self._rejections: dict[str, int] = defaultdict(int)
        self._finished: dict[str, dict[bool, int]] = defaultdict(lambda: defaultdict(int))
        self._memory: dict[str, int] = {}
        self._tiers: dict[str, Tier | None] = {}
        self._handlers: dict[type[Event], Callable[[Any], None]] = {
            FirstToken: self._on_first_token,
            MoveFinished: self._on_move_finished,
            MoveFailed: self._on_move_failed,
            RequestArrived: self._on_arrived,
            RequestRejected: self._on_rejected,
            RequestFinished: self._on_finished,
            RequestDispatched: self._on_dispatched,
            MemorySnapshot: self._on_memory,
            EngineLost: self._on_engine_lost,
        }
        self.unsubscribe = bus.subscribe(self.on_event)

    # -- events ---------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    def _on_first_token(self, e: FirstToken) -> None:
        self.ttft.labels(e.model, e.served_from.value).observe(e.ttft_s)
        with self._lock:
            self._ttft_samples[(e.model, e.served_from)].append(e.ttft_s)

    def _on_move_finished(self, e: MoveFinished) -> None:
        labels = (e.model, e.direction, e.src.value, e.dst.value)
        self.move_seconds.labels(*labels).observe(e.seconds)
        self.move_bytes.labels(*labels).inc(max(0, e.bytes_moved))
        if e.host_copy is not None:
            self.swap_out_host_copy.labels(e.model, e.host_copy).inc()
        if e.bytes_moved > 0:
            self.move_gbps.labels(e.model, e.direction).set(e.gbps)
        with self._lock:
            self._swaps[(e.model, e.direction)].add(e)
        self._set_tier(e.model, e.dst)

    def _on_engine_lost(self, e: EngineLost) -> None:
        self.engine_deaths.labels(e.model).inc()
        self._set_tier(e.model, Tier.COLD)

    def _on_move_failed(self, e: MoveFailed) -> None:
        self.move_failures.labels(e.model, e.src.value, e.dst.value).inc()
        # Where a failed move leaves the engine (back in src, or cold) is the runtime's call and
        # not in the event: the gauge says "unknown" until the next move or `set_model_tiers`.
        self._set_tier(e.model, None)

    def _on_arrived(self, e: RequestArrived) -> None:
        self.requests.labels(e.model, e.tier.value, "hit" if e.hit else "miss").inc()
        with self._lock:
            self._arrivals[e.model][e.tier] += 1

    def _on_rejected(self, e: RequestRejected) -> None:
        self.rejections.labels(e.model).inc()
        with self._lock:
            self._rejections[e.model] += 1

    def _on_finished(self, e: RequestFinished) -> None:
        self.finished.labels(e.model, "true" if e.ok else "false").inc()
        with self._lock:
            self._finished[e.model][e.ok] += 1

    def _on_dispatched(self, e: RequestDispatched) -> None:
        self.queue_wait.labels(e.model, e.served_from.value).observe(max(0.0, e.waited_s))

    def _on_memory(self, e: MemorySnapshot) -> None:
        values = {("device", "used"): e.device_used, ("device", "budget"): e.device_budget,
                  ("host", "used"): e.host_used, ("host", "budget"): e.host_budget}
        for (kind, what), value in values.items():
            self.memory.labels(kind, what).set(value)
        with self._lock:
            self._memory = {f"{kind}_{what}": value for (kind, what), value in values.items()}

    def _set_tier(self, model: str, tier: Tier | None) -> None:
        for t in ALL_TIERS:
            self.model_tier.labels(model, t.value).set(1 if t is tier else 0)
        with self._lock:
            self._tiers[model] = tier

    def set_model_tiers(self, tiers: Mapping[str, Tier | str]) -> None:
        """Make the tier gauge match the runtime's view exactly (the router calls it on each scrape).

        Events alone cannot tell a model that never moved (cold since start) nor one that left
        the catalog; this fills both gaps.
        """
        wanted = {name: Tier(tier) for name, tier in tiers.items()}
        with self._lock:
            gone = [name for name in self._tiers if name not in wanted]
            for name in gone:
                del self._tiers[name]
        for name in gone:
            for t in ALL_TIERS:
                with suppress(KeyError):
                    self.model_tier.remove(name, t.value)
        for name, tier in wanted.items():
            self._set_tier(name, tier)

    # -- output ---------------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def ttft_by_tier(self) -> dict[str, dict[str, float | int]]:
        """Over all models, per tier served from: {count, median_s, p90_s} of the kept samples."""
        with self._lock:
            by_tier: dict[Tier, list[float]] = defaultdict(list)
            for (_, tier), values in self._ttft_samples.items():
                by_tier[tier].extend(values)
        out: dict[str, dict[str, float | int]] = {}
        for tier in ALL_TIERS:
            values = sorted(by_tier.get(tier, []))
            if values:
                out[tier.value] = {"count": len(values), "median_s": statistics.median(values),
                                   "p90_s": _quantile(values, 0.9)}
        return out

    def summary(self) -> dict[str, Any]:
        """Plain numbers for the demo table and the ClearML reporter.

        {"ttft": {model: {tier: {count, median_s, p90_s}}},
         "swaps": {model: {"in"|"out": {count, mean_s, mean_gbps, bytes}}},
         "requests": {model: {hits, misses, rejected, ok, failed, by_tier: {tier: n}}},
         "tiers": {model: tier or None}, "memory": {device_used, device_budget, host_used, host_budget}}
        """
        with self._lock:
            ttft_samples = {key: sorted(values) for key, values in self._ttft_samples.items() if values}
            swaps = {key: stats.as_dict() for key, stats in self._swaps.items()}
            arrivals = {model: dict(by_tier) for model, by_tier in self._arrivals.items()}
            rejections = dict(self._rejections)
            finished = {model: dict(by_ok) for model, by_ok in self._finished.items()}
            memory = dict(self._memory)
            tiers = {model: (tier.value if tier else None) for model, tier in self._tiers.items()}

        ttft: dict[str, dict[str, dict[str, float | int]]] = defaultdict(dict)
        for (model, tier), values in sorted(ttft_samples.items(), key=lambda kv: (kv[0][0], kv[0][1].rank)):
            ttft[model][tier.value] = {"count": len(values), "median_s": statistics.median(values),
                                       "p90_s": _quantile(values, 0.9)}
        swap_summary: dict[str, dict[str, dict[str, float | int]]] = defaultdict(dict)
        for (model, direction), stats in sorted(swaps.items()):
            swap_summary[model][direction] = stats
        requests: dict[str, dict[str, Any]] = {}
        for model in sorted(set(arrivals) | set(rejections) | set(finished)):
            by_tier = arrivals.get(model, {})
            requests[model] = {
                "hits": by_tier.get(Tier.GPU, 0),
                "misses": sum(n for tier, n in by_tier.items() if tier is not Tier.GPU),
                "rejected": rejections.get(model, 0),
                "ok": finished.get(model, {}).get(True, 0),
                "failed": finished.get(model, {}).get(False, 0),
                "by_tier": {t.value: by_tier[t] for t in ALL_TIERS if t in by_tier},
            }
        return {"ttft": dict(ttft), "swaps": dict(swap_summary), "requests": requests, "tiers": tiers,
                "memory": memory}
