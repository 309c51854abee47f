"""ClearML offline mode, the embedded default: tasks run with the real SDK and no server,
and what the offline session recorded is read back and checked."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from clearml_umem.catalog import ManifestCatalog
from clearml_umem.clearml_io.metadata import SERVABLE_TAG
from clearml_umem.clearml_io.offline import OfflineSession
from clearml_umem.clearml_io.reporter import TABLE_TTFT, TITLE_CACHE, TITLE_MEMORY, TITLE_THROUGHPUT
from clearml_umem.spec import weights_size
from tests.clearml_env import offline_env, run_python


def test_register_task_offline_records_hyperparameters_model_and_manifest(tmp_path: Path,
                                                                        tiny_models: dict[str, Path]) -> None:
    env = offline_env(tmp_path)
    manifest = tmp_path / "models.yaml"
    source = tiny_models["tiny-llama"]
    proc = run_python(["tasks/register_model.py", "--source", str(source), "--tags", "chat,demo",
                       "--context-length", "1024", "--manifest", str(manifest)], env)
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert result["offline"] and result["created"]
    assert result["model_id"].startswith("offline-")

    session = OfflineSession.find(task_name="register model", cache_dir=env["CLEARML_CACHE_DIR"])
    assert session.project == "clearml-umem"
    args = session.hyperparams["Args"]
    assert args["source"] == str(source)
    assert args["tags"] == "chat,demo"
    assert args["context_length"] == "1024"
    assert args["engine"] == "auto"
    assert args["manifest"] == str(manifest)

    (model,) = session.output_models
    assert model["id"] == result["model_id"]
    assert model["init"]["name"] == "tiny-llama"
    assert model["init"]["tags"] == [SERVABLE_TAG, "chat", "demo"]
    assert model["init"]["framework"] == "PyTorch"
    assert model["weights"]["register_uri"] == source.resolve().as_uri()
    umem = model["init"]["config_dict"]["umem"]
    assert umem["size_bytes"] == str(weights_size(source))
    assert (umem["dtype"], umem["architecture"], umem["context_length"]) == ("bfloat16", "LlamaForCausalLM", "1024")

    zipped = OfflineSession.load(Path(str(session.source) + ".zip"))
    assert zipped.hyperparams == session.hyperparams

    (spec,) = ManifestCatalog(manifest).snapshot().specs
    assert spec.weights == str(source.resolve())
    assert (spec.context_length, spec.model_id, spec.size_bytes) == (1024, result["model_id"], weights_size(source))


REPORTER_SCRIPT = textwrap.dedent("""
    import time
    from clearml import Task
    from clearml_umem.clearml_io.reporter import ClearMLReporter
    from clearml_umem.events import EventBus, FirstToken, MemorySnapshot, RequestArrived, MoveFinished
    from clearml_umem.tiers import Tier

    task = Task.init(project_name="umem-tests", task_name="reporter", auto_connect_frameworks=False,
                     auto_resource_monitoring=False, auto_connect_arg_parser=False)
    bus = EventBus()
    reporter = ClearMLReporter(task.get_logger(), flush_period_s=0.05).attach(bus)
    t = time.monotonic()
    for i, (tier, ttft) in enumerate([(Tier.COLD, 2.0), (Tier.GPU, 0.01), (Tier.GPU, 0.03), (Tier.RAM, 0.2),
                                      (Tier.DISK, 1.0)]):
        bus.emit(RequestArrived("tiny", t, f"r{i}", tier))
        if tier is Tier.RAM:
            bus.emit(MoveFinished("other", t, Tier.GPU, Tier.RAM, 0.5, 1_000_000_000))
            bus.emit(MoveFinished("tiny", t, Tier.RAM, Tier.GPU, 0.25, 1_000_000_000))
        bus.emit(FirstToken("tiny", t, f"r{i}", tier, ttft))
    bus.emit(MemorySnapshot("", t, 2_000_000_000, 4_000_000_000, 1_000_000_000, 8_000_000_000))
    time.sleep(0.3)
    bus.emit(FirstToken("other", t, "r9", Tier.GPU, 0.05))
    reporter.close()
    task.close()
