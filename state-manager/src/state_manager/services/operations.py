"""Operator views: readiness and the metric gauges sampled from the database."""

from __future__ import annotations

import logging

from state_manager.errors import DatabaseNotMigrated
from state_manager.services.context import Context

logger = logging.getLogger(__name__)


async def readiness_problem(ctx: Context) -> str | None:
    """``None`` when the database is reachable and migrated; otherwise what is wrong."""
    try:
        await ctx.db.check_migrated()
    except DatabaseNotMigrated as exc:
        return exc.detail
    except Exception as exc:
        return f"database unreachable: {type(exc).__name__}"
    return None


async def sample_gauges(ctx: Context) -> None:
    """Refresh the gauges sampled at scrape time (states waiting or claimed, claimable
    backlog); finished states are counted by the report counters instead.

    Counters stay scrapeable while the database is away; the sampled gauges are
    dropped (not left stale) and the outage shows as ``exosphere_database_up 0``.
    """
    counts: dict[tuple[str, str, str], int] = {}
    backlog: dict[tuple[str, str], int] = {}
    metrics = ctx.metrics
    try:
        async with ctx.db.read() as tx:
            counts = await tx.count_active_states()
            backlog = await tx.claimable_backlog(ctx.clock())
    except Exception as exc:
        logger.warning("metrics: cannot sample the database: %s", type(exc).__name__)
        metrics.database_up.set(0)
    else:
        metrics.database_up.set(1)
    metrics.states.clear()
    for (namespace, node, status), value in counts.items():
        metrics.states.labels(namespace, node, status).set(value)
    metrics.backlog.clear()
    for (namespace, node), value in backlog.items():
        metrics.backlog.labels(namespace, node).set(value)
