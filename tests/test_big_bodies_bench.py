"""The big-bodies benchmark's statistics (`benchmarks/big_bodies.py`): its interval for a ratio of
quantiles holds the true ratio and says when two samples differ, and phases pool across rounds."""

from __future__ import annotations

import random

from benchmarks.big_bodies import late_ticks, ratio_interval, summary


def test_the_interval_holds_1_for_samples_from_one_distribution_and_not_for_a_slower_one() -> None:
    rng = random.Random(7)
    control = [0.02 + rng.expovariate(1 / 0.005) for _ in range(300)]
    same = [0.02 + rng.expovariate(1 / 0.005) for _ in range(300)]
    slower = [1.5 * t for t in (0.02 + rng.expovariate(1 / 0.005) for _ in range(300))]
    for q in (0.5, 0.99):
        low, high = ratio_interval(same, control, q)
        assert low <= 1.0 <= high, (q, low, high)
        low, high = ratio_interval(slower, control, q)
        assert 1.0 < low < 1.5 < high * 1.1, (q, low, high)
    narrow = ratio_interval(same, control, 0.5)
    wide = ratio_interval(same, control, 0.99)
    assert narrow[1] - narrow[0] < wide[1] - wide[0], "a tail quantile is known less well than the median"


def test_phases_of_one_kind_are_pooled_over_their_rounds() -> None:
    rounds = [{"ttft_s": [0.01 * i for i in range(1, 51)], "health_s": [0.001, 0.004], "big_bodies_answered": 10,
               "measured_s": 2.0, "answered_while_measured": 8,
               "loop_lag_ticks": {"0.005": 190.0, "0.01": 196.0, "0.02": 198.0, "0.05": 200.0, "+Inf": 200.0}}
              for _ in range(3)]
    pooled = summary(rounds)
    assert pooled["samples"] == 150 and len(pooled["ttft_s"]) == 150
    assert pooled["health_max_s"] == 0.004
    assert pooled["big_bodies_answered"] == 30 and pooled["bodies_per_s"] == 4.0
    assert pooled["ttft_p50_s"] == 0.255
    assert pooled["loop_late"] == {"over_5ms_per_s": 5.0, "over_10ms_per_s": 2.0, "over_20ms_per_s": 1.0,
                                   "all_within_ms": 50.0}


def test_a_loop_never_late_is_within_its_first_bound() -> None:
    ticks = {"0.001": 100.0, "0.005": 100.0, "0.01": 100.0, "0.02": 100.0, "+Inf": 100.0}
    assert late_ticks(ticks, 1.0) == {"over_5ms_per_s": 0.0, "over_10ms_per_s": 0.0, "over_20ms_per_s": 0.0,
                                      "all_within_ms": 1.0}
