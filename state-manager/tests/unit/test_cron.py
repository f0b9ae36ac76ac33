from datetime import UTC, datetime, timedelta, timezone

import pytest
from state_manager.domain.cron import next_fire, validate_expression
from state_manager.domain.models import CronValue


def at(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


def test_validate_strips() -> None:
    assert validate_expression("  */5 * * * *\n") == "*/5 * * * *"


@pytest.mark.parametrize(
    "expression",
    ["* * * * *", "0 9 * * MON-FRI", "15 3 1,15 * *", "0 0 29 2 *", "0 0 * JAN 0", "59 23 31 12 7"],
)
def test_valid_expressions(expression: str) -> None:
    assert validate_expression(expression) == expression


@pytest.mark.parametrize(
    "expression", ["", "   ", "* * * *", "* * * * * *", "@hourly", "0 0 1 1 * 2025"]
)
def test_wrong_field_count(expression: str) -> None:
    with pytest.raises(ValueError, match="exactly 5 fields"):
        validate_expression(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "61 * * * *",
        "* 24 * * *",
        "* * 32 * *",
        "* * * 13 *",
        "*/0 * * * *",
        "a b c d e",
        "1-x * * * *",
    ],
)
def test_invalid_expressions(expression: str) -> None:
    with pytest.raises(ValueError, match="Invalid cron expression") as info:
        validate_expression(expression)
    assert expression in str(info.value)


@pytest.mark.parametrize("expression", ["0 0 30 2 *", "0 0 31 4 *"])
def test_expression_that_never_fires(expression: str) -> None:
    with pytest.raises(ValueError, match="never matches"):
        validate_expression(expression)


def test_cron_value_model_uses_validation() -> None:
    assert CronValue(expression=" 0 * * * * ").expression == "0 * * * *"
    with pytest.raises(ValueError):
        CronValue(expression="0 * * *")


def test_next_fire_is_strictly_after() -> None:
    assert next_fire("0 * * * *", at(2025, 1, 1, 10, 0)) == at(2025, 1, 1, 11, 0)
    assert next_fire("* * * * *", at(2025, 1, 1, 10, 0, 0)) == at(2025, 1, 1, 10, 1)


def test_next_fire_with_seconds() -> None:
    start = at(2025, 1, 1, 10, 59, 59, 999999)
    assert next_fire("* * * * *", start) == at(2025, 1, 1, 11, 0)
    assert next_fire("30 10 * * *", at(2025, 1, 1, 10, 29, 30)) == at(2025, 1, 1, 10, 30)


def test_next_fire_crosses_hour() -> None:
    assert next_fire("*/15 * * * *", at(2025, 3, 4, 8, 50)) == at(2025, 3, 4, 9, 0)


def test_next_fire_crosses_day() -> None:
    assert next_fire("30 2 * * *", at(2025, 3, 4, 23, 0)) == at(2025, 3, 5, 2, 30)


def test_next_fire_crosses_month_and_year() -> None:
    assert next_fire("0 0 1 * *", at(2025, 1, 31, 12, 0)) == at(2025, 2, 1)
    assert next_fire("0 12 31 * *", at(2025, 4, 1)) == at(2025, 5, 31, 12, 0)
    assert next_fire("0 0 1 1 *", at(2025, 12, 31, 23, 59)) == at(2026, 1, 1)


def test_next_fire_leap_day() -> None:
    assert next_fire("0 0 29 2 *", at(2025, 1, 1)) == at(2028, 2, 29)


def test_next_fire_day_of_week() -> None:
    # 2025-01-03 is a Friday.
    assert next_fire("0 9 * * MON-FRI", at(2025, 1, 3, 9, 0)) == at(2025, 1, 6, 9, 0)


def test_next_fire_converts_other_offsets_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    result = next_fire("0 * * * *", datetime(2025, 6, 1, 12, 30, tzinfo=plus_two))
    assert result == at(2025, 6, 1, 11, 0)
    assert result.utcoffset() == timedelta(0)


def test_next_fire_requires_aware_datetime() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        next_fire("* * * * *", datetime(2025, 1, 1))


def test_next_fire_rejects_invalid_expression() -> None:
    with pytest.raises(ValueError):
        next_fire("99 * * * *", at(2025, 1, 1))
