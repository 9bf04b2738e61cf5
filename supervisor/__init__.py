"""housekeeping's supervisor: in-memory tasks, each run in a child process of its own.

Embed it with ``from supervisor import Manager``; see the README. Tasks run on
this machine by default, or on a Dask cluster with
``Manager(backend=supervisor.backends.dask.DaskBackend(address))`` (the
``housekeeping-supervisor[dask]`` extra; only that subpackage imports
``distributed``).

NOTE: the names are imported when first used (PEP 562), not here: the
starter and every task process import leaf modules of this package
(``supervisor.protocol``, ``supervisor.linux``), and must not pay for the
Manager, psutil and the event loop they never use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from supervisor.animator import Animator
    from supervisor.backend import Backend, Host
    from supervisor.backends.local import LocalBackend
    from supervisor.errors import (
        BackendUnavailable,
        HousekeepingError,
        IdempotencyConflict,
        InvalidAnimator,
        InvalidArguments,
        JournalError,
        ManagerTerminated,
        QueueFull,
        TaskNotFound,
        UnsupportedOperation,
    )
    from supervisor.manager import Manager
    from supervisor.outcome import Ending, Outcome, OutcomeKind, Usage
    from supervisor.sandbox import Sandbox
    from supervisor.states import TaskState, is_terminal

#: public name -> the module that defines it
_WHERE = {
    "Animator": "supervisor.animator",
    "Backend": "supervisor.backend",
    "Host": "supervisor.backend",
    "LocalBackend": "supervisor.backends.local",
    "BackendUnavailable": "supervisor.errors",
    "HousekeepingError": "supervisor.errors",
    "IdempotencyConflict": "supervisor.errors",
    "InvalidAnimator": "supervisor.errors",
    "InvalidArguments": "supervisor.errors",
    "JournalError": "supervisor.errors",
    "ManagerTerminated": "supervisor.errors",
    "QueueFull": "supervisor.errors",
    "TaskNotFound": "supervisor.errors",
    "UnsupportedOperation": "supervisor.errors",
    "Manager": "supervisor.manager",
    "Ending": "supervisor.outcome",
    "Outcome": "supervisor.outcome",
    "OutcomeKind": "supervisor.outcome",
    "Usage": "supervisor.outcome",
    "Sandbox": "supervisor.sandbox",
    "TaskState": "supervisor.states",
    "is_terminal": "supervisor.states",
}

__all__ = [
    "Animator",
    "Backend",
    "BackendUnavailable",
    "Ending",
    "Host",
    "HousekeepingError",
    "IdempotencyConflict",
    "InvalidAnimator",
    "InvalidArguments",
    "JournalError",
    "LocalBackend",
    "Manager",
    "ManagerTerminated",
    "Outcome",
    "OutcomeKind",
    "QueueFull",
    "Sandbox",
    "TaskNotFound",
    "TaskState",
    "UnsupportedOperation",
    "Usage",
    "is_terminal",
]

#: Marks this package as housekeeping's (supervisord ships a package of the same name).
HOUSEKEEPING = True


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'supervisor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # NOTE: looked up once; later accesses are plain globals
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
