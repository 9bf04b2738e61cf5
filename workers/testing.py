"""The real TaskOps over an in-memory pipe, to unit-test an animator's ``execute``
in-process.

A real task needs a manager, a child process and a pipe. To test the logic of
an animator, run its ``execute`` in the test's own process against
:class:`FakeTaskOps`: the task process's own handle, whose frames go to a
:class:`MemoryPipe` instead of a supervisor. It records every progress
report, state and message, keeps what the supervisor would have read
(``ops.sent``), and can simulate a cancel::

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
(``ops.kind``), and sends the final report over the pipe as the task
process does: ``ops.sent[-1]`` is the ``Finished`` the supervisor would
read. Unlike the real one, it lets an exception from the animator
propagate, so that the test shows its traceback.
"""

from __future__ import annotations

import itertools
import json
import pickle
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from supervisor.animator import Animator
from supervisor.outcome import OutcomeKind
from supervisor.protocol import MAX_MESSAGE_BYTES, Cancel, Finished, check_progress, decode, encode
from supervisor.states import TaskState
from supervisor.wire import create_fields, utc_stamp
from workers.execution import execute
from workers.ops import TaskOps

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


class MemoryPipe:
    """An in-memory stand-in for the task process's pipe: whole frames, each way.

    What :class:`FakeTaskOps` sends is kept as it would cross the real pipe
    (``outbound``, encoded payloads); what a test sends it (a ``Cancel``) waits
    in ``inbound`` until the handle reads it. It has no descriptor.
    """

    def __init__(self) -> None:
        self.outbound: list[bytes] = []
        self.inbound: deque[bytes] = deque()
        self._closed = False
        self._lock = threading.Lock()

    def fileno(self) -> int:
        """Refuse: there is no descriptor (an async ``execute`` then gets its cancel
        through the cancel hook).

        Raises:
            OSError: always.
        """
        raise OSError("an in-memory pipe has no descriptor")

    def send_bytes(self, payload: bytes) -> None:
        """Keep one frame's payload, as the supervisor would read it.

        Raises:
            OSError: the pipe is closed, or the frame is over the protocol's limit.
        """
        if self._closed:
            raise OSError("the task pipe is closed")
        if len(payload) > MAX_MESSAGE_BYTES:
            raise OSError(f"a frame of {len(payload)} bytes")
        with self._lock:
            self.outbound.append(bytes(payload))

    def recv_bytes(self) -> bytes:
        """Take the oldest frame sent to the task.

        Raises:
            EOFError: nothing is waiting (a real read would block).
        """
        with self._lock:
            if not self.inbound:
                raise EOFError("nothing was sent to the task")
            return self.inbound.popleft()

    def poll(self, timeout: float = 0.0) -> bool:
        """True when a frame waits to be read (never waits)."""
        with self._lock:
            return bool(self.inbound)

    def close(self) -> None:
        """Close it: later sends fail, as on a closed pipe."""
        self._closed = True

    def deliver(self, message: object) -> None:
        """Send ``message`` to the task, as the supervisor would."""
        with self._lock:
            self.inbound.append(encode(message))


