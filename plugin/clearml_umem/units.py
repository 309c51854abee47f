"""One way to write sizes, rates and durations, so a log line, the banner, an error and a
benchmark table say "2.17 GB", "43.4 MB", "25.3 GB/s" and "350 ms" the same way.

Decimal units (1 GB = 10^9 bytes), as disks, GPUs' marketing and PCIe rates are quoted;
three significant digits are what a reader compares.
"""

from __future__ import annotations

_SIZE_UNITS = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3))


def _three_digits(value: float) -> str:
    """3 significant digits: 2.17, 43.4, 712 (never "2491.6" beside "2.17")."""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_bytes(n: float | None) -> str:
    """2170000000 -> "2.17 GB", 43_400_000 -> "43.4 MB", 712_000 -> "712 KB", 12 -> "12 B"; None -> "-"."""
    if n is None:
        return "-"
    size = float(n)
    sign = "-" if size < 0 else ""
    size = abs(size)
    for unit, scale in _SIZE_UNITS:
        if size >= scale * 0.9995:
            return f"{sign}{_three_digits(size / scale)} {unit}"
    return f"{sign}{size:.0f} B"


def fmt_rate(bytes_per_s: float | None) -> str:
    """Bytes per second -> "25.3 GB/s" (the unit follows the size: "43.4 MB/s" for a slow one)."""
    if bytes_per_s is None or bytes_per_s != bytes_per_s or bytes_per_s in (float("inf"), float("-inf")):
        return "-"
    return fmt_bytes(bytes_per_s) + "/s"


def fmt_gbps(gbps: float | None) -> str:
    """A rate already in GB/s (as events and metrics carry it) -> the same wording as `fmt_rate`."""
    return "-" if gbps is None else fmt_rate(gbps * 1e9)


def fmt_seconds(seconds: float | None) -> str:
    """0.0123 -> "12.3 ms", 4.56 -> "4.56 s", 95 -> "1 min 35 s", 7300 -> "2 h 1 min"."""
    if seconds is None or seconds != seconds:
        return "-"
    s = float(seconds)
    if s < 0:
        return "-" + fmt_seconds(-s)
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{_three_digits(s * 1e3)} ms"
    if s < 60:
        return f"{_three_digits(s)} s"
    if s < 3600:
        minutes, rest = divmod(round(s), 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, rest = divmod(round(s) // 60, 60)
    return f"{hours} h {rest} min" if rest else f"{hours} h"


def fmt_median_of(n: int) -> str:
    """"median of 1 run", "median of 3 runs"."""
    return f"median of {n} run" + ("" if n == 1 else "s")
