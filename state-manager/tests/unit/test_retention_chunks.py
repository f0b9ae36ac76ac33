"""How retention splits the runs it deletes into transactions."""

from __future__ import annotations

from state_manager.services.runs import (
    SQLITE_RETENTION_RUNS,
    SQLITE_RETENTION_STATES,
    _chunks,
)


def test_postgresql_deletes_a_batch_in_one_transaction() -> None:
    runs = {f"r{i}": 50 for i in range(500)}
    assert _chunks(runs, small=False) == [list(runs)]
    assert _chunks({}, small=False) == []


def test_sqlite_bounds_runs_and_states_per_transaction() -> None:
    many_small = {f"r{i:03}": 1 for i in range(250)}
    chunks = _chunks(many_small, small=True)
    assert [len(c) for c in chunks] == [SQLITE_RETENTION_RUNS, SQLITE_RETENTION_RUNS, 50]
    assert [r for c in chunks for r in c] == list(many_small)

    heavy = {"a": SQLITE_RETENTION_STATES // 2, "b": SQLITE_RETENTION_STATES // 2, "c": 1}
    assert _chunks(heavy, small=True) == [["a", "b"], ["c"]]
    # A run larger than the bound still goes, alone.
    huge = {"x": 10, "big": SQLITE_RETENTION_STATES * 5, "y": 10}
    assert _chunks(huge, small=True) == [["x"], ["big"], ["y"]]
