"""Which eviction policy serves a many-models workload better: the real scheduler, simulated.

The scheduler is pure logic on an injected clock, so a day of traffic runs in seconds: the
same scheduler the router uses, with fake engines whose moves take the time a real swap
would (bytes over PCIe from RAM, a reload from disk, an engine start from cold), driven by
requests whose model popularity follows a Zipf law that shifts every few hundred requests.
Each policy sees the same requests; the table gives the wait for the model (arrival to
dispatch, the part of time to first token that the policy controls) and the swaps, and
each policy's numbers as a ratio to LRU's from the same run.

    python benchmarks/policy_sim.py [--requests 3000] [--seeds 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.sched_harness import GB, Harness, footprints  # noqa: E402

from clearml_umem.commands import Move  # noqa: E402
from clearml_umem.policy import CostAwarePolicy, LRUPolicy, Policy  # noqa: E402
from clearml_umem.tiers import Tier  # noqa: E402

MODELS_GB = {"qwen-0.5b": 1.0, "llama-1b": 2.5, "gemma-2b": 5.0, "qwen-3b": 6.2, "phi-3.8b": 7.6,
             "mistral-7b": 14.5, "llama-8b": 16.1, "qwen-14b": 29.5}
"""bf16 weights of common open models, in GB."""

PCIE_GBPS = 25.0
DISK_GBPS = 3.0
ENGINE_START_S = 8.0


def move_seconds(sizes: dict[str, float]) -> Callable[[Move], float]:
    def seconds(move: Move) -> float:
        gb = sizes[move.model]
        if move.dst is Tier.GPU:
            if move.src is Tier.RAM:
                return 0.05 + gb / PCIE_GBPS
            if move.src is Tier.DISK:
                return 0.5 + gb / DISK_GBPS
            return ENGINE_START_S + gb / DISK_GBPS
        if move.dst is Tier.RAM:
            return 0.05 + gb / PCIE_GBPS if move.src is Tier.GPU else 0.5 + gb / DISK_GBPS
        return 0.1
    return seconds


@dataclass
class Workload:
    seed: int
    requests: int = 3000
    rate_per_s: float = 2.0
    zipf_s: float = 1.1
    phase_every: int = 500
    arrivals: list[tuple[float, str, float]] = field(default_factory=list)
    """(time, model, service seconds)"""

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        names = list(MODELS_GB)
        weights = [1 / (rank + 1) ** self.zipf_s for rank in range(len(names))]
        order = names[:]
        t = 0.0
        for i in range(self.requests):
            if i % self.phase_every == 0:
                rng.shuffle(order)
            t += rng.expovariate(self.rate_per_s)
            model = rng.choices(order, weights)[0]
            self.arrivals.append((t, model, 0.3 + rng.expovariate(1.0)))


@dataclass
class Outcome:
    policy: str
    waits: list[float]
    swap_ins: Counter[str]
    gb_in: float

    def p(self, q: float) -> float:
        ordered = sorted(self.waits)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def simulate(workload: Workload, policy: Policy, device_gb: float, host_gb: float, backfill: bool = True,
             fairness: bool = True) -> Outcome:
    sizes = dict(MODELS_GB)
    fps = {name: footprints(int(gb * 1.1 * GB)) for name, gb in sizes.items()}
    service = {f"r{i}": s for i, (_, _, s) in enumerate(workload.arrivals)}
    h = Harness(int(device_gb * GB), int(host_gb * GB), fps, policy=policy, move_seconds=move_seconds(sizes),
                service_seconds=lambda model, rid: service[rid], backfill=backfill, fairness=fairness)
    arrived: dict[str, float] = {}
    for i, (t, model, _) in enumerate(workload.arrivals):
        rid = f"r{i}"
        arrived[rid] = t
        h.at(t, lambda model=model, rid=rid: h.request(model, rid))
    h.run()
    unanswered = h.unanswered()
    if unanswered or h.rejected:
        raise RuntimeError(f"{policy.name}: {len(unanswered)} unanswered, {len(h.rejected)} rejected")
    waits = [h.dispatch_time[rid] - arrived[rid] for rid in arrived]
    swap_ins = Counter(m.src.value for m in h.loads())
    gb_in = sum(sizes[m.model] for m in h.loads())
    return Outcome(policy.name, waits, swap_ins, gb_in)


POLICY_FACTORIES: dict[str, tuple[Callable[[], Policy], bool, bool]] = {
    "lru": (LRUPolicy, True, True),
    "cost (half-life 60 s)": (lambda: CostAwarePolicy(60.0), True, True),
    "cost (half-life 300 s)": (lambda: CostAwarePolicy(300.0), True, True),
    "lru, no fairness window": (LRUPolicy, True, False),
    "lru, strict arrival order (no backfill, no window)": (LRUPolicy, False, False),
}
"""name -> (policy, backfill, fairness window): the default first, the baseline every ratio is taken against."""


def compare(seeds: Sequence[int], requests: int, device_gb: float, host_gb: float) -> list[list[str]]:
    rows: dict[str, list[Outcome]] = {name: [] for name in POLICY_FACTORIES}
    for seed in seeds:
        workload = Workload(seed, requests)
        for name, (factory, backfill, fairness) in POLICY_FACTORIES.items():
            outcome = simulate(workload, factory(), device_gb, host_gb, backfill, fairness)
            outcome.policy = name
            rows[name].append(outcome)
    lru_mean = statistics.mean(w for o in rows["lru"] for w in o.waits)
    lru_p95 = statistics.mean(o.p(0.95) for o in rows["lru"])
    table = [["policy", "mean wait s", "p50 s", "p95 s", "p99 s", "swap-ins (ram/disk/cold)", "GB in",
              "mean / lru", "p95 / lru"]]
    for name, outcomes in rows.items():
        mean = statistics.mean(w for o in outcomes for w in o.waits)
        p95 = statistics.mean(o.p(0.95) for o in outcomes)
        ins: Counter[str] = sum((o.swap_ins for o in outcomes), Counter())
        n = len(outcomes)
        table.append([name, f"{mean:.3f}", f"{statistics.mean(o.p(0.5) for o in outcomes):.3f}", f"{p95:.3f}",
                      f"{statistics.mean(o.p(0.99) for o in outcomes):.3f}",
                      f"{ins['ram'] / n:.0f}/{ins['disk'] / n:.0f}/{ins['cold'] / n:.0f}",
                      f"{statistics.mean(o.gb_in for o in outcomes):.0f}", f"{mean / lru_mean:.2f}",
                      f"{p95 / lru_p95:.2f}"])
    return table


def markdown(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    total = sum(MODELS_GB.values())
    print(f"{len(MODELS_GB)} models, {total:.0f} GB of weights; {args.requests} requests x {args.seeds} seeds; "
          f"PCIe {PCIE_GBPS} GB/s, disk {DISK_GBPS} GB/s, engine start {ENGINE_START_S} s\n")
    for device_gb, host_gb, label in ((40, 256, "40 GB GPU, every model fits in RAM"),
                                      (40, 48, "40 GB GPU, 48 GB RAM budget: some models go to disk")):
        print(f"### {label}\n")
        print(markdown(compare(range(args.seeds), args.requests, device_gb, host_gb)) + "\n")


if __name__ == "__main__":
    main()
