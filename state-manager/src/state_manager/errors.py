"""The domain's error hierarchy, mapped to HTTP statuses in one place (``api/errors.py``).

::

    StateManagerError
    ├── NotFound            404
    ├── InvalidRequest      400
    ├── Conflict            409
    │   └── RunCancelled    409, code "run_cancelled"
    ├── PayloadTooLarge     413
    ├── DatabaseUnavailable 503 (disk full, connection lost or refused, server restarting)
    └── DatabaseNotMigrated (start-up and readiness only)
"""

from __future__ import annotations


class StateManagerError(Exception):
    """Base class; ``detail`` is safe to show to clients."""

    status_code = 500
    code: str | None = None  # a stable machine-readable name, sent as "code" when set

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(StateManagerError):
    status_code = 404


class InvalidRequest(StateManagerError):
    status_code = 400


class Conflict(StateManagerError):
    status_code = 409


class RunCancelled(Conflict):
    """A report, heartbeat or retry for a state of a cancelled run."""

    code = "run_cancelled"

    def __init__(self, run_id: str) -> None:
        super().__init__(f"Run {run_id} was cancelled; this state will not be continued")
        self.run_id = run_id


class PayloadTooLarge(StateManagerError):
    status_code = 413


class DatabaseUnavailable(StateManagerError):
    """The database cannot serve the request now; the same request may succeed later."""

    status_code = 503


class DatabaseNotMigrated(StateManagerError):
    status_code = 503

    def __init__(self, *, current: int, latest: int) -> None:
        super().__init__(
            f"database schema is at version {current}, this server needs {latest}; "
            "run `state-manager migrate` (or start with --mode=development, which migrates)"
        )
        self.current = current
        self.latest = latest
