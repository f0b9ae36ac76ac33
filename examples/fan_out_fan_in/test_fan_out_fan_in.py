"""The fan-out/fan-in example runs as its README says, with the output it shows."""

from __future__ import annotations

from collections.abc import Callable

# The ``run_example`` fixture of examples/conftest.py.
RunExample = Callable[..., str]


def test_fan_out_fan_in(run_example: RunExample) -> None:
    output = run_example(
        "fan_out_fan_in", "fan-out-fan-in", "--pages", "25", "--title", "Annual report"
    )
    lines = output.splitlines()
    assert lines[0].endswith(": SUCCESS")
    assert lines[1:] == [
        "  plan        1 succeeded, 0 retried",
        "  split      25 succeeded, 0 retried",
        "  render     25 succeeded, 1 retried",
        "  publish     1 succeeded, 0 retried",
        "published 'Annual report': 25 pages",
    ]
