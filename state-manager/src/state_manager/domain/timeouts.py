"""Node timeouts and the lease of a claimed state.

A claimed state is held by its worker until ``lease_expires_at``; past it, the
lease-expiry loop takes the state back as a failed attempt. Without a timeout the
lease is the server's ``STATE_LEASE_SECONDS`` from the claim or the latest
heartbeat. A node's ``timeout`` (or the graph's default ``timeout``) caps it: the
lease never runs past ``claimed_at + timeout``, whatever the heartbeats say.
"""

from __future__ import annotations

# The longest timeout a graph may declare: seven days, in seconds.
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600


def timeout_ms(node_timeout: int | None, graph_timeout: int | None) -> int | None:
    """The timeout (ms) of a new state: its node's, else its graph's default, else none."""
    seconds = node_timeout if node_timeout is not None else graph_timeout
    return None if seconds is None else seconds * 1000


def lease_until(now: int, lease_ms: int, claimed_at: int, timeout: int | None) -> int:
    """When the lease of a state claimed at ``claimed_at`` ends, if granted or renewed at
    ``now``: ``lease_ms`` from now, but never past ``claimed_at + timeout`` (ms)."""
    until = now + lease_ms
    if timeout is not None:
        until = min(until, claimed_at + timeout)
    return until


def timed_out(now: int, claimed_at: int | None, timeout: int | None) -> bool:
    """Whether a state claimed at ``claimed_at`` has run past its timeout at ``now``."""
    return timeout is not None and claimed_at is not None and now >= claimed_at + timeout


def timeout_error(timeout: int) -> str:
    """The error recorded on an attempt that ran out of time."""
    return f"timed out after {timeout / 1000:g} s"