""")


def test_reporter_scalars_land_in_the_offline_session(tmp_path: Path) -> None:
    env = offline_env(tmp_path)
    script = tmp_path / "report.py"
    script.write_text(REPORTER_SCRIPT)
    run_python([str(script)], env)
    session = OfflineSession.find(task_name="reporter", cache_dir=env["CLEARML_CACHE_DIR"])
    scalars = session.scalars()

    # one window held every request of "tiny": per tier, p50 and p95 and the count, at elapsed second 0
    assert {series: points for series, points in scalars["TTFT tiny (s)"].items() if series.endswith("p50")} == {
        "cold p50": [(0, 2.0)], "gpu p50": [(0, 0.01)], "ram p50": [(0, 0.2)], "disk p50": [(0, 1.0)]}
    assert session.values("TTFT tiny (s)", "gpu p95") == [0.03]
    assert session.values("TTFT tiny (requests)", "gpu") == [2]
    assert session.values("TTFT other (s)", "gpu p50") == [0.05]
    assert session.values("TTFT by tier (s)", "gpu p95") == [0.03, 0.05]
    assert session.values("swap-in (s)", "tiny ram->gpu") == [0.25]
    assert session.values("swap-in (GB/s)", "tiny ram->gpu") == [pytest.approx(4.0)]
    assert session.values("swap-out (s)", "other gpu->ram") == [0.5]
    assert session.values("swap-out (GB/s)", "other gpu->ram") == [pytest.approx(2.0)]
    assert session.values(TITLE_CACHE, "hits")[-1] == 2
    assert session.values(TITLE_CACHE, "misses")[-1] == 3
    assert session.values(TITLE_CACHE, "hit rate")[-1] == pytest.approx(0.4)
    assert session.values("requests by tier on arrival", "cold")[-1] == 1
    assert session.values(TITLE_MEMORY, "device used")[-1] == pytest.approx(2.0)
    assert session.values(TITLE_MEMORY, "host budget")[-1] == pytest.approx(8.0)
    assert session.values(TITLE_THROUGHPUT, "requests/s")[0] > 0

    table = session.table(TABLE_TTFT)
    assert table[0][:3] == ["model", "gpu median ms", "gpu n"]
    rows = {row[0]: row for row in table[1:]}
    assert rows["tiny"][1:3] == [20.0, 2]
    assert rows["other"][1:3] == [50.0, 1]

    single = session.single_values()
    assert single["requests"] == 5
    assert single["hit rate"] == pytest.approx(0.4)
    assert single["TTFT median ram (s)"] == pytest.approx(0.2)
    assert single["swap-in median (GB/s)"] == pytest.approx(4.0)


BENCHMARK_REPORT_SCRIPT = textwrap.dedent("""
    from clearml import Task
    from clearml_umem.clearml_io.benchmark import BenchmarkResult, ScenarioResult, report

    task = Task.init(project_name="umem-tests", task_name="benchmark report", auto_connect_frameworks=False,
                     auto_resource_monitoring=False, auto_connect_arg_parser=False)
    result = BenchmarkResult(probe_gbps=10.0, probe_path="host -> host (cpu)", runs=2, scenarios=[
        ScenarioResult("m", "hot", "gpu", [0.01, 0.02]),
        ScenarioResult("m", "from RAM", "ram", [0.1, 0.2], [0.05, 0.07], [5.0, 4.0]),
        ScenarioResult("m", "from disk", "disk", skipped="place disk: HTTP 409"),
        ScenarioResult("m", "cold start", "cold", [1.0, 2.0], [0.9, 1.1], [0.1, 0.1]),
    ])
    report(result, task.get_logger())
    task.close()
""")


def test_benchmark_report_records_table_plot_ratio_and_single_values(tmp_path: Path) -> None:
    env = offline_env(tmp_path)
    script = tmp_path / "bench.py"
    script.write_text(BENCHMARK_REPORT_SCRIPT)
    run_python([str(script)], env)
    session = OfflineSession.find(task_name="benchmark report", cache_dir=env["CLEARML_CACHE_DIR"])
    rows = {row[1]: row for row in session.table("benchmark")[1:]}
    assert rows["hot"][2:6] == [15.0, 10.0, 20.0, 2]
    assert rows["from RAM"][6:10] == [0.06, 4.5, 0.45, 10.0]
    assert rows["from disk"][2] == "n/a" and "409" in rows["from disk"][8]
    assert session.values("benchmark TTFT m (s)", "from RAM") == [0.1, 0.2]
    assert session.values("benchmark swap / probe", "m ram->gpu") == [0.5, 0.4]
    assert session.values("bandwidth probe (GB/s)", "host -> host (cpu)") == [10.0]
    (plot,) = [p for p in session.plots() if p["title"] == "TTFT median by scenario (ms)"]
    assert plot["series"] == "m"
    assert session.single_values()["TTFT median m cold start (ms)"] == pytest.approx(1500.0)
