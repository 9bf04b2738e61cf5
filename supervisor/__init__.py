"""housekeeping's supervisor: in-memory tasks, each run in a child process of its own.

Embed it with ``from supervisor import Manager``; see the README. Tasks run on
this machine by default, or on a Dask cluster with
``Manager(backend=supervisor.dask_backend.DaskBackend(address))`` (the
``housekeeping-supervisor[dask]`` extra; only that module imports ``distributed``).
"""

from __future__ import annotations

from supervisor.animator import Animator
from supervisor.backend import Backend
from supervisor.errors import (
    BackendUnavailable,
    HousekeepingError,
    InvalidAnimator,
    InvalidArguments,
    ManagerTerminated,
    QueueFull,
    TaskNotFound,
    UnsupportedOperation,
)
from supervisor.local import LocalBackend
from supervisor.manager import Manager
from supervisor.sandbox import Sandbox
from supervisor.states import TaskState, is_terminal

__all__ = [
    "Animator",
    "Backend",
    "BackendUnavailable",
    "HousekeepingError",
    "InvalidAnimator",
    "InvalidArguments",
    "LocalBackend",
    "Manager",
    "ManagerTerminated",
    "QueueFull",
    "Sandbox",
    "TaskNotFound",
    "TaskState",
    "UnsupportedOperation",
    "is_terminal",
]

#: Marks this package as housekeeping's (supervisord ships a package of the same name).
HOUSEKEEPING = True
