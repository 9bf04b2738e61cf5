"""The one exception hierarchy of the supervisor library."""

from __future__ import annotations


class HousekeepingError(Exception):
    """Base of every error the supervisor raises on purpose."""


class UnsupportedOperation(HousekeepingError):
    """Raised when no animator is registered for the requested operation."""


class InvalidArguments(HousekeepingError, ValueError):
    """Raised when the creation arguments of a task are malformed."""


class InvalidAnimator(HousekeepingError):
    """Raised by an animator that is handed an operation it does not handle."""


class TaskNotFound(HousekeepingError, LookupError):
    """Raised when a task id is unknown, purged, or (for cancel) already finished."""


class QueueFull(HousekeepingError):
    """Raised when accepting a task would exceed the manager's ``max_queued``."""


class ManagerTerminated(HousekeepingError):
    """Raised when a terminated (or terminating) manager is asked for new work."""


class IdempotencyConflict(HousekeepingError):
    """Raised when an idempotency key comes again with another task than its first."""


class JournalError(HousekeepingError):
    """Raised when the journal cannot be opened or read at start (not while it runs:
    a failing disk then is reported, never raised)."""


class BackendUnavailable(HousekeepingError):
    """Raised when the place tasks run cannot take new ones now (say, a lost cluster)."""


def describe_exit(pid: int, exitcode: int | None, hint: str = "") -> str:
    """Name how a process ended, e.g. ``killed by signal SIGSEGV``."""
    import signal

    if exitcode is None:
        what = "ended with an unknown status"
    elif exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        what = f"was killed by {name}"
    else:
        what = f"exited with code {exitcode}"
    text = f"task process {pid} {what} without reporting a result"
    return f"{text} ({hint})" if hint else text
