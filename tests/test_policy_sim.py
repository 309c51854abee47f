"""The policy benchmark (benchmarks/policy_sim.py) runs: every simulated request is answered,
and its table compares each policy with LRU from the same run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from clearml_umem.policy import LRUPolicy

SIM = Path(__file__).resolve().parents[1] / "benchmarks" / "policy_sim.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("policy_sim", SIM)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_simulation_answers_every_request_and_swaps() -> None:
    sim = load()
    workload = sim.Workload(seed=0, requests=120)
    outcome = sim.simulate(workload, LRUPolicy(), device_gb=40, host_gb=48)
    assert len(outcome.waits) == 120 and min(outcome.waits) >= 0
    assert sum(outcome.swap_ins.values()) >= len(sim.MODELS_GB) // 2
    assert outcome.gb_in > 0 and outcome.p(0.5) <= outcome.p(0.95) <= outcome.p(0.99)


def test_table_has_a_row_per_policy_with_lru_as_the_baseline() -> None:
    sim = load()
    table = sim.compare(seeds=[0], requests=80, device_gb=40, host_gb=256)
    assert [row[0] for row in table[1:]] == list(sim.POLICY_FACTORIES)
    lru = table[1]
    assert lru[-2:] == ["1.00", "1.00"]
    assert sim.markdown(table).count("\n") == len(table)
