"""What a start with an existing journal does to the tasks the previous run left
unfinished.

::

    the record was   on start                             then
    ──────────────   ────────                             ────
    NEW              held until its operation is          requeue=True: NEW again, queued in
                     registered                           creation order ("queued again after
                                                          a restart"); requeue=False: CANCELED,
                                                          canceled-queued
    ACTIVE/WAITING   FAILED, lost ("the supervisor        (journal only: fetch and list it)
                     stopped while the task ran")
    terminal         kept as it is                        (journal only)

A task queued again keeps its id, its number (its place in creation order),
``timeCreated``, ``version`` and messages: a client that polled it before the
restart sees the same task go on.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from supervisor.consts import CONSTS
from supervisor.errors import InvalidArguments
from supervisor.outcome import Outcome, OutcomeKind
from supervisor.states import TaskState
from supervisor.task import Task, check_create
from supervisor.wire import Message, TaskSnapshot, create_fields, utc_stamp

if TYPE_CHECKING:
    from supervisor.backend import Registration
    from supervisor.ledger import Ledger

log = logging.getLogger("housekeeping.supervisor")

#: The message of a task queued again after a restart.
REQUEUED = "queued again after a restart"
#: The outcome message of a queued task whose operation was registered with requeue=False.
RESTARTED_BEFORE_START = "the supervisor restarted before the task started"
#: The outcome message of a task that ran when the supervisor stopped.
STOPPED_WHILE_RUNNING = "the supervisor stopped while the task ran"


def ended_lost(snapshot: TaskSnapshot, now: float | None = None) -> TaskSnapshot:
    """The next version of a task that was ACTIVE or WAITING when the supervisor
    stopped: FAILED, outcome ``lost``."""
    wire = snapshot.to_dict()
    stamp = utc_stamp(now)
    messages = list(wire.get("messages") or [])
    messages += [{"time": stamp, "message": STOPPED_WHILE_RUNNING},
                 {"time": stamp, "message": f"State change {snapshot.state} ⇒ FAILED"}]
    wire["messages"] = messages[-CONSTS.max_messages:]
    wire["state"] = "FAILED"
    wire["outcome"] = Outcome(OutcomeKind.LOST, STOPPED_WHILE_RUNNING).to_wire()
    wire["meta"]["version"] = snapshot.version + 1
    wire["meta"]["timeModified"] = stamp
    return TaskSnapshot.from_wire(wire, snapshot.number)


def task_from_record(snapshot: TaskSnapshot) -> Task:
    """The table's task for the record of a NEW task, as it was recorded.

    Raises:
        InvalidArguments: the record's creation fields are malformed.
    """
    wire = snapshot.to_dict()
    create = create_fields(wire)
    task = Task(snapshot.id, create, check_create(create), snapshot.number, snapshot.created_at)
    task.time_created = snapshot.time_created  # NOTE: as recorded, not re-formatted
    task.version = snapshot.version
    task.modified_at, task.time_modified = snapshot.modified_at, snapshot.time_modified
    task.messages.extend(Message(m.time, m.text) for m in snapshot.messages)
    return task


def take_back(ledger: Ledger, held: list[TaskSnapshot], registration: Registration,
              requeue: bool) -> list[str]:
    """Put the last run's queued tasks of one operation (just registered) into the
    table: queued again, oldest first, or (``requeue=False``) CANCELED.

    Returns:
        The ids of the tasks it canceled (to purge in due time).
    """
    canceled = []
    with ledger.lock:
        for snapshot in held:
            try:
                task = task_from_record(snapshot)
            except InvalidArguments as exc:
                log.error("task %s was not queued again: its record is malformed: %s",
                          snapshot.id, exc)
                continue
            task.registration = registration
            if requeue:
                task.note(REQUEUED)
                task.touch()
            ledger.table.add(task)
            ledger.publish("POST", task)
            if requeue:
                ledger.queue.append(task.id)
            else:
                task.cancel_requested = True
                ledger.change(task, TaskState.CANCELED, outcome=Outcome(
                    OutcomeKind.CANCELED_QUEUED, RESTARTED_BEFORE_START))
                canceled.append(task.id)
        if requeue:
            # NOTE: the oldest first, ahead of tasks created since the start
            ordered = sorted(ledger.queue,
                             key=lambda task_id: ledger.table.number_of(task_id) or 0)
            ledger.queue.clear()
            ledger.queue.extend(ordered)
    log.info("%d %s task(s) of the last run %s", len(held), held[0].operation,
             "queued again" if requeue else "canceled (requeue=False)")
    return canceled