class FakeTaskOps(TaskOps):
    """Stand in for :class:`workers.TaskOps` and record what the animator does.

    It is the real handle over an in-memory pipe (:class:`MemoryPipe`): each
    report is checked, encoded and sent as a task process would send it, and
    a cancel arrives as a ``Cancel`` frame read by the real ``receive``. Two
    differences keep a test deterministic: every ``set_progress`` is sent at
    once (the real one sends at most one per ``progress_interval``), and
    ``is_canceled`` reads the pipe at every call. Every call is also kept,
    in order.

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
        pipe: the in-memory pipe (see :attr:`sent`).
    """

    def __init__(self, task: dict[str, Any] | None = None, *,
                 cancel_after: int | None = None) -> None:
        """Create the fake; no process, no descriptor, no signal handler, no timer.

        Args:
            task: what ``ops.task`` holds; by default a task of operation ``FAKE``.
                :func:`run` replaces it with the task it is given.
            cancel_after: simulate a cancel arriving after this many
                ``is_canceled()`` calls answered False (0: canceled from the start).
                ``None`` cancels only on :meth:`cancel`.
        """
        if cancel_after is not None and cancel_after < 0:
            raise ValueError("cancel_after must not be negative")
        self.pipe = MemoryPipe()
        super().__init__(task if task is not None else make_task({"operation": "FAKE"}),
                         self.pipe)
        self.state = TaskState.ACTIVE
        self.progress: list[dict[str, int]] = []
        self.states: list[TaskState] = []
        self.messages: list[str] = []
        self.calls: list[tuple[str, Any]] = []
        self.is_canceled_calls = 0
        self.reason: str | None = None
        self.kind: OutcomeKind | None = None
        self._cancel_after = cancel_after
        self._lock = threading.Lock()

    # -- what a test does ----------------------------------------------------

    def cancel(self) -> None:
        """Simulate ``Manager.cancel_task``: a ``Cancel`` frame, read at once (so that
        an async ``execute`` is canceled); safe to call from another thread."""
        with self._lock:
            if self._canceled:
                return
            self.pipe.deliver(Cancel())
            super().receive()

    @property
    def canceled(self) -> bool:
        """True once the (simulated) cancel has arrived."""
        return self._canceled

    @property
    def sent(self) -> list[object]:
        """What the supervisor would have read from the task, in order: ``Progress``,
        ``Note``, ``StateChanged`` and, after :func:`run`, the final ``Finished``
        (messages of :mod:`supervisor.protocol`, decoded as the supervisor decodes
        them)."""
        return [decode(payload) for payload in list(self.pipe.outbound)]

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
        self.receive()
        return self._canceled

    def set_state(self, state: TaskState | str) -> None:
        """Record ``state``, then report it; a terminal one ends ``execute`` as the
        real one does.

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
        super().set_state(state)

    def set_progress(
        self,
        *,
        percent_complete: int | None = None,
        total_bytes: int | None = None,
        offset_bytes: int | None = None,
        transferred_bytes: int | None = None,
    ) -> None:
        """Record one progress report (checked and clamped like the real one) and send it."""
        values = check_progress({
            "percent_complete": percent_complete,
            "total_bytes": total_bytes,
            "offset_bytes": offset_bytes,
            "transferred_bytes": transferred_bytes,
        })
        self.progress.append(values)
        self.calls.append(("set_progress", values))
        super().set_progress(**values)
        self.flush()

    def message(self, text: str) -> None:
        """Record one message (cut at 4096 characters like the real one) and send it."""
        text = str(text)[:4096]
        self.messages.append(text)
        self.calls.append(("message", text))
        super().message(text)

    # -- what the task process uses --------------------------------------------

    def receive(self) -> None:
        """Read a ``Cancel`` the test sent, with the real code (from any thread)."""
        with self._lock:
            super().receive()

    def set_cancel_hook(self, hook: Callable[[], None] | None) -> None:
        """Call ``hook`` once when the cancel arrives (at once if it already has)."""
        with self._lock:
            super().set_cancel_hook(hook)

    # NOTE: no SIGALRM here: a test's process keeps its signals and timers, and
    # progress is sent at once instead.
    def _install_alarm(self) -> None:
        pass

    def _arm(self, delay: float) -> None:
        pass

    def _disarm(self) -> None:
        pass


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
    # NOTE: and its final report crosses the pipe, as the supervisor reads it
    ops.send_final(execute(animator, ops, passing=(Exception,)))
    final = ops.sent[-1]
    assert isinstance(final, Finished), final
    ops.state = TaskState(final.state)
    ops.reason = final.reason
    ops.kind = OutcomeKind(final.kind) if final.kind is not None else None
    result = json.loads(final.result_json) if final.result_json is not None else None
    return ops.state, result, ops
