"""Background loops: template validation, cron triggers, lease expiry, record retention.

Each loop calls services (never the database directly) and survives its own
errors. Anything that must happen once across replicas is claimed through the
database by the service it calls, so every replica can run every loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from state_manager.services import graphs, runs, states
from state_manager.services.context import Context

logger = logging.getLogger(__name__)


async def _forever(
    name: str, step: Callable[[], Awaitable[float]], wakeup: asyncio.Event | None = None
) -> None:
    """Run ``step`` repeatedly; it returns how long to sleep before the next round."""
    while True:
        try:
            delay = await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("background loop %s failed; retrying", name)
            delay = 5.0
        if wakeup is None:
            await asyncio.sleep(delay)
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wakeup.wait(), delay)
        wakeup.clear()


def start(ctx: Context) -> list[asyncio.Task[None]]:
    """Start every loop for this process; cancel the returned tasks to stop them."""

    async def validate() -> float:
        # Poked by upserts and registrations; the periodic pass also picks up
        # templates left PENDING by a process that died before validating them.
        await graphs.validate_pending(ctx)
        return 2.0

    async def fire_cron() -> float:
        while await runs.fire_due_trigger(ctx):
            pass
        return 1.0

    async def expire() -> float:
        while await states.expire_leases(ctx) > 0:
            pass
        return ctx.settings.lease_check_ms / 1000

    async def purge() -> float:
        await runs.purge_expired_triggers(ctx)
        return 300.0

    cursor = runs.RetentionCursor()

    async def expire_runs_and_keys() -> float:
        # Bounded batches, each its own transaction; go on at once while there is more.
        more = await runs.purge_expired_trigger_keys(ctx) >= runs.KEY_PURGE_BATCH
        await runs.delete_expired_runs(ctx, cursor)
        more = more or cursor.after is not None
        return 0.05 if more else float(ctx.settings.retention_interval_seconds)

    tasks = [
        asyncio.create_task(_forever("validation", validate, ctx.validation_wakeup)),
        asyncio.create_task(_forever("leases", expire)),
        asyncio.create_task(_forever("retention", purge)),
        asyncio.create_task(_forever("run-retention", expire_runs_and_keys)),
    ]
    tasks += [
        asyncio.create_task(_forever(f"cron-{i}", fire_cron))
        for i in range(ctx.settings.trigger_workers)
    ]
    return tasks


async def stop(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
