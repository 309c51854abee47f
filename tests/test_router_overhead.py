"""benchmarks/router_overhead.py runs end to end with a few pairs and reports sane figures (no timing asserted)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import clearml_umem
from tests.llamacpp_env import LLAMA_SERVER, SKIP_REASON


def test_router_overhead_reports_both_engines_against_their_peers(tiny_models: dict[str, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.router_overhead import main

    engines = ["transformers"] if SKIP_REASON else ["llamacpp", "transformers"]
    out = tmp_path / "report.json"
    argv = ["--pairs", "4", "--warmup", "1", "--engines", ",".join(engines), "--json", str(out),
            "--models-dir", str(tiny_models["tiny-llama"].parent)]
    rows = ["transformers"]
    if LLAMA_SERVER and not SKIP_REASON:
        # the baseline is this checkout too: the rotation over two routers is what is tested
        argv += ["--llama-server", str(LLAMA_SERVER), "--baseline", str(Path(clearml_umem.__file__).parents[1])]
        rows = ["llamacpp", "llamacpp (baseline)", "transformers"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert [r["engine"] for r in report["results"]] == rows
    for row in report["results"]:
        assert row["pairs"] == 4
        for side in ("router", "peer"):
            median, p90 = row[f"{side}_median_ms"], row[f"{side}_p90_ms"]
            assert 0 < median <= p90 < 60_000, (row["engine"], side, median, p90)
        assert math.isfinite(row["added_median_ms"]) and row["added_median_ms"] <= row["added_p90_ms"]
        assert row["router_over_peer"] == pytest.approx(row["router_median_ms"] / row["peer_median_ms"])
    table = capsys.readouterr().out
    assert "| engine | peer | router TTFT median / p90 |" in table
    assert ("| llamacpp (baseline) | llama-server on its socket |" in table) == ("llamacpp" in engines)
    assert "| transformers | the engine in-process |" in table
