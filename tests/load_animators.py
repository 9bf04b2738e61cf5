"""Animators of the load test (``--animators load_animators:register``) and the soak test.

Task processes import this module by name: it stays light and imports nothing
from pytest. Load operations (the server registers them):

* ``LQUICK``: returns ``{"pid": ...}`` at once;
* ``LSLOW``: runs ``args.seconds`` (0 < s <= 30, default 0.5) with progress
  every 0.1 s, and honours cancel (CANCELED);
* ``LFAIL``: raises ``RuntimeError("load failure")``.

Soak operations (:func:`register_soak`) first report their process as a task
message ``pid <pid> <starttime>`` (``starttime`` from ``/proc/<pid>/stat``,
so a reused pid is told apart), then:

* ``SQUICK`` returns; ``SFAIL`` raises; ``SEXIT`` calls ``os._exit(3)``;
  ``SKILL`` sends itself SIGKILL;
* ``SCANCEL`` waits for the cancel and honours it;
* ``SSTUBBORN`` ignores the cancel, so it is killed after the cancel grace.

The waiting ones give up after a minute, so none can run forever.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from animators import host_pid

from supervisor import Animator, InvalidArguments, TaskState

#: The longest any of these animators waits for something (seconds).
GIVE_UP = 60.0
#: What ``LFAIL`` and ``SFAIL`` raise.
LOAD_FAILURE = "load failure"
SOAK_FAILURE = "soak failure"


def _args(ops: Any) -> dict[str, Any]:
    return ops.task.get("args") or {}


def proc_starttime(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks), None if gone."""
    stat = proc_stat(pid)
    return None if stat is None else stat[1]


def proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state letter, starttime)`` of a process from ``/proc/<pid>/stat``, None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces
    return fields[0], int(fields[19])


def parse_pid_note(task: dict[str, Any]) -> tuple[int, int] | None:
    """``(pid, starttime)`` from a task's ``pid ...`` message, None if it has none."""
    for entry in task.get("messages") or []:
        text = entry.get("message", "")
        if text.startswith("pid "):
            _, pid, start = text.split()
            return int(pid), int(start)
    return None


# -- load ----------------------------------------------------------------------------


class LoadQuick(Animator):
    """Return the task process's pid at once."""

    def execute(self, ops: Any) -> Any:
        return {"pid": host_pid()}


class LoadSlow(Animator):
    """Run ``args.seconds`` with progress; honour a cancel."""

    def validate(self, create: dict[str, Any]) -> None:
        seconds = (create.get("args") or {}).get("seconds", 0.5)
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not (
            0 < seconds <= 30
        ):
            raise InvalidArguments("args.seconds must be a number in (0, 30]")

    def execute(self, ops: Any) -> Any:
        seconds = float(_args(ops).get("seconds", 0.5))
        start = time.monotonic()
        next_report = start
        while (now := time.monotonic()) - start < seconds:
            if ops.is_canceled():
                ops.set_state(TaskState.CANCELED)
            if now >= next_report:
                ops.set_progress(percent_complete=int((now - start) / seconds * 100))
                next_report = now + 0.1
            time.sleep(0.01)
        return {"slept": seconds}


class LoadFail(Animator):
    """Raise at once."""

    def execute(self, ops: Any) -> Any:
        raise RuntimeError(LOAD_FAILURE)


def register(manager: Any) -> None:
    """Register ``LQUICK``, ``LSLOW`` and ``LFAIL`` (the server's ``--animators`` hook)."""
    manager.register_animator("LQUICK", LoadQuick())
    manager.register_animator("LSLOW", LoadSlow())
    manager.register_animator("LFAIL", LoadFail())


# -- soak ----------------------------------------------------------------------------


def _report_pid(ops: Any) -> None:
    pid = host_pid()  # NOTE: the host's view: in a PID namespace getpid() is 2
    ops.message(f"pid {pid} {proc_starttime(pid)}")


class SoakQuick(Animator):
    """Report the pid, return."""

    def execute(self, ops: Any) -> Any:
        _report_pid(ops)
        return "done"


class SoakFail(Animator):
    """Report the pid, raise."""

    def execute(self, ops: Any) -> Any:
        _report_pid(ops)
        raise RuntimeError(SOAK_FAILURE)


class SoakExit(Animator):
    """Report the pid, leave with ``os._exit(3)`` and no report."""

    def execute(self, ops: Any) -> Any:
        _report_pid(ops)
        os._exit(3)


class SoakKill(Animator):
    """Report the pid, SIGKILL itself."""

    def execute(self, ops: Any) -> Any:
        _report_pid(ops)
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(GIVE_UP)


class SoakCancel(Animator):
    """Report the pid, wait for the cancel, honour it."""

    def execute(self, ops: Any) -> Any:
        _report_pid(ops)
        deadline = time.monotonic() + GIVE_UP
        while time.monotonic() < deadline:
            if ops.is_canceled():
                ops.set_state(TaskState.CANCELED)
            time.sleep(0.005)
        return "never canceled"


class SoakStubborn(Animator):
    """Report the pid, never look at the cancel (killed after the grace period)."""

    def execute(self, ops: Any) -> Any:
        _report_pid(ops)
        deadline = time.monotonic() + GIVE_UP
        while time.monotonic() < deadline:
            time.sleep(0.005)
        return "never killed"


SOAK_ANIMATORS: dict[str, type[Animator]] = {
    "SQUICK": SoakQuick,
    "SFAIL": SoakFail,
    "SEXIT": SoakExit,
    "SKILL": SoakKill,
    "SCANCEL": SoakCancel,
    "SSTUBBORN": SoakStubborn,
}


def register_soak(manager: Any) -> None:
    """Register the ``S*`` operations above."""
    for operation, animator in SOAK_ANIMATORS.items():
        manager.register_animator(operation, animator())
