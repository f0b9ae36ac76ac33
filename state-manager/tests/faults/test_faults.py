"""The fault-injection suite (``faults_suite.py``) on both backends.

Small by default (a few runs, each fault once); ``EXOSPHERE_FAULTS_SIZE=full`` runs the
full size: 20 runs of a fan-out of 100 + join, each fault twice. The table it prints
shows with ``-s`` (or when the test fails).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from faults_suite import run_suite, size_from_env


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_faults_lose_nothing_and_repeat_only_killed_work(
    backend: str, tmp_path: Path
) -> None:
    report = await run_suite(backend, size_from_env(), tmp_path)
    print(f"\n{report.table}")
    failures = report.failures()
    assert not failures, "\n".join([*failures, f"logs and journals: {report.workdir}"])
