"""The seam between the task table and the place where tasks run.

The manager (its :class:`~supervisor.ledger.Ledger` and the loop-side
:class:`~supervisor.dispatcher.Dispatcher`, the :class:`Host`) keeps the
table, the queue, the events and every state change; a :class:`Backend` starts a queued task
somewhere, tells it to cancel, kills it, and reports what became of it.
Two implement it: :class:`~supervisor.backends.local.LocalBackend` (a process per task
on this machine; the default) and ``supervisor.backends.dask.DaskBackend``
(the same child code on the workers of a Dask cluster).

::

    Dispatcher (the Host)                   Backend
    ─────────────────────                   ───────
    register ─── prepare(registration) ─────────▶ import its module, fork ahead
    dispatch ─── can_start(reg) / start(launch) ▶ runs the task's animator
    cancel_running ─── cancel(task_id) ─────────▶ tell, kill after cancel_grace
    kill_running ─── kill(task_id, reason) ─────▶ kill now
    task_running(task_id) ◀─────────────────────  its process runs (NEW ⇒ ACTIVE)
    task_message(task_id, Progress | ...) ◀─────  coalesced reports, in order
    task_finished(task_id, Ending) ◀────────────  exactly once per started task
    task_output(task_id, stream, bytes) ◀────────  what its processes write
    task_output_closed(task_id) ◀───────────────  once per started task: output ended
    terminate ─── await shutdown() ─────────────▶ tell, grace, kill, reap; stop

Every method of a backend, and every call it makes to its host, runs on the
manager's loop thread.

To add a backend (Ray, say): subclass :class:`Backend` in a subpackage of
``supervisor.backends`` that holds both halves (the parent side here, and
whatever runs on the remote side), run the task with the same child code
(``workers.child``; a remote half may embed a Manager and use
``Manager.run_task_as``), report with the Host's methods, and end each
started task with exactly one :class:`~supervisor.outcome.Ending`. Pass it
as ``Manager(backend=...)``: the Manager itself does not change.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from supervisor.outcome import Ending
from supervisor.protocol import Note, Progress, StateChanged
from supervisor.sandbox import Sandbox


@dataclass(frozen=True)
class Registration:
    """An operation's animator and limits."""

    animator: Any
    pickled: bytes
    main_path: str | None
    timeout: float | None
    max_memory: int | None
    #: as it applies on this machine (:meth:`~supervisor.sandbox.Sandbox.effective`)
    sandbox: Sandbox = field(default_factory=lambda: Sandbox(private_pids=False))
    module: str | None = None  #: the animator's module, unless it is ``__main__``
    #: as asked for, before this machine resolved it: what a remote machine applies
    requested_sandbox: Sandbox | None = None


@dataclass(frozen=True)
class Launch:
    """What a backend needs to run one task."""

    task_id: str
    task_json: bytes  #: the task's wire form when it starts, as JSON
    registration: Registration

    @property
    def task(self) -> dict[str, Any]:
        """The task's wire form, decoded anew on each access."""
        return json.loads(self.task_json)  # type: ignore[no-any-return]


Report = Progress | StateChanged | Note


class Host(Protocol):
    """What a backend may ask of the manager it serves."""

    max_workers: int
    cancel_grace: float
    sandbox: Sandbox  #: the default of every operation, as in effect here

    def task_message(self, task_id: str, message: Report) -> str | None:
        """Apply one report of a running task; return what was wrong with it, if anything."""

    def task_finished(self, task_id: str, ending: Ending) -> None:
        """Record how a started task ended (outcome, result, usage) and free its slot."""

    def backend_changed(self) -> None:
        """Capacity or availability changed: dispatch queued tasks (or fail them)."""

    def task_running(self, task_id: str) -> None:
        """A started task's process runs now (NEW ⇒ ACTIVE; see ``starts_running``)."""

    def task_output(self, task_id: str, stream: str, data: bytes,
                    when: float | None = None) -> None:
        """Take bytes a started task's processes wrote on ``"stdout"`` or ``"stderr"``
        (``when``: the time they were written, if not now)."""

    def task_output_lines(self, task_id: str, stream: str, texts: list[str],
                          when: float) -> None:
        """Take lines a started task wrote, already split (a remote worker's)."""

    def task_output_closed(self, task_id: str) -> None:
        """A started task's output ended: once per started task, after its last
        ``task_output``, before or after ``task_finished`` (its log is complete
        when both happened)."""


class Backend(abc.ABC):
    """Where tasks run: start, cancel, kill, reap, and report back to the host."""

    _host: Host | None = None
    #: True: a task is running (ACTIVE) once :meth:`start` took it. False: it stays
    #: NEW until the backend calls ``host.task_running`` (its process runs remotely,
    #: later), or any report of it comes.
    starts_running = True

    @property
    def host(self) -> Host:
        """The manager this backend serves (set by :meth:`open`)."""
        assert self._host is not None, "the backend is not open"
        return self._host

    @abc.abstractmethod
    async def open(self, host: Host) -> None:
        """Get ready to run tasks for ``host`` (on the manager's loop); set ``_host``."""

    def default_max_workers(self) -> int | None:
        """Tasks in flight when the manager's ``max_workers`` is not given (None: CPUs)."""
        return None

    def prepare(self, registration: Registration) -> None:  # noqa: B027 (optional hook)
        """An operation was registered: get ready for its tasks (import its module)."""

    def unavailable(self) -> str | None:
        """Why new tasks cannot be run now (None: they can)."""
        return None

    @abc.abstractmethod
    def can_start(self, registration: Registration) -> bool:
        """True when :meth:`start` would take a task of ``registration`` now."""

    @abc.abstractmethod
    def start(self, launch: Launch) -> bool:
        """Start a task; False if it could not be handed over (the host retries)."""

    @abc.abstractmethod
    def cancel(self, task_id: str) -> None:
        """Tell a running task to cancel; kill its tree after the host's cancel_grace."""

    @abc.abstractmethod
    def kill(self, task_id: str, reason: str) -> None:
        """Kill a running task's tree now, without a grace (``canceled-killed``,
        ``reason`` as its message), unless it reported its outcome first."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Cancel every running task, kill what is left, wait until all is reaped; stop."""

    def kill_everything(self) -> None:  # noqa: B027 (optional hook)
        """Last resort of ``terminate()`` when :meth:`shutdown` failed or outlived its
        deadline: kill every process by force, now (on the loop thread, like the rest)."""
