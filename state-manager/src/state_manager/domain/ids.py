"""ObjectId-style identifiers: 24 lowercase hex digits that sort roughly by creation time.

Layout (12 bytes): 4-byte big-endian Unix seconds, 5 random bytes fixed per process,
3-byte counter starting at a random value.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time

_COUNTER_MODULO = 1 << 24
_PATTERN = re.compile(r"[0-9a-fA-F]{24}")

_lock = threading.Lock()
_process_bytes = b""
_counter = 0


def _reset() -> None:
    global _process_bytes, _counter
    _process_bytes = secrets.token_bytes(5)
    _counter = secrets.randbelow(_COUNTER_MODULO)


_reset()
os.register_at_fork(after_in_child=_reset)


def new_object_id() -> str:
    """A fresh, process-unique id."""
    global _counter
    with _lock:
        _counter = (_counter + 1) % _COUNTER_MODULO
        counter = _counter
    seconds = int(time.time()) & 0xFFFFFFFF
    raw = seconds.to_bytes(4, "big") + _process_bytes + counter.to_bytes(3, "big")
    return raw.hex()


def is_object_id(text: str) -> bool:
    """Whether ``text`` is 24 hex digits (either case, as ObjectId parsers accept)."""
    return _PATTERN.fullmatch(text) is not None
