"""The pure parts of ``compare.py``: the exactly-once check, completion, hops, the table.

``test_smoke.py`` runs our side at a tiny size (about a minute, so not part of the
default test run).
"""

from __future__ import annotations

import math

import pytest
from compare import main_table
from measure import Record, WorkloadFailed, check_exactly_once, percentile
from workloads import PLANS, Progress, chain_hops, chain_keys, fan_keys


def rec(kind: str, key: str, start: float = 0.0, end: float = 0.0) -> Record:
    return Record(kind, key, start, end)


# A fan-out of two children, each unit once: what ``fan_keys("t", 2)`` expects.
ONCE = [rec("fan", "t"), rec("child", "t:0"), rec("child", "t:1"), rec("join", "t")]


def test_exactly_once_passes_when_each_unit_ran_once() -> None:
    markers = [rec("reported", "4"), rec("done", "-")]  # not executions
    check_exactly_once([*ONCE, *markers], fan_keys("t", 2))


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([r for r in ONCE if r.key != "t:1"], "1 child never ran"),
        ([*ONCE, rec("child", "t:1")], "ran more than once"),
        ([*ONCE, rec("child", "t:7")], "1 unexpected child ran"),
        ([*ONCE, rec("step", "x:1")], "unexpected kinds: ['step']"),
    ],
)
def test_exactly_once_names_what_went_wrong(records: list[Record], message: str) -> None:
    with pytest.raises(WorkloadFailed) as failed:
        check_exactly_once(records, fan_keys("t", 2))
    assert message in str(failed.value)


def test_progress_ends_at_the_marker_that_completes_the_work() -> None:
    ours = Progress(chain_keys(["a"], steps=2), reported_target=5)
    assert not ours.feed([rec("step", "a:1", 1, 2), rec("reported", "4", 2.5, 2.5)])
    assert not ours.feed([rec("step", "a:2", 3, 4)])
    assert ours.feed([rec("reported", "5", 4.5, 4.5), rec("reported", "6", 9, 9)])
    assert ours.end == 4.5

    celery = Progress(chain_keys(["a"], steps=2), done_target=2)
    assert not celery.feed([rec("step", "a:1", 1, 2), rec("done", "-", 2.1, 2.1)])
    assert not celery.feed([rec("done", "-", 4.2, 4.2)])  # the markers alone are not enough
    assert celery.feed([rec("step", "a:2", 3, 4)])
    assert celery.end == 4.2


def test_chain_hops_are_measured_between_consecutive_steps_of_one_run() -> None:
    records = [
        rec("step", "a:2", 10.0, 10.5),
        rec("step", "a:1", 9.0, 9.25),
        rec("step", "b:1", 0.0, 1.0),
        rec("step", "b:3", 5.0, 5.0),  # b:2 missing: no hop across the gap
    ]
    assert chain_hops(records) == [0.75]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.99) == 99
    assert percentile([3.0], 0.99) == 3.0
    assert math.isnan(percentile([], 0.5))


def test_table_gives_ours_over_celery_and_na_where_celery_has_no_figure() -> None:
    plan = PLANS["tiny"]
    results = {
        "sqlite": {"w1": [{"steps_per_s": 100.0}, {"steps_per_s": 300.0}, {"steps_per_s": 200.0}]},
        "celery": {"w1": [{"steps_per_s": 400.0}]},
    }
    results["sqlite"]["backlog"] = [{"claim_20_ms": 2.0}]
    table = main_table(plan, results, ["sqlite"])
    lines = table.splitlines()
    assert lines[0] == "| figure | better | ours, SQLite | Celery + Redis | SQLite / Celery |"
    assert "| W1 3 chains of 20 steps: steps/s | higher | 200.0 | 400.0 | 0.50x |" in lines
    assert "| claim, backlog 20: ms | lower | 2.00 | n/a | n/a |" in lines
