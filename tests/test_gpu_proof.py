"""The GPU proof kit, run on the CPU with small shapes so it cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_proof_runs_end_to_end_through_its_script_and_reports_every_tier(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "UMEM_PROOF_TESTS": "0", "UMEM_PROOF_WHEELS": str(tmp_path),
           "UMEM_PROOF_SITE": str(tmp_path / "site")}
    proc = subprocess.run(["bash", "scripts/gpu-proof.sh", str(out), "--device", "cpu", "--runs", "2",
                           "--work-dir", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["errors"] == []
    assert [m["name"] for m in report["models"]] == ["cpu-llama", "cpu-qwen2"]
    rows = report["rows"]
    assert len(rows) == 1 + 2 * 4
    for line in report["summary"]:
        for key in ("hot_ms", "swap_ms", "reload_ms", "cold_ms", "swap_in_s", "swap_in_gbps", "probe_gbps",
                    "swap_in_over_probe", "swap_out_ms"):
            assert isinstance(line[key], (int, float)) and line[key] > 0, (line["model"], key, line[key])
        assert line["host_copy"] == "kept"
    assert report["device_budget_bytes"] > 0
    md = (out / "report.md").read_text()
    assert md.startswith("# GPU proof: CPU")
    assert "| model | weights | hot | swap from RAM | reload from disk | cold start |" in md
    _check_load_scenario(report["load"], md)
    assert not (tmp_path / "work").exists(), "generated models are removed unless --keep-models"
    check_pipelined_swap_in(report, md, ["cpu-llama", "cpu-qwen2"])


def check_pipelined_swap_in(report: dict, md: str, names: list[str]) -> None:
    """benchmarks/proof_pipeline.py's rows: every figure there, the same answers both ways."""
    rows = report["pipeline"]
    assert [r["model"] for r in rows] == names
    for r in rows:
        assert "error" not in r, r
        for key in ("hot_ttft_ms", "ram_ttft_sequential_ms", "ram_ttft_pipelined_ms", "swap_in_s", "pipelined_copy_s"):
            assert isinstance(r[key], (int, float)) and r[key] > 0, (r["model"], key, r[key])
        assert r["ram_ttft_sequential_ms"] >= r["swap_in_s"] * 1000, "the sequential TTFT includes its swap-in"
        assert isinstance(r["goal_ratio"], float) and isinstance(r["goal_met"], bool)
        assert r["answers_identical"] is True
    assert "## Pipelined swap-in" in md and "(pipelined - swap-in) / hot" in md


def _check_load_scenario(load: dict, md: str) -> None:
    """Four models from one folder, each its own engine: two on the device with room for two, all four
    with room for all; every request answered; figures within their ranges."""
    assert load["errors"] == [] and load["shape"] == "cpu-llama" and load["clients"] == 32
    runs = {(r["budget"], r["mix"]): r for r in load["runs"]}
    assert set(runs) == {(b, m) for b in ("room for two", "all resident") for m in ("skewed", "uniform")}
    for (budget, mix), r in runs.items():
        assert r["answered"] == r["requests"] == load["requests"] > 0 and r["errors"] == [], (budget, mix)
        assert 0 < r["serving_fraction"] <= 1 and 0 < r["device_busy_s"] <= r["wall_s"], (budget, mix)
        assert 0 < r["p50_ttft_ms"] <= r["p99_ttft_ms"], (budget, mix)
        placed = load["resident"][f"{budget}, {mix}"]["models"]
        on_device = [p for p in placed if p["tier"] == "gpu"]
        assert len(on_device) == (4 if budget == "all resident" else 2), placed
        assert all(p["device_bytes"] == load["model_device_bytes"] > 0 for p in on_device), placed
        if budget == "all resident":
            assert r["swaps"] == 0, "every model stays resident"
    skewed = runs[("room for two", "skewed")]
    assert skewed["swaps"] >= 1 and skewed["swaps_per_request"] == round(skewed["swaps"] / skewed["requests"], 4)
    assert [s["mix"] for s in load["summary"]] == ["skewed", "uniform"]
    assert isinstance(load["summary"][0]["target_met"], bool)
    assert "## Many models under load" in md and "| room for two | skewed | " in md


def test_serving_fraction_counts_overlapping_requests_once() -> None:
    from benchmarks.proof_load import serving_fraction

    busy, fraction = serving_fraction([(1.0, 3.0), (2.0, 4.0), (6.0, 7.0), (6.5, 6.8), (9.5, 12.0)], 0.0, 10.0)
    assert busy == pytest.approx(3.0 + 1.0 + 0.5) and fraction == pytest.approx(0.45)
    assert serving_fraction([], 0.0, 10.0) == (0.0, 0.0)
    assert serving_fraction([(0.0, 5.0)], 0.0, 5.0)[1] == pytest.approx(1.0)


