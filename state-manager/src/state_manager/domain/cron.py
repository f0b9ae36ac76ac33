"""Five-field cron expressions, evaluated in UTC."""

from __future__ import annotations

from datetime import UTC, datetime

from croniter import CroniterBadDateError, CroniterError, croniter  # type: ignore[import-untyped]

FIELDS = 5
_PROBE_START = datetime(2000, 1, 1, tzinfo=UTC)


def validate_expression(expression: str) -> str:
    """Return the trimmed expression, or raise ``ValueError`` saying what is wrong.

    Exactly five fields (minute hour day-of-month month day-of-week) are accepted, and the
    expression must match at least one date.
    """
    stripped = expression.strip()
    count = len(stripped.split())
    if count != FIELDS:
        raise ValueError(
            f"Cron expression '{stripped}' must have exactly {FIELDS} fields "
            f"(minute hour day-of-month month day-of-week), got {count}"
        )
    try:
        croniter(stripped, _PROBE_START).get_next(datetime)
    except CroniterBadDateError as exc:
        raise ValueError(f"Cron expression '{stripped}' never matches a date") from exc
    except (CroniterError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"Invalid cron expression '{stripped}': {exc}") from exc
    return stripped


def next_fire(expression: str, after: datetime) -> datetime:
    """First occurrence strictly after ``after`` (which must be timezone-aware), in UTC."""
    if after.tzinfo is None or after.utcoffset() is None:
        raise ValueError("next_fire needs a timezone-aware datetime")
    start = after.astimezone(UTC)
    result: datetime = croniter(validate_expression(expression), start).get_next(datetime)
    return result.astimezone(UTC)
