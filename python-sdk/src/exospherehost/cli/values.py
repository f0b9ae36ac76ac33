"""Parsing of command-line values: ``key=value`` pairs and durations."""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["parse_duration", "parse_pairs"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_pairs(items: Iterable[str], what: str) -> dict[str, str]:
    """``["a=1", "b=x=y"]`` as ``{"a": "1", "b": "x=y"}``; ``ValueError`` naming ``what``
    for an item without ``=``, an empty key or a key given twice."""
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{what} {item!r} is not KEY=VALUE")
        if key in result:
            raise ValueError(f"{what} key {key!r} is given twice")
        result[key] = value
    return result


def parse_duration(text: str) -> float:
    """Seconds in ``"1500ms"``, ``"30s"``, ``"5m"``, ``"2h"`` or ``"45"`` (seconds)."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration (examples: 500ms, 30s, 5m, 2h)")
    number, unit = match.groups()
    return float(number) * _UNIT_SECONDS[unit or "s"]
