"""How a task ended, as data: its outcome kind, exit status, error type, and what it cost.

An :class:`Outcome` is built where the fact is known (the local backend when
the task process's exit is reaped, the manager when a queued task is
canceled, the Dask backend when a worker is lost) and flows unchanged to the
task table, the change events, the REST API and the metrics: nothing
downstream reads the English of ``message`` to learn what happened.

::

    backend ── Ending(outcome, result, usage) ──▶ host.task_finished
                                                    │ task.outcome, task.usage
                                                    ▼
                          snapshot ──▶ events, REST (``task["outcome"]``), metrics
"""

from __future__ import annotations

import enum
import math
import signal as signals
from dataclasses import dataclass, field, replace
from typing import Any

from supervisor.states import TaskState


class OutcomeKind(enum.StrEnum):
    """Why a task reached its terminal state (``task["outcome"]["kind"]``)."""

    #: SUCCEEDED: ``execute`` returned.
    RETURNED = "returned"
    #: CANCELED while it was queued (NEW): it never ran.
    CANCELED_QUEUED = "canceled-queued"
    #: CANCELED: the animator honoured the cancel (``set_state(CANCELED)``, an await point).
    CANCELED_HONOURED = "canceled-honoured"
    #: CANCELED: its tree was killed when the cancel grace period ran out.
    CANCELED_KILLED = "canceled-killed"
    #: CANCELED: the manager terminated while it ran or waited (honoured or killed).
    CANCELED_TERMINATE = "canceled-terminate"
    #: FAILED: ``execute`` raised (``errorType`` names the exception).
    EXCEPTION = "exception"
    #: FAILED: the animator called ``set_state(FAILED)``.
    FAILED_BY_ANIMATOR = "failed-by-animator"
    #: FAILED: the task process exited or was killed by a signal without a report.
    CRASH = "crash"
    #: FAILED: it ran longer than its operation's ``timeout``; its tree was killed.
    TIMEOUT = "timeout"
    #: FAILED: it ran out of its ``max_memory`` address space.
    MEMORY = "memory"
    #: FAILED: it used up its sandbox's ``max_cpu_seconds``.
    CPU = "cpu"
    #: FAILED: its result was not JSON, or too large.
    RESULT = "result"
    #: FAILED: its process broke the pipe protocol (its tree was killed).
    PROTOCOL = "protocol"
    #: FAILED: what ran it went away (its starter, its Dask worker or scheduler,
    #: the supervisor itself) or could not take it.
    LOST = "lost"

    @property
    def state(self) -> TaskState:
        """The terminal state this kind ends a task in."""
        if self is OutcomeKind.RETURNED:
            return TaskState.SUCCEEDED
        if self.value.startswith("canceled-"):
            return TaskState.CANCELED
        return TaskState.FAILED


#: Kinds a task process may claim in its final report (the others are the
#: supervisor's to decide: a report is a claim, the exit is the truth).
REPORTABLE = frozenset({OutcomeKind.RETURNED, OutcomeKind.CANCELED_HONOURED,
                        OutcomeKind.FAILED_BY_ANIMATOR, OutcomeKind.EXCEPTION,
                        OutcomeKind.RESULT, OutcomeKind.CRASH})


def signal_name(number: int) -> str:
    """``SIGSEGV`` for 11; ``SIG42`` for a number without a name."""
    try:
        return signals.Signals(number).name
    except ValueError:
        return f"SIG{number}"