def test_copy_on_eviction_is_reported_as_copied(tmp_path: Path) -> None:
    from benchmarks.gpu_proof import main

    assert main(["--out", str(tmp_path / "out"), "--device", "cpu", "--runs", "1", "--shapes", "cpu-qwen2",
                 "--host-copy", "evict", "--work-dir", str(tmp_path / "work"), "--load-requests", "0"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["host_copy"] for s in report["summary"]] == ["copied"]
    assert report["summary"][0]["swap_out_gbps"] > 0, "a copying swap-out has a speed"
    reload = report["reload"]
    assert reload["model"] == "cpu-qwen2" and reload["source"] == "page cache"
    assert reload["bound_gbps"] == min(reload["storage_gbps"], reload["link_gbps"]) > 0
    assert [v["name"] for v in reload["variants"]] == [
        "disk -> gpu, host copy kept", "disk -> ram", "disk -> gpu, no host copy (ring)",
        "sequential reference: read, then upload"]
    for v in reload["variants"]:
        gbps = reload["weight_bytes"] / v["s"] / 1e9
        assert v["s"] > 0 and v["over_bound"] == pytest.approx(gbps / v["bound_gbps"], rel=0.05), v
    assert reload["target_met"] is None, "no verdict for a model under 1 GB"
    assert "## Reload from disk" in (tmp_path / "out" / "report.md").read_text()
    check_pipelined_swap_in(report, (tmp_path / "out" / "report.md").read_text(), ["cpu-qwen2"])
    hot = report["hot_path"]
    assert hot["model"] == "cpu-qwen2" and "error" not in hot, hot
    for path in ("off", "auto"):
        variant = hot["variants"][path]
        assert variant["ttft_ms"] > 0
        assert sorted(variant["by_concurrency"], key=int) == ["1", "8", "32"]
        for n, row in variant["by_concurrency"].items():
            assert 0 < row["tokens"] <= int(n) * hot["tokens"] and row["tokens_per_s"] > 0, (path, n, row)
    measured = sum(row["tokens"] for row in hot["variants"]["auto"]["by_concurrency"].values())
    assert 0 < hot["variants"]["auto"]["batched_steps"] < measured, "the batched path shared no forward"
    assert hot["variants"]["off"]["batched_steps"] == 0
    assert all(r > 0 for r in hot["ratios"]["tokens_per_s_new_over_old"].values())
    assert "bound_ttft_ms" not in hot, "no weight-read bound without a device"
    assert "## Hot path: cpu-qwen2" in (tmp_path / "out" / "report.md").read_text()
    sampled = hot["sampled"]
    assert "error" not in sampled and sampled["temperature"] == 1.0, sampled
    sampled_tokens = sum(row["tokens"] for row in sampled["variants"]["auto"]["by_concurrency"].values())
    assert 0 < sampled["variants"]["auto"]["batched_steps"] < sampled_tokens, "sampled requests shared no forward"
    assert "Sampled requests (temperature 1" in (tmp_path / "out" / "report.md").read_text()


def test_bad_shape_is_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.gpu_proof import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--device", "cpu", "--shapes", "llama-9000"])
    assert "unknown shape(s) llama-9000" in capsys.readouterr().err


def test_real_shapes_have_their_published_sizes() -> None:
    from benchmarks.gpu_proof import SHAPES

    assert SHAPES["llama-3-8b"].parameters == 8_030_261_248
    assert SHAPES["llama-3.2-1b"].parameters == 1_235_814_400
    assert round(SHAPES["qwen2.5-32b"].parameters / 1e9, 1) == 32.8


def test_what_the_proof_imports_is_on_the_gpu_machine_or_in_the_carried_wheels() -> None:
    """The GPU machine has no network: anything the router needs beyond its image must be in the bundle."""
    code = ("import sys, json, importlib.metadata as md; import clearml_umem.server, "
            "clearml_umem.clearml_io.benchmark, benchmarks.gpu_proof; "
            "dists = md.packages_distributions(); "
            "print(json.dumps(sorted({d for m in list(sys.modules) for d in dists.get(m.split('.')[0], [])})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'plugin'}"})
    assert proc.returncode == 0, proc.stderr
    imported = {_norm(d) for d in json.loads(proc.stdout)}
    device = {_norm(line) for line in (ROOT / "benchmarks/device-packages.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    script = (ROOT / "scripts/gpu-wheels.sh").read_text()
    carried = {_norm(n) for n in re.search(r"PACKAGES=\(([^)]*)\)", script).group(1).split()}
    # httpx imports these decoders only when they happen to be installed (here: pulled in by the
    # test extra's tritonclient); without them it imports fine
    optional = {"brotli", "brotlicffi", "zstandard"}
    imported -= {"clearml-unified-memory", *optional}
    assert imported - device - carried == set()
    assert not carried & {"torch", "nvidia-cublas", "triton"}, "no torch or CUDA libraries in the bundle"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()
