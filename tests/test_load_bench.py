"""The load benchmark stays runnable: both variants answer every request of both rounds on the real router."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
def test_load_benchmark_runs_both_variants(tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.load_bench import main

    runs = main(["--clients", "4", "--requests", "6", "--rounds", "2", "--max-tokens", "2",
                 "--models-dir", str(tiny_models["tiny-llama"].parent)])
    assert [r.name for r in runs] == ["fairness window (default)", "strict arrival order"]
    for r in runs:
        assert len(r.waits) == 12 and not r.errors and r.swap_ins >= 1
    out = capsys.readouterr().out
    assert "| strict arrival order | 12/12 |" in out and "swaps / strict" in out and "2 rounds per variant" in out
