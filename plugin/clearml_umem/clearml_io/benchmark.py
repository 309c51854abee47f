"""Time-to-first-token per tier, and swap speed against a bandwidth probe from the same run.

Shared by the benchmark task (tasks/benchmark.py) and pipeline steps: the code a
pipeline step runs must be importable from the installed package, not from a script.

Before every measured request the model is put in a tier with
`POST /admin/models/{name}/place`, so each number is the cost of exactly one tier.
TTFT is measured at the client (what users see); swaps come from the server's events.
"""

from __future__ import annotations

import logging
import statistics
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from clearml_umem.client import open_client, place, stream_ttft
from clearml_umem.config import ConfigError, ServeConfig
from clearml_umem.events import Event, TransitionFinished
from clearml_umem.tiers import Tier

SCENARIOS: tuple[tuple[str, Tier], ...] = (
    ("hot", Tier.GPU), ("from RAM", Tier.RAM), ("from disk", Tier.DISK), ("cold start", Tier.COLD))
PROMPT = [{"role": "user", "content": "Say hello."}]

log = logging.getLogger("umem.benchmark")


@dataclass
class ScenarioResult:
    model: str
    scenario: str
    tier: str
    ttft_s: list[float] = field(default_factory=list)
    swap_in_s: list[float] = field(default_factory=list)
    swap_in_gbps: list[float] = field(default_factory=list)
    skipped: str | None = None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.ttft_s) * 1000 if self.ttft_s else None

    @property
    def spread_ms(self) -> tuple[float, float] | None:
        return (min(self.ttft_s) * 1000, max(self.ttft_s) * 1000) if self.ttft_s else None


