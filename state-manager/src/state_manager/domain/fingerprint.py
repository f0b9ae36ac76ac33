"""Canonical content hash used to deduplicate concurrently created uniting states."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def canonical_json(payload: Mapping[str, Any]) -> str:
    """JSON with keys sorted at every level, no whitespace, non-ASCII escaped."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint(payload: Mapping[str, Any]) -> str:
    """Lowercase hex SHA-256 of :func:`canonical_json` encoded as UTF-8."""
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()
