"""housekeeping's supervisor: in-memory tasks, each run in a child process of its own.

Embed it with ``from supervisor import Manager``; see the README.
"""

from __future__ import annotations

from supervisor.animator import Animator
from supervisor.errors import (
    HousekeepingError,
    InvalidAnimator,
    InvalidArguments,
    ManagerTerminated,
    QueueFull,
    TaskNotFound,
    UnsupportedOperation,
)
from supervisor.manager import Manager
from supervisor.states import TaskState, is_terminal

__all__ = [
    "Animator",
    "HousekeepingError",
    "InvalidAnimator",
    "InvalidArguments",
    "Manager",
    "ManagerTerminated",
    "QueueFull",
    "TaskNotFound",
    "TaskState",
    "UnsupportedOperation",
    "is_terminal",
]

#: Marks this package as housekeeping's (supervisord ships a package of the same name).
HOUSEKEEPING = True