@dataclass
class BenchmarkResult:
    probe_gbps: float
    probe_path: str
    runs: int
    scenarios: list[ScenarioResult]

    def rows(self) -> list[list[Any]]:
        """Header plus one row per model x scenario: what the table, the Markdown and tests show."""
        rows: list[list[Any]] = [["model", "scenario", "TTFT median ms", "TTFT min ms", "TTFT max ms", "n",
                                  "swap-in s", "swap-in GB/s", "swap / probe"]]
        for r in self.scenarios:
            if r.skipped:
                rows.append([r.model, r.scenario, "n/a", "", "", 0, "", "", r.skipped])
                continue
            spread = r.spread_ms or (0.0, 0.0)
            swap_s = statistics.median(r.swap_in_s) if r.swap_in_s else None
            gbps = statistics.median(r.swap_in_gbps) if r.swap_in_gbps else None
            rows.append([r.model, r.scenario, round(r.median_ms or 0.0, 2), round(spread[0], 2), round(spread[1], 2),
                         len(r.ttft_s), "" if swap_s is None else round(swap_s, 4),
                         "" if gbps is None else round(gbps, 3),
                         "" if gbps is None or self.probe_gbps <= 0 else round(gbps / self.probe_gbps, 3)])
        return rows

    def markdown(self) -> str:
        rows = self.rows()
        lines = ["| " + " | ".join(str(c) for c in rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows[1:]]
        lines.append("")
        lines.append(f"Host-to-device bandwidth probe ({self.probe_path}): {self.probe_gbps:.2f} GB/s, "
                     f"{self.runs} runs per scenario.")
        return "\n".join(lines)


class SwapRecorder:
    """Swap-ins seen on the server's event bus, so each measurement gets the move it caused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[TransitionFinished] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, TransitionFinished) and event.direction == "in":
            with self._lock:
                self.events.append(event)

    def since(self, index: int, model: str, src: Tier) -> list[TransitionFinished]:
        with self._lock:
            return [e for e in self.events[index:] if e.model == model and e.src is src and e.dst is Tier.GPU]

    def mark(self) -> int:
        with self._lock:
            return len(self.events)


def run_benchmark(config: ServeConfig, *, models: Sequence[str] = (), runs: int = 3, max_tokens: int = 4,
                  probe_bytes: int = 256 * 2**20, logger: Any = None) -> BenchmarkResult:
    """Serve `config` in this process, measure every scenario, report to `logger` when given."""
    from clearml_umem.bandwidth import probe_bandwidth
    from clearml_umem.server import UnifiedMemoryServer

    probe = probe_bandwidth(config.device, probe_bytes)
    log.info("bandwidth probe (%s): %.2f GB/s", probe.path, probe.gbps)
    server = UnifiedMemoryServer(config)
    recorder = SwapRecorder()
    server.bus.subscribe(recorder)
    reporter = None
    if logger is not None:
        from clearml_umem.clearml_io.reporter import ClearMLReporter

        reporter = ClearMLReporter(logger, flush_period_s=0.5).attach(server.bus)
    results: list[ScenarioResult] = []
    try:
        with server.run_in_thread() as url, open_client(url) as client:
            served = [m["id"] for m in client.get("/v1/models").raise_for_status().json()["data"]]
            selected = [m for m in served if not models or m in models]
            missing = sorted(set(models) - set(served))
            if missing:
                raise ConfigError(f"models not served: {', '.join(missing)}; served: {', '.join(served)}")
            for model in selected:
                for scenario, tier in SCENARIOS:
                    result = ScenarioResult(model, scenario, tier.value)
                    results.append(result)
                    for _ in range(runs):
                        result.skipped = place(client, model, tier)
                        if result.skipped:
                            log.info("%s %s skipped: %s", model, scenario, result.skipped)
                            break
                        mark = recorder.mark()
                        result.ttft_s.append(stream_ttft(client, model, max_tokens, PROMPT)[0])
                        for swap in recorder.since(mark, model, tier) if tier is not Tier.GPU else []:
                            result.swap_in_s.append(swap.seconds)
                            if swap.gbps > 0:
                                result.swap_in_gbps.append(swap.gbps)
                    log.info("%s %s: %s", model, scenario,
                             f"median {result.median_ms:.1f} ms" if result.ttft_s else result.skipped)
    finally:
        if reporter is not None:
            reporter.close()
    outcome = BenchmarkResult(probe_gbps=probe.gbps, probe_path=probe.path, runs=runs, scenarios=results)
    if logger is not None:
        report(outcome, logger)
    return outcome


def report(result: BenchmarkResult, logger: Any) -> None:
    """Scalars per run, the table, a grouped bar chart and headline single values."""
    logger.report_scalar("bandwidth probe (GB/s)", result.probe_path, result.probe_gbps, 0)
    logger.report_single_value("bandwidth probe (GB/s)", result.probe_gbps)
    for r in result.scenarios:
        for i, ttft in enumerate(r.ttft_s):
            logger.report_scalar(f"benchmark TTFT {r.model} (s)", r.scenario, ttft, i)
        for i, gbps in enumerate(r.swap_in_gbps):
            logger.report_scalar("benchmark swap-in (GB/s)", f"{r.model} {r.tier}->gpu", gbps, i)
            if result.probe_gbps > 0:
                logger.report_scalar("benchmark swap / probe", f"{r.model} {r.tier}->gpu", gbps / result.probe_gbps, i)
        if r.median_ms is not None:
            logger.report_single_value(f"TTFT median {r.model} {r.scenario} (ms)", r.median_ms)
    logger.report_table("benchmark", "TTFT by model x scenario", iteration=0, table_plot=result.rows())
    models = sorted({r.model for r in result.scenarios})
    scenarios = [s for s, _ in SCENARIOS]
    for model in models:
        by_scenario = {r.scenario: r.median_ms or 0.0 for r in result.scenarios if r.model == model}
        logger.report_histogram("TTFT median by scenario (ms)", model, iteration=0,
                                values=[by_scenario.get(s, 0.0) for s in scenarios], xlabels=scenarios,
                                xaxis="scenario", yaxis="ms")
    logger.report_text(result.markdown())
