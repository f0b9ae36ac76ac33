from __future__ import annotations

import json

import pytest
from state_manager.api.middleware import contains_nul


@pytest.mark.parametrize(
    ("text", "has_nul"),
    [
        ("plain", False),
        ("a\x00b", True),
        ("\\u0000", False),  # a backslash followed by the letters u0000
        ("\\\x00", True),  # a backslash, then a real NUL
        ("\\\\u0000", False),
        ("\x00\\", True),
    ],
)
def test_contains_nul_tells_escapes_from_text(text: str, has_nul: bool) -> None:
    body = json.dumps({"error": text}).encode("utf-8")
    assert contains_nul(body) is has_nul


def test_raw_nul_byte_is_found() -> None:
    assert contains_nul(b'{"a": "x\x00"}')
