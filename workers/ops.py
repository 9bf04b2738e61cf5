"""TaskOps: what an animator's ``execute`` may do from inside its task process."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from supervisor.consts import CONSTS
from supervisor.protocol import Cancel, Note, Progress, StateChanged, check_progress, decode, encode
from supervisor.states import TaskState, is_terminal

if TYPE_CHECKING:
    from workers.pipe import Pipe

class TaskEnded(BaseException):
    """Raised by ``TaskOps.set_state`` with a terminal state to end ``execute``.

    It derives from BaseException so that an animator's ``except Exception``
    does not swallow it (the seed ended a task with a panic for the same reason).
    """

    def __init__(self, state: TaskState) -> None:
        super().__init__(state.value)
        self.state = state


class TaskOps:
    """The child-side handle of one task.

    Progress is coalesced here: a hot loop may call :meth:`set_progress` a
    million times, and the parent sees at most one report per
    ``Consts.progress_interval``; a report still pending when the loop goes
    quiet is sent by a one-shot ``SIGALRM`` timer (the task process has no
    threads: they would break a tight ``RLIMIT_AS``). Every other report
    flushes the pending progress first, so order is kept.
    """

    def __init__(
        self,
        task: dict[str, Any],
        conn: Pipe,
        *,
        clock: Callable[[], float] = time.monotonic,  # test shim
    ) -> None:
        self.task = task
        self._conn = conn
        self._clock = clock
        self._canceled = False
        self._parent_gone = False
        self._last_poll = -1.0
        self._last_sent = -1.0
        self._pending: dict[str, int] = {}
        self._pending_time = 0.0
        self._timer_armed = False
        self._sending = False
        self._on_cancel: Callable[[], None] | None = None
        self._install_alarm()

    # -- the animator's API -------------------------------------------------

    def is_canceled(self) -> bool:
        """Tell whether the task was canceled (or the manager is terminating).

        Cheap enough for a hot loop: the pipe is looked at no more often than
        every ``Consts.cancel_poll_interval``.
        """
        if self._canceled or self._parent_gone:
            return self._canceled
        now = self._clock()
        if now - self._last_poll >= CONSTS.cancel_poll_interval:
            self._last_poll = now
            self.receive()
        return self._canceled

    def set_state(self, state: TaskState | str) -> None:
        """Report ACTIVE or WAITING; a terminal state ends ``execute`` here.

        Raises:
            TaskEnded: ``state`` is terminal (do not catch it).
            ValueError: ``state`` is NEW or not a state.
        """
        state = TaskState(state)
        if is_terminal(state):
            raise TaskEnded(state)
        if state is TaskState.NEW:
            raise ValueError("a running task cannot go back to NEW")
        self.flush()
        self._send(StateChanged(state.value))

    def set_progress(
        self,
        *,
        percent_complete: int | None = None,
        total_bytes: int | None = None,
        offset_bytes: int | None = None,
        transferred_bytes: int | None = None,
    ) -> None:
        """Record progress; the latest value reaches the table within 100 ms."""
        values = check_progress({
            "percent_complete": percent_complete,
            "total_bytes": total_bytes,
            "offset_bytes": offset_bytes,
            "transferred_bytes": transferred_bytes,
        })
        self._pending.update(values)
        self._pending_time = time.time()
        now = self._clock()
        if now - self._last_sent >= CONSTS.progress_interval:
            self.flush()
        elif not self._timer_armed:
            self._arm(CONSTS.progress_interval - (now - self._last_sent))

    def message(self, text: str) -> None:
        """Add a line to ``task["messages"]`` (kept bounded by the parent)."""
        self.flush()
        self._send(Note(str(text)[:4096]))

    # -- used by the child entry point -------------------------------------

    def flush(self) -> None:
        """Send the pending progress now, if any."""
        if not self._pending:
            return
        values, self._pending = self._pending, {}
        self._last_sent = self._clock()
        self._send(Progress(values, self._pending_time))

    def receive(self) -> None:
        """Read what the parent sent (Cancel) without blocking."""
        try:
            while self._conn.poll(0):
                message = decode(self._conn.recv_bytes())
                if isinstance(message, Cancel):
                    self._mark_canceled()
        except (EOFError, OSError):
            # NOTE: the parent is gone; nobody will read a result, so stop.
            self._parent_gone = True
            self._mark_canceled()

    def send_final(self, message: object) -> None:
        """Flush progress and send the final report; the last thing the child says."""
        self._disarm()
        self.flush()
        self._send(message)

    def detach(self) -> None:
        """Close the pipe in a process forked by the task process (an at-fork hook).

        Only the task process speaks for its task: a helper it forks must not
        send a report by accident (say, a final one from the same handler
        that wraps ``execute``). In the helper, reports go nowhere and
        :meth:`is_canceled` keeps the answer it had at the fork.
        """
        self._parent_gone = True
        self._timer_armed = False
        self._pending = {}
        with contextlib.suppress(OSError):
            self._conn.close()

    def set_cancel_hook(self, hook: Callable[[], None] | None) -> None:
        """Call ``hook`` once when the cancel arrives (cancels the asyncio task)."""
        self._on_cancel = hook
        if hook is not None and self._canceled:
            hook()

    def pipe_fileno(self) -> int:
        """The pipe's descriptor (the child's event loop watches it for a Cancel)."""
        return self._conn.fileno()

    @property
    def parent_gone(self) -> bool:
        """True once the pipe to the parent is broken."""
        return self._parent_gone

    # -- internals ---------------------------------------------------------

    def _mark_canceled(self) -> None:
        if self._canceled:
            return
        self._canceled = True
        if self._on_cancel is not None:
            self._on_cancel()

    def _send(self, message: object) -> None:
        if self._parent_gone:
            return
        self._sending = True
        try:
            self._conn.send_bytes(encode(message))
        except OSError:
            self._parent_gone = True
            self._mark_canceled()
        finally:
            self._sending = False

    def _install_alarm(self) -> None:
        signal.signal(signal.SIGALRM, self._on_alarm)

    def _arm(self, delay: float) -> None:
        self._timer_armed = True
        signal.setitimer(signal.ITIMER_REAL, max(delay, 0.001))

    def _disarm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        self._timer_armed = False

    def _on_alarm(self, signum: int, frame: object) -> None:
        self._timer_armed = False
        if self._sending:
            # NOTE: the main code is inside send_bytes; writing another frame
            # now would interleave two messages on the pipe. Try again shortly.
            self._arm(0.001)
            return
        self.flush()
