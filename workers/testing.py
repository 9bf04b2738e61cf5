"""A recording fake of TaskOps, to unit-test an animator's ``execute`` in-process.

A real task needs a manager, a child process and a pipe. To test the logic of
an animator, run its ``execute`` in the test's own process against
:class:`FakeTaskOps`, which records every progress report, state and message,
and can simulate a cancel::

    from workers.testing import FakeTaskOps, run

    state, result, ops = run(MyAnimator(), {"operation": "MY", "args": {"n": 3}})
    assert state is TaskState.SUCCEEDED
    assert ops.progress[-1]["percent_complete"] == 100

    state, _, ops = run(MyAnimator(), {"operation": "MY"}, FakeTaskOps(cancel_after=2))
    assert state is TaskState.CANCELED

:func:`run` runs the task process's own execution code
(:mod:`workers.execution`): ``validate`` first, then ``execute`` (``async
def`` on uvloop, where a cancel cancels the coroutine), then the result's
JSON check, with the same states, reasons and outcome kinds
(``ops.kind``). Unlike the real one, it lets an exception from the animator
propagate, so that the test shows its traceback.
"""

from __future__ import annotations

import itertools
import json
import pickle
import threading
from collections.abc import Callable
from typing import Any

from supervisor.animator import Animator
from supervisor.outcome import OutcomeKind
from supervisor.protocol import check_progress
from supervisor.states import TaskState, is_terminal
from supervisor.wire import create_fields, utc_stamp
from workers.execution import execute
from workers.ops import TaskEnded, TaskOps

_ids = itertools.count(1)


def make_task(create: dict[str, Any]) -> dict[str, Any]:
    """Build the wire form of a just-started task from creation arguments.

    It is what ``ops.task`` holds in a real task process: ``meta``, the
    creation fields as given, ``state`` ACTIVE, no progress, no result.

    Args:
        create: ``{"operation", "objectId"?, "serviceStates"?, "args"?}``.

    Returns:
        A new task dict with a unique ``meta.id`` (``FAKE000001``, ...).
    """
    now = utc_stamp()
    task: dict[str, Any] = {
        "meta": {
            "id": f"FAKE{next(_ids):06d}",
            "objType": "Task",
            "version": 2,
            "timeCreated": now,
            "timeModified": now,
        },
    }
    task.update(create_fields(create))
    task.update({"state": TaskState.ACTIVE.value, "cancelRequested": False,
                 "messages": [], "result": None})
    return task


