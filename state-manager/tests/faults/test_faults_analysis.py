"""The fault suite's judge: it passes a clean run and catches each way of breaking the promise."""

from __future__ import annotations

from dataclasses import replace

from faults_analysis import Execution, Fault, Outcome, StateFact, analyse, render

RUN_ID, LABEL, WIDTH = "run-1", "r00", 2
T0 = 1_000.0  # seconds


def state(state_id: str, identifier: str, at: float, item: str = "", **fields: object) -> StateFact:
    outputs: dict[str, str] = {}
    if identifier == "work":
        outputs = {"result": f"{LABEL}:{item}:done"}
    elif identifier == "join":
        outputs = {"summary": f"{LABEL}: {WIDTH} items joined"}
    values: dict[str, object] = {
        "id": state_id,
        "run_id": RUN_ID,
        "identifier": identifier,
        "status": "SUCCESS",
        "inputs": {"item": item} if item else {},
        "outputs": outputs,
        "error": None,
        "group_id": state_id,
        "retry_count": 0,
        "created_at": int(at * 1000),
        "updated_at": int((at + 0.5) * 1000),
    }
    values.update(fields)
    return StateFact(**values)  # type: ignore[arg-type]


def clean_run() -> tuple[list[StateFact], list[Execution]]:
    states = [
        state("fan", "fan", T0),
        state("sib", "fan", T0 + 0.5, group_id="fan"),
        state("w0", "work", T0 + 1, "0"),
        state("w1", "work", T0 + 1, "1"),
        state("join", "join", T0 + 3),
    ]
    executions = [
        Execution("fan", LABEL, "", 11, T0 + 0.1, T0 + 0.2),
        Execution("work", LABEL, "0", 11, T0 + 1.1, T0 + 1.4),
        Execution("work", LABEL, "1", 12, T0 + 1.1, T0 + 1.4),
        Execution("join", LABEL, "", 12, T0 + 3.1, T0 + 3.2),
    ]
    return states, executions


def outcome_of(
    states: list[StateFact],
    executions: list[Execution],
    kills: dict[int, float] | None = None,
    faults: list[Fault] | None = None,
    status: str = "SUCCESS",
) -> Outcome:
    return analyse(
        labels={RUN_ID: LABEL},
        width=WIDTH,
        states=states,
        executions=executions,
        kills=kills or {},
        faults=faults or [],
        run_status={RUN_ID: status},
    )


def judge(
    states: list[StateFact],
    executions: list[Execution],
    kills: dict[int, float] | None = None,
    faults: list[Fault] | None = None,
    status: str = "SUCCESS",
) -> list[str]:
    return outcome_of(states, executions, kills, faults, status).failures()


def test_a_clean_run_passes() -> None:
    assert judge(*clean_run()) == []


def test_a_run_that_did_not_succeed_fails() -> None:
    assert judge(*clean_run(), status="FAILED") == ["1 of 1 runs did not succeed"]


def test_a_task_without_a_successful_state_is_lost() -> None:
    states, executions = clean_run()
    states[3] = replace(states[3], status="QUEUED")
    executions = executions[:2] + executions[3:]
    assert judge(states, executions) == ["lost: ('r00', 'work', '1'): w1 QUEUED"]


def test_a_missing_fan_out_sibling_is_found() -> None:
    states, executions = clean_run()
    failures = judge([s for s in states if s.id != "sib"], executions)
    assert failures == ["run r00: 0 fan-out siblings, expected 1"]


def test_wrong_outputs_are_found() -> None:
    states, executions = clean_run()
    states[2] = replace(states[2], outputs={"result": "something else"})
    (failure,) = judge(states, executions)
    assert "outputs {'result': 'something else'}" in failure


Scenario = tuple[list[StateFact], list[Execution], dict[int, float]]


def retried_item(kill_at: float | None) -> Scenario:
    """Item 0 ran in pid 13, then again (a retry after its lease) in pid 11."""
    states, executions = clean_run()
    first = state("w0a", "work", T0 + 1, "0", status="RETRY_CREATED", error="Lease expired: 4 s")
    states[2] = replace(
        states[2], retry_count=1, created_at=int((T0 + 9) * 1000), updated_at=int((T0 + 9.5) * 1000)
    )
    states.append(first)
    executions[1] = Execution("work", LABEL, "0", 11, T0 + 9.1, T0 + 9.3)
    executions.append(Execution("work", LABEL, "0", 13, T0 + 1.1, None))
    kills = {} if kill_at is None else {13: kill_at}
    return states, executions, kills


def test_a_repeat_after_a_kill_is_allowed_and_counted() -> None:
    states, executions, kills = retried_item(kill_at=T0 + 1.2)
    assert judge(states, executions, kills) == []
    outcome = outcome_of(states, executions, kills)
    assert (outcome.repeats_after_kill, outcome.executed_twice) == (1, 1)


def test_a_repeat_without_a_kill_fails() -> None:
    states, executions, kills = retried_item(kill_at=None)
    (failure,) = judge(states, executions, kills)
    assert failure.startswith("executed again without a kill: ('r00', 'work', '0')")


def test_a_kill_before_the_first_execution_does_not_explain_a_repeat() -> None:
    states, executions, kills = retried_item(kill_at=T0 + 1.0)
    (failure,) = judge(states, executions, kills)
    assert failure.startswith("executed again without a kill")


def test_a_failure_other_than_an_expired_lease_is_reported() -> None:
    states, executions, kills = retried_item(kill_at=T0 + 1.2)
    states[-1] = replace(states[-1], error="ValueError: boom")
    (failure,) = judge(states, executions, kills)
    assert "the only failure a fault may cause is an expired lease" in failure


def test_one_state_handed_out_twice_is_found() -> None:
    states, executions = clean_run()
    executions.append(Execution("work", LABEL, "1", 11, T0 + 1.2, T0 + 1.5))
    failures = judge(states, executions)
    assert "one state executed twice: ('r00', 'work', '1'): state w1 executed 2 times" in failures
    assert any(f.startswith("executed again without a kill") for f in failures)


def test_a_success_nobody_executed_is_found() -> None:
    states, executions = clean_run()
    failures = judge(states, [e for e in executions if e.node != "join"])
    assert failures == ["('r00', 'join', ''): state join succeeded without an execution"]


def test_recovery_waits_for_every_task_in_flight_and_for_the_component() -> None:
    states, executions, kills = retried_item(kill_at=T0 + 1.2)
    fault = Fault("worker", "pid 13", at=T0 + 1.2, back_at=T0 + 1.5, watched=frozenset({"w0a"}))
    outcome = outcome_of(states, executions, kills, [fault])
    (result,) = outcome.faults
    assert result.taken_back == 1
    assert result.recovery_s is not None and round(result.recovery_s, 3) == 8.3  # w0 at 9.5
    assert "| 1 | kill -9 worker + restart: pid 13 |" in render("t", outcome, T0)

    quick = replace(fault, watched=frozenset({"w1"}), back_at=T0 + 4.0)
    outcome = outcome_of(states, executions, kills, [quick])
    recovery = outcome.faults[0].recovery_s
    assert recovery is not None and round(recovery, 3) == 2.8  # the component came back last


def test_a_fault_whose_work_never_finished_never_recovered() -> None:
    states, executions = clean_run()
    states[3] = replace(states[3], status="QUEUED")
    fault = Fault("server", "server 1", at=T0, back_at=T0 + 1, watched=frozenset({"w1"}))
    failures = judge(states, executions[:2] + executions[3:], faults=[fault])
    assert "fault 1 (server, server 1) never fully recovered" in failures
