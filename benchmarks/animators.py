"""Trivial work for the benchmarks, importable by every child process.

Each approach runs the same nothing: the cost measured is that of isolating
a task in a process of its own, not of the task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from supervisor.animator import Animator

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from workers.ops import TaskOps


class Noop(Animator):
    """An animator whose ``execute`` returns at once (operation ``NOOP``)."""

    def execute(self, ops: TaskOps) -> Any:
        """Return ``None`` at once."""
        return None


def report(conn: Connection) -> None:
    """Send one message up the pipe and end: a bare process's whole task."""
    conn.send_bytes(b"done")
    conn.close()


def noop() -> None:
    """Return at once: a ProcessPoolExecutor job."""