class FakeTaskOps(TaskOps):
    """Stand in for :class:`workers.TaskOps` and record what the animator does.

    It has the same public methods and checks its arguments the same way
    (``set_progress`` clamps the percentage and rejects negative byte counts;
    ``set_state`` with a terminal state raises :class:`workers.TaskEnded`), but
    nothing is coalesced or sent anywhere: every call is kept, in order.

    Attributes:
        task: the task dict ``execute`` sees (see :func:`make_task`).
        state: the latest state (ACTIVE at first; terminal once ``set_state``
            ended the task or :func:`run` recorded the outcome).
        progress: every ``set_progress`` call's values as checked, e.g.
            ``{"percent_complete": 40, "total_bytes": 100}`` (unset ones left out).
        states: every state passed to ``set_state``, terminal ones included.
        messages: every ``message`` text.
        calls: all of the above in call order, as ``(method name, value)``.
        is_canceled_calls: how many times ``is_canceled`` was called.
        reason: why :func:`run` recorded a non-SUCCEEDED outcome, else ``None``.
        kind: the outcome kind :func:`run` recorded (``OutcomeKind.RETURNED``, ...).
    """

    def __init__(self, task: dict[str, Any] | None = None, *,
                 cancel_after: int | None = None) -> None:
        """Create the fake; no pipe, no signal handler, no timer.

        Args:
            task: what ``ops.task`` holds; by default a task of operation ``FAKE``.
                :func:`run` replaces it with the task it is given.
            cancel_after: simulate a cancel arriving after this many
                ``is_canceled()`` calls answered False (0: canceled from the start).
                ``None`` cancels only on :meth:`cancel`.
        """
        if cancel_after is not None and cancel_after < 0:
            raise ValueError("cancel_after must not be negative")
        self.task = task if task is not None else make_task({"operation": "FAKE"})
        self.state = TaskState.ACTIVE
        self.progress: list[dict[str, int]] = []
        self.states: list[TaskState] = []
        self.messages: list[str] = []
        self.calls: list[tuple[str, Any]] = []
        self.is_canceled_calls = 0
        self.reason: str | None = None
        self.kind: OutcomeKind | None = None
        self._cancel_after = cancel_after
        self._canceled = False
        self._hook: Callable[[], None] | None = None
        self._lock = threading.Lock()

    # -- what a test does ----------------------------------------------------

    def cancel(self) -> None:
        """Simulate ``Manager.cancel_task``; safe to call from another thread."""
        with self._lock:
            if self._canceled:
                return
            self._canceled = True
            hook = self._hook
        if hook is not None:
            hook()

    @property
    def canceled(self) -> bool:
        """True once the (simulated) cancel has arrived."""
        return self._canceled

    @property
    def last_progress(self) -> dict[str, int]:
        """Return every progress field's latest value, as the task table holds them."""
        merged: dict[str, int] = {}
        for values in self.progress:
            merged.update(values)
        return merged

    # -- the animator's API ---------------------------------------------------

    def is_canceled(self) -> bool:
        """Tell whether the simulated cancel has arrived; counts the calls."""
        self.is_canceled_calls += 1
        if (self._cancel_after is not None and not self._canceled
                and self.is_canceled_calls > self._cancel_after):
            self.cancel()
        return self._canceled

    def set_state(self, state: TaskState | str) -> None:
        """Record ``state``; a terminal one ends ``execute`` as the real one does.

        Raises:
            TaskEnded: ``state`` is terminal.
            ValueError: ``state`` is NEW or not a state.
        """
        state = TaskState(state)
        if state is TaskState.NEW:
            raise ValueError("a running task cannot go back to NEW")
        self.states.append(state)
        self.calls.append(("set_state", state))
        self.state = state
        if is_terminal(state):
            raise TaskEnded(state)

    def set_progress(
        self,
        *,
        percent_complete: int | None = None,
        total_bytes: int | None = None,
        offset_bytes: int | None = None,
        transferred_bytes: int | None = None,
    ) -> None:
        """Record one progress report (checked and clamped like the real one)."""
        values = check_progress({
            "percent_complete": percent_complete,
            "total_bytes": total_bytes,
            "offset_bytes": offset_bytes,
            "transferred_bytes": transferred_bytes,
        })
        self.progress.append(values)
        self.calls.append(("set_progress", values))

    def message(self, text: str) -> None:
        """Record one message (cut at 4096 characters like the real one)."""
        text = str(text)[:4096]
        self.messages.append(text)
        self.calls.append(("message", text))

    # -- what the task process uses; nothing to send here ----------------------

    def flush(self) -> None:
        """Do nothing: the fake sends nothing."""

    def receive(self) -> None:
        """Do nothing: cancels arrive through :meth:`cancel` or ``cancel_after``."""

    def send_final(self, message: object) -> None:
        """Do nothing: :func:`run` records the outcome instead."""

    def set_cancel_hook(self, hook: Callable[[], None] | None) -> None:
        """Call ``hook`` once when the cancel arrives (at once if it already has)."""
        with self._lock:
            self._hook = hook
            canceled = self._canceled
        if hook is not None and canceled:
            hook()

    def pipe_fileno(self) -> int:
        """Refuse: the fake has no pipe (only the task process's event loop needs it).

        Raises:
            OSError: always.
        """
        raise OSError("FakeTaskOps has no pipe")

    @property
    def parent_gone(self) -> bool:
        """Always False: there is no parent to lose."""
        return False


def run(
    animator: Animator,
    create_or_task: dict[str, Any],
    ops: FakeTaskOps | None = None,
    *,
    validate: bool = True,
) -> tuple[TaskState, Any, FakeTaskOps]:
    """Run ``animator`` on a task in this process and return the outcome.

    Steps, as in the supervisor: the animator must pickle (it is sent to the
    task process); ``validate`` runs on the creation fields; ``execute`` runs
    (an ``async def`` one on uvloop, and a cancel then cancels it); a result
    must be JSON of at most 1 MiB (``MAX_RESULT_BYTES``).

    Args:
        animator: the animator under test.
        create_or_task: creation arguments (``{"operation", "args", ...}``) or a
            full task dict (one with ``meta``); either becomes ``ops.task``.
        ops: a prepared fake (e.g. ``FakeTaskOps(cancel_after=3)``); a new one
            by default.
        validate: call ``animator.validate`` first.

    Returns:
        ``(state, result, ops)``: the terminal state the supervisor would record,
        the result as a client would read it back from JSON (``None`` unless
        SUCCEEDED), and the fake with its records; ``ops.reason`` says why a
        task did not succeed.

    Raises:
        Exception: whatever ``validate`` or ``execute`` raised (the supervisor
            would record FAILED); re-raised so that the test shows it.
    """
    pickle.dumps(animator)
    task = create_or_task if "meta" in create_or_task else make_task(create_or_task)
    if validate:
        animator.validate(create_fields(task))
    ops = ops if ops is not None else FakeTaskOps()
    ops.task = task
    # NOTE: the task process's own code: the same states, reasons, kinds and checks
    final = execute(animator, ops, passing=(Exception,))
    ops.state = TaskState(final.state)
    ops.reason = final.reason
    ops.kind = OutcomeKind(final.kind) if final.kind is not None else None
    result = json.loads(final.result_json) if final.result_json is not None else None
    return ops.state, result, ops
