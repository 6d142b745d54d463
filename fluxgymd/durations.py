"""Durations as run.toml accepts them: seconds, or systemd time spans ("5min", "1h 30min")."""
from __future__ import annotations

import re

_UNIT_S: dict[str, float] = {}
for _names, _factor in (
    (("us", "usec", "µs"), 1e-6),
    (("ms", "msec"), 1e-3),
    (("s", "sec", "second", "seconds"), 1.0),
    (("m", "min", "minute", "minutes"), 60.0),
    (("h", "hr", "hour", "hours"), 3600.0),
    (("d", "day", "days"), 86400.0),
    (("w", "week", "weeks"), 604800.0),
):
    for _n in _names:
        _UNIT_S[_n] = _factor

_PART_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zµ]*)\s*")


def parse_duration_s(value: object) -> float:
    """Seconds from an int/float or a systemd span string; ValueError says what was wrong."""
    if isinstance(value, bool):
        raise ValueError("expected seconds or a time span like \"5min\", got a boolean")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"expected a non-negative duration, got {value}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected seconds or a time span like \"5min\", got {type(value).__name__}")
    text = value.strip().lower()
    if not text:
        raise ValueError("expected a time span like \"5min\", got an empty string")
    total = 0.0
    pos = 0
    while pos < len(text):
        m = _PART_RE.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot read time span {value!r} (try \"90s\", \"5min\", \"1h 30min\")")
        number, unit = m.group(1), m.group(2) or "s"
        if unit not in _UNIT_S:
            raise ValueError(f"unknown time unit {unit!r} in {value!r} (use s, min, h, d)")
        total += float(number) * _UNIT_S[unit]
        pos = m.end()
    return total


def format_duration(seconds: float) -> str:
    """Short human span: 41m, 2h05m, 37s."""
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    h, rem = divmod(s, 3600)
    if h < 48:
        return f"{h}h{rem // 60:02d}m"
    return f"{h // 24}d{h % 24:02d}h"
