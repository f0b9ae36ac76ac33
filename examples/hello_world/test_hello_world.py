"""The hello-world example runs as its README says."""

from __future__ import annotations

from collections.abc import Callable

# The ``run_example`` fixture of examples/conftest.py.
RunExample = Callable[..., str]


def test_hello_world(run_example: RunExample) -> None:
    output = run_example("hello_world", "hello-world", "Ada")
    lines = output.splitlines()
    assert lines[0].startswith("run ")
    assert lines[0].endswith(": SUCCESS")
    assert lines[1] == "Hello, Ada!"