@dataclass(frozen=True)
class Outcome:
    """How a task ended: the data behind ``task["outcome"]``.

    ``exit_code`` and ``signal`` are the task process's exit status as its
    reaper saw it (one of them, or neither when no process ran).
    ``killed`` says that the supervisor decided to kill the task's tree (a
    forced kill: timeout, cancel grace over, protocol error, ...); it feeds
    ``housekeeping_forced_kills_total`` and is not part of the wire form.
    """

    kind: OutcomeKind
    message: str
    exit_code: int | None = None
    signal: str | None = None
    error_type: str | None = None
    killed: bool = False

    @property
    def state(self) -> TaskState:
        """The terminal state of this outcome."""
        return self.kind.state

    def with_exit(self, exitcode: int | None) -> Outcome:
        """This outcome with the process's exit status (``multiprocessing``'s
        ``exitcode``: negative is a signal)."""
        if exitcode is None:
            return self
        if exitcode < 0:
            return replace(self, exit_code=None, signal=signal_name(-exitcode))
        return replace(self, exit_code=exitcode, signal=None)

    def to_wire(self) -> dict[str, Any]:
        """``{"kind", "message", "exitCode", "signal", "errorType"}``."""
        return {"kind": self.kind.value, "message": self.message, "exitCode": self.exit_code,
                "signal": self.signal, "errorType": self.error_type}

    @classmethod
    def from_wire(cls, wire: dict[str, Any], *, killed: bool = False) -> Outcome:
        """Rebuild an outcome from its wire form (a remote worker's, a journal's).

        Raises:
            ValueError: the kind is unknown or a field has the wrong type.
        """
        exit_code, sig, error_type = wire.get("exitCode"), wire.get("signal"), wire.get(
            "errorType")
        if exit_code is not None and (isinstance(exit_code, bool)
                                      or not isinstance(exit_code, int)):
            raise ValueError("exitCode must be an integer or null")
        for name, value in (("signal", sig), ("errorType", error_type)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string or null")
        return cls(OutcomeKind(wire["kind"]), str(wire.get("message", ""))[:4096],
                   exit_code, sig, error_type, killed)


@dataclass(frozen=True)
class Usage:
    """What a task cost: the data behind ``task["usage"]``.

    CPU and peak memory are the kernel's accounting of the task process and
    of the descendants it reaped (``wait4``'s rusage, taken by its reaper);
    wall time runs from the hand-over to the process's exit.
    """

    cpu_user_seconds: float
    cpu_system_seconds: float
    max_rss_bytes: int
    wall_seconds: float

    @property
    def cpu_seconds(self) -> float:
        """User plus system CPU seconds."""
        return self.cpu_user_seconds + self.cpu_system_seconds

    def to_wire(self) -> dict[str, Any]:
        """``{"cpuUserSeconds", "cpuSystemSeconds", "maxRssBytes", "wallSeconds"}``."""
        return {"cpuUserSeconds": round(self.cpu_user_seconds, 6),
                "cpuSystemSeconds": round(self.cpu_system_seconds, 6),
                "maxRssBytes": self.max_rss_bytes,
                "wallSeconds": round(self.wall_seconds, 6)}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Usage:
        """Rebuild usage from its wire form, checking every figure.

        Raises:
            ValueError: a figure is missing, negative, not finite or of the wrong type.
        """
        figures = []
        for name in ("cpuUserSeconds", "cpuSystemSeconds", "wallSeconds"):
            value = wire[name]
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value < 0:
                raise ValueError(f"usage.{name} must be a number >= 0")
            figures.append(float(value))
        rss = wire["maxRssBytes"]
        if isinstance(rss, bool) or not isinstance(rss, int) or not 0 <= rss < 2**63:
            raise ValueError("usage.maxRssBytes must be an integer >= 0")
        return cls(figures[0], figures[1], rss, figures[2])


@dataclass(frozen=True)
class Ending:
    """What a backend reports once a started task ended (``Host.task_finished``)."""

    outcome: Outcome
    #: strict JSON as :func:`~supervisor.protocol.check_result_json` returns it
    #: (SUCCEEDED only): the backend checks it, the host keeps it as it is
    result_json: str | None = None
    usage: Usage | None = None
    #: more lines for ``task["messages"]``, after ``outcome.message``
    notes: tuple[str, ...] = field(default=())
    traceback: str | None = None  #: logged by the host, never served
