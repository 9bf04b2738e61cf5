"""The scheduler side of the Dask backend: who runs which task, and its cancels.

A :class:`TaskClaims` plugin, registered on the scheduler by every
:class:`~supervisor.backends.dask.DaskBackend` (once per scheduler: it is
idempotent), keeps one record per task key and answers three calls, each one
round trip, atomic on the scheduler's event loop:

* ``housekeeping_claim(key, worker, rerun)``, from the worker side before it
  runs a task: ``"run"`` the first time; ``"canceled"`` when the supervisor
  canceled the task first (it never runs); for a second run of the same key
  (Dask re-runs a task whose worker died) ``"run"`` only if the animator opted
  in, else ``"refused"``;
* ``housekeeping_cancel(keys)``, from the supervisor: a claimed task's cancel
  goes on to the worker that claimed it (``"running"``); any other key is
  marked canceled (``"queued"``), so that a run that comes later refuses;
* ``housekeeping_forget(keys)``, from the supervisor, for tasks it is done with.

It replaces two ``distributed.Event`` objects per task, checked and set by the
worker (three round trips before the animator could start), waited on by a
thread per task and cleared at the end.

Records are bounded (``MAX_RECORDS``, the oldest dropped beyond it): a
supervisor that dies leaves the records of its last tasks behind, and a
canceled key's record stays (a tombstone) until its supervisor forgets it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

log = logging.getLogger("housekeeping.dask")

#: The plugin's name on the scheduler (one per scheduler, shared by every supervisor).
PLUGIN_NAME = "housekeeping-task-claims"
#: Records kept at most; beyond it the oldest are dropped (logged).
MAX_RECORDS = 100_000
#: The worker side's handler that receives the cancels of its tasks.
WORKER_CANCEL = "housekeeping_cancel"


def register(client: Any) -> None:
    """Register the plugin on ``client``'s scheduler (once per scheduler: a second
    registration leaves the first, and its records, in place)."""
    client.register_plugin(TaskClaims(), name=PLUGIN_NAME)


def ask(call: Callable[[], Any], client: Any) -> Any:
    """``call()`` one of the plugin's handlers; registered again, and called again,
    when the scheduler answers None: it does so for an unknown handler, that is a
    scheduler restarted since the plugin was registered (it holds no records)."""
    answer = call()
    if answer is None:
        register(client)
        answer = call()
    return answer


class _Record:
    """One task key: the worker that last claimed it, and whether it was canceled."""

    __slots__ = ("canceled", "worker")

    def __init__(self) -> None:
        self.worker: str | None = None
        self.canceled = False


class TaskClaims(SchedulerPlugin):
    """The records of the supervisors' tasks on this scheduler (see the module)."""

    idempotent = True  # NOTE: a second supervisor must not replace the records

    def __init__(self) -> None:
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._scheduler: Any = None
        self._sending: set[asyncio.Task[None]] = set()
        self.dropped = 0

    async def start(self, scheduler: Any) -> None:
        self._scheduler = scheduler
        scheduler.handlers.update({
            "housekeeping_claim": self.claim,
            "housekeeping_cancel": self.cancel,
            "housekeeping_forget": self.forget,
        })

    def claim(self, key: str, worker: str, rerun: bool) -> str:
        """A worker is about to run ``key``: may it?"""
        record = self._records.get(key)
        if record is None:
            record = self._records[key] = _Record()
            self._trim()
        if record.canceled:
            return "canceled"
        if record.worker is not None and not rerun:
            return "refused"  # a second run: the first one's worker died
        record.worker = worker
        return "run"

    def cancel(self, keys: list[str]) -> dict[str, str]:
        """Cancel each key: on its worker if claimed, else before any run."""
        answers: dict[str, str] = {}
        by_worker: dict[str, list[str]] = {}
        for key in keys:
            record = self._records.get(key)
            if record is None:
                record = self._records[key] = _Record()
            # NOTE: also when claimed: a second run (its worker died) must not start
            record.canceled = True
            if record.worker is not None:
                by_worker.setdefault(record.worker, []).append(key)
                answers[key] = "running"
            else:
                answers[key] = "queued"
        self._trim()
        for worker, claimed in by_worker.items():
            # NOTE: not awaited: the supervisor's answer does not wait for a worker
            task = asyncio.ensure_future(self._send_cancel(worker, claimed))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        return answers

    def forget(self, keys: list[str]) -> None:
        """The supervisor is done with these tasks."""
        for key in keys:
            self._records.pop(key, None)

    async def _send_cancel(self, worker: str, keys: list[str]) -> None:
        try:
            await self._scheduler.rpc(worker).housekeeping_cancel(keys=keys)
        except Exception as exc:  # NOTE: best effort, in the background
            # NOTE: its worker is gone, say; the supervisor learns that from the cluster
            log.info("cannot send a cancel to Dask worker %s: %s", worker, exc)

    def _trim(self) -> None:
        excess = len(self._records) - MAX_RECORDS
        if excess > 0:
            for _ in range(excess):
                self._records.popitem(last=False)
            self.dropped += excess
            log.warning("housekeeping task records beyond %d: dropped the oldest %d "
                        "(%d in all)", MAX_RECORDS, excess, self.dropped)
