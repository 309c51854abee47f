"""Time-to-first-token per tier, and swap speed against a bandwidth probe from the same run.

Shared by the benchmark task (tasks/benchmark.py) and pipeline steps: the code a
pipeline step runs must be importable from the installed package, not from a script.

Before every measured request the model is put in a tier with
`POST /admin/models/{name}/place`, so each number is the cost of exactly one tier.
TTFT is measured at the client (what users see); swaps come from the server's events:
swap-ins from the measured request, swap-outs from the placement to RAM before it.

The bandwidth probe copies, by default, as many bytes as each model's weights, from the
same kind of page-locked buffer the engine swaps from, so "swap / probe" compares like
with like; `probe_bytes` gives one fixed-size probe for the whole run instead.
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
from clearml_umem.events import Event, MoveFinished
from clearml_umem.tiers import Tier
from clearml_umem.units import fmt_bytes, fmt_gbps, fmt_median_of

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
    swap_out_s: list[float] = field(default_factory=list)
    swap_out_gbps: list[float] = field(default_factory=list)
    """Only swap-outs that copied the weights off the device; a kept copy moves nothing."""
    host_copy: list[str] = field(default_factory=list)
    """How each swap-out got its host copy: 'kept' (only device memory freed) or 'copied'."""

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
    model_probe_gbps: dict[str, float] = field(default_factory=dict)
    """A probe per model, of that model's size, when the run measured one; else `probe_gbps` applies."""
    model_bytes: dict[str, int] = field(default_factory=dict)

    def probe_for(self, model: str) -> float:
        return self.model_probe_gbps.get(model, self.probe_gbps)

    def rows(self) -> list[list[Any]]:
        """Header plus one row per model x scenario: what the table, the Markdown and tests show."""
        rows: list[list[Any]] = [["model", "scenario", "TTFT median ms", "TTFT min ms", "TTFT max ms", "n",
                                  "swap-in s", "swap-in GB/s", "swap / probe", "probe GB/s", "swap-out s",
                                  "swap-out GB/s", "host copy"]]
        for r in self.scenarios:
            if r.skipped:
                rows.append([r.model, r.scenario, "n/a", "", "", 0, "", "", r.skipped, "", "", "", ""])
                continue
            spread = r.spread_ms or (0.0, 0.0)
            swap_s = statistics.median(r.swap_in_s) if r.swap_in_s else None
            gbps = statistics.median(r.swap_in_gbps) if r.swap_in_gbps else None
            probe = self.probe_for(r.model)
            out_s = statistics.median(r.swap_out_s) if r.swap_out_s else None
            out_gbps = statistics.median(r.swap_out_gbps) if r.swap_out_gbps else None
            rows.append([r.model, r.scenario, round(r.median_ms or 0.0, 2), round(spread[0], 2), round(spread[1], 2),
                         len(r.ttft_s), "" if swap_s is None else round(swap_s, 4),
                         "" if gbps is None else round(gbps, 3),
                         "" if gbps is None or probe <= 0 else round(gbps / probe, 3),
                         "" if gbps is None else round(probe, 3),
                         "" if out_s is None else round(out_s, 4), "" if out_gbps is None else round(out_gbps, 3),
                         ",".join(sorted(set(r.host_copy)))])
        return rows

    def markdown(self) -> str:
        rows = self.rows()
        lines = ["| " + " | ".join(str(c) for c in rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows[1:]]
        lines.append("")
        if self.model_probe_gbps:
            probes = ", ".join(f"{m} {fmt_gbps(g)} ({fmt_bytes(self.model_bytes.get(m, 0))})"
                               for m, g in self.model_probe_gbps.items())
            lines.append(f"Bandwidth probes ({self.probe_path}), each of the model's size: {probes}; "
                         f"{fmt_median_of(self.runs)} per scenario.")
        else:
            lines.append(f"Host-to-device bandwidth probe ({self.probe_path}): {fmt_gbps(self.probe_gbps)}, "
                         f"{fmt_median_of(self.runs)} per scenario.")
        return "\n".join(lines)


class SwapRecorder:
    """Tier moves seen on the server's event bus, so each measurement gets the move it caused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[MoveFinished] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, MoveFinished):
            with self._lock:
                self.events.append(event)

    def since(self, index: int, model: str, src: Tier, dst: Tier = Tier.GPU) -> list[MoveFinished]:
        with self._lock:
            return [e for e in self.events[index:] if e.model == model and e.src is src and e.dst is dst]

    def mark(self) -> int:
        with self._lock:
            return len(self.events)


def serve_config_for_model(model_id: str, *, manifest: str = "", **settings: Any) -> tuple[ServeConfig, list[str]]:
    """How a pipeline step serves one registry entry by its ID: from the model repository when a
    server is there (what a serve task does), else from the manifest the register step wrote,
    picking the entry with that model ID (offline there is no registry to read). Returns the
    config and the models to measure ([] for all the config serves)."""
    from clearml import Task

    from clearml_umem.catalog import ManifestCatalog

    settings = {k: v for k, v in settings.items() if v is not None}
    if not Task.is_offline():
        return ServeConfig(clearml_ids=[model_id], **settings).validate(), []
    if not manifest:
        raise ConfigError(f"offline there is no registry to serve model {model_id} from, and no manifest was given")
    names = [s.name for s in ManifestCatalog(manifest).snapshot().specs if s.model_id == model_id]
    if not names:
        raise ConfigError(f"no entry of {manifest} has model ID {model_id}")
    return ServeConfig(manifest=manifest, **settings).validate(), names


def run_benchmark(config: ServeConfig, *, models: Sequence[str] = (), runs: int = 3, max_tokens: int = 4,
                  probe_bytes: int | None = 256 * 2**20, logger: Any = None) -> BenchmarkResult:
    """Serve `config` in this process, measure every scenario, report to `logger` when given.

    `probe_bytes=None` probes once per model with as many bytes as its weights.
    """
    from clearml_umem.bandwidth import probe_bandwidth
    from clearml_umem.clearml_io.catalogs import build_catalog
    from clearml_umem.server import UnifiedMemoryServer

    probe = None
    if probe_bytes is not None:
        probe = probe_bandwidth(config.device, probe_bytes)
        log.info("bandwidth probe (%s): %s", probe.path, fmt_gbps(probe.gbps))
    server = UnifiedMemoryServer(config, build_catalog(config.validate()))
    recorder = SwapRecorder()
    server.bus.subscribe(recorder)
    reporter = None
    if logger is not None:
        from clearml_umem.clearml_io.reporter import ClearMLReporter

        reporter = ClearMLReporter(logger, flush_period_s=0.5).attach(server.bus)
    results: list[ScenarioResult] = []
    model_probes: dict[str, float] = {}
    model_bytes: dict[str, int] = {}
    try:
        with server.run_in_thread() as url, open_client(url) as client:
            served = [m["id"] for m in client.get("/v1/models").raise_for_status().json()["data"]]
            selected = [m for m in served if not models or m in models]
            missing = sorted(set(models) - set(served))
            if missing:
                raise ConfigError(f"models not served: {', '.join(missing)}; served: {', '.join(served)}")
            for model in selected:
                if probe_bytes is None:
                    size = _weight_bytes(client, model)
                    probe = probe_bandwidth(config.device, size)
                    model_probes[model], model_bytes[model] = probe.gbps, size
                    log.info("%s: bandwidth probe of %s (%s): %s", model, fmt_bytes(size), probe.path,
                             fmt_gbps(probe.gbps))
                for scenario, tier in SCENARIOS:
                    result = ScenarioResult(model, scenario, tier.value)
                    results.append(result)
                    for _ in range(runs):
                        before_place = recorder.mark()
                        result.skipped = place(client, model, tier)
                        if result.skipped:
                            log.info("%s %s skipped: %s", model, scenario, result.skipped)
                            break
                        for out in recorder.since(before_place, model, Tier.GPU, tier) if tier is Tier.RAM else []:
                            result.swap_out_s.append(out.seconds)
                            if out.bytes_moved > 0 and out.seconds > 0:
                                result.swap_out_gbps.append(out.gbps)
                            if out.host_copy:
                                result.host_copy.append(out.host_copy)
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
    assert probe is not None or not results
    outcome = BenchmarkResult(probe_gbps=probe.gbps if probe else 0.0, probe_path=probe.path if probe else "",
                              runs=runs, scenarios=results, model_probe_gbps=model_probes, model_bytes=model_bytes)
    if logger is not None:
        report(outcome, logger)
    return outcome


def _weight_bytes(client: Any, model: str) -> int:
    """The model's weight bytes as its engine counts them (what a swap moves)."""
    rows = client.get("/admin/models").raise_for_status().json()["data"]
    row = next(r for r in rows if r["name"] == model)
    return int(row["engine_details"].get("param_bytes") or row["size_bytes"])


def report(result: BenchmarkResult, logger: Any) -> None:
    """Scalars per run, the table, a grouped bar chart and headline single values."""
    if result.model_probe_gbps:
        for model, gbps in result.model_probe_gbps.items():
            logger.report_scalar("bandwidth probe (GB/s)", f"{model} ({result.probe_path})", gbps, 0)
    else:
        logger.report_scalar("bandwidth probe (GB/s)", result.probe_path, result.probe_gbps, 0)
        logger.report_single_value("bandwidth probe (GB/s)", result.probe_gbps)
    for r in result.scenarios:
        for i, ttft in enumerate(r.ttft_s):
            logger.report_scalar(f"benchmark TTFT {r.model} (s)", r.scenario, ttft, i)
        for i, gbps in enumerate(r.swap_in_gbps):
            logger.report_scalar("benchmark swap-in (GB/s)", f"{r.model} {r.tier}->gpu", gbps, i)
            if result.probe_for(r.model) > 0:
                logger.report_scalar("benchmark swap / probe", f"{r.model} {r.tier}->gpu",
                                     gbps / result.probe_for(r.model), i)
        for i, seconds in enumerate(r.swap_out_s):
            logger.report_scalar("benchmark swap-out (s)", f"{r.model} gpu->{r.tier}", seconds, i)
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
