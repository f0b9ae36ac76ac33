"""Our side of ``compare.py`` at a tiny size, on every backend, so the harness does not rot.

About 20-60 s per backend depending on the machine's load, so it is not in the default
test run (``testpaths``); run it with ``uv run pytest bench``. The Celery side needs its
own environment (synced from PyPI on demand): ``uv run python bench/compare.py --size
tiny`` runs both.
"""

from __future__ import annotations

import pytest
from compare import session
from workloads import PLANS


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres), "mongo"]
)
async def test_our_side_runs_every_workload_exactly_once(backend: str) -> None:
    plan = PLANS["tiny"]
    results, _versions = await session(plan, [backend], None, lambda _line: None)
    figures = results[backend]
    width = plan.fan_widths[0]
    small, large = plan.backlogs
    expected = {
        "idle": {"hop_p50_ms", "hop_p99_ms"},
        "w1": {"steps_per_s", "hop_p50_ms", "cpu_ms", "cpu_server_ms", "cpu_worker_ms"},
        f"w2_{width}": {"children_per_s", "total_s", "cpu_ms"},
        "w3": {"runs_per_s", "done_p50_ms", "trigger_p50_ms", "cpu_ms", "cpu_client_ms"},
        "backlog": {f"claim_{small}_ms", f"claim_{large}_ms", "claim_ratio", "memory_mb"},
    }
    for workload, names in expected.items():
        (sample,) = figures[workload]
        for name in names:
            assert sample[name] > 0, (workload, name, sample)
    if backend in ("postgres", "mongo"):  # mongo: SecantusDB's process
        assert figures["w1"][0]["cpu_db_ms"] > 0
    else:
        assert "cpu_db_ms" not in figures["w1"][0]
