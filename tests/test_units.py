"""The one formatter for sizes, rates and durations (issue: "2491.6 MB" beside "2.17 GB")."""

import pytest

from clearml_umem.units import fmt_bytes, fmt_gbps, fmt_median_of, fmt_rate, fmt_seconds


@pytest.mark.parametrize(("n", "text"), [
    (2_170_000_000, "2.17 GB"), (2_491_600_000, "2.49 GB"), (43_400_000, "43.4 MB"), (712_000, "712 KB"),
    (6_010_000_000, "6.01 GB"), (16_060_522_496, "16.1 GB"), (999_999, "1.00 MB"), (12, "12 B"), (0, "0 B"),
    (1.5e12, "1.50 TB"), (None, "-"),
])
def test_sizes_have_three_significant_digits_and_one_unit_system(n, text):
    assert fmt_bytes(n) == text


def test_rates_follow_the_size_wording():
    assert fmt_rate(25.3e9) == "25.3 GB/s"
    assert fmt_rate(43.4e6) == "43.4 MB/s"
    assert fmt_gbps(48.8) == "48.8 GB/s"
    assert fmt_gbps(0.0044) == "4.40 MB/s"  # never "0.00 GB/s"
    assert fmt_rate(float("inf")) == "-"


@pytest.mark.parametrize(("s", "text"), [
    (0.0123, "12.3 ms"), (0.35, "350 ms"), (4.56, "4.56 s"), (25.31, "25.3 s"), (95, "1 min 35 s"),
    (120, "2 min"), (7300, "2 h 1 min"), (0.0000042, "4 µs"),
])
def test_durations(s, text):
    assert fmt_seconds(s) == text


def test_median_of_counts_runs_in_english():
    assert fmt_median_of(1) == "median of 1 run"
    assert fmt_median_of(3) == "median of 3 runs"
