"""How long an unused model stays where it is before it moves down a tier: Ollama's `keep_alive`,
llama-swap's `ttl`.

One parser for the three places it is set (the `--keep-alive` flag, a manifest entry's
`keep_alive`, a request's `keep_alive` field), with Ollama's conventions: a number of
seconds or a duration (`30s`, `5m`, `1h30m`), `0` to move down as soon as the model is
unused, `never` or a negative number to keep it. "Never" is `math.inf`, so the scheduler
compares times without a special case; None always means "not given here".
"""

from __future__ import annotations

import math
import re

NEVER = math.inf
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_EXAMPLES = "never, seconds (300), or a duration (30s, 5m, 1h30m)"


def parse_keep_alive(value: object) -> float:
    """Seconds, `NEVER` for never; raises ValueError naming the accepted forms."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"expected {_EXAMPLES}, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        if text in ("never", "forever", "inf", "off"):
            return NEVER
        try:
            seconds = float(text)
        except ValueError:
            seconds = _duration(text)
    if math.isnan(seconds):
        raise ValueError(f"expected {_EXAMPLES}, got {value!r}")
    return NEVER if seconds < 0 or math.isinf(seconds) else seconds


def _duration(text: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("-")
    parts = _DURATION.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise ValueError(f"expected {_EXAMPLES}, got {text!r}")
    return sign * sum(float(n) * _UNITS[u] for n, u in parts)


def describe_keep_alive(seconds: float) -> str:
    """`never`, `0s`, `90s`, `5m`, `1h30m`: how the banner and `ps` show a keep-alive."""
    if math.isinf(seconds):
        return "never"
    whole = round(seconds)
    if whole < 120:
        return f"{seconds:g}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{n}{u}" for n, u in ((hours, "h"), (minutes, "m"), (secs, "s")) if n)
