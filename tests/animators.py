"""Tiny module-level animators for the manager tests; most misbehave on purpose.

Task processes import this module by name, so it must stay importable from the
tests directory and light to import (a child may run under a tight RLIMIT_AS).
Animators that tests need to synchronise with send ``ready {json}`` as a task
message once they are set up; :func:`ready_info` reads it back.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from typing import Any

from supervisor import Animator, InvalidAnimator, InvalidArguments, TaskState

#: pids of the processes that ran ``Validating.validate`` (filled in the parent).
VALIDATED: list[int] = []

_FOREVER = 3600.0


def _args(ops: Any) -> dict[str, Any]:
    """The task's ``args`` as the child sees them."""
    return ops.task.get("args") or {}


def _ready(ops: Any, **extra: Any) -> None:
    """Tell the test that the task is set up, with its pid, parent pid and ``extra``."""
    info = {"pid": host_pid(), "ppid": starter_pid(), **extra}
    ops.message("ready " + json.dumps(info))


def ready_info(task: dict[str, Any]) -> dict[str, Any] | None:
    """The payload of a task's ``ready`` message, or None before it arrives."""
    for entry in task.get("messages") or []:
        text = entry.get("message", "")
        if text.startswith("ready "):
            return json.loads(text[len("ready "):])  # type: ignore[no-any-return]
    return None


def _sleep_until(deadline: float, ops: Any | None = None) -> bool:
    """Sleep in short steps until ``deadline``; True if ``ops`` reports a cancel first."""
    while time.monotonic() < deadline:
        if ops is not None and ops.is_canceled():
            return True
        time.sleep(0.01)
    return False


# -- well-behaved ----------------------------------------------------------------


class Quick(Animator):
    """Return the task's id and args at once."""

    def execute(self, ops: Any) -> Any:
        return {"id": ops.task["meta"]["id"], "args": _args(ops)}


class AsyncQuick(Animator):
    """Return at once from an ``async def execute``."""

    async def execute(self, ops: Any) -> Any:
        await asyncio.sleep(0)
        return {"async": True, "id": ops.task["meta"]["id"]}


class Cooperative(Animator):
    """Loop with progress for ``args.seconds`` (default: an hour), honouring cancel."""

    def execute(self, ops: Any) -> Any:
        seconds = float(_args(ops).get("seconds", _FOREVER))
        _ready(ops)
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            if ops.is_canceled():
                ops.set_state(TaskState.CANCELED)
            done = (time.monotonic() - start) / seconds
            ops.set_progress(percent_complete=int(done * 100))
            time.sleep(0.01)
        return {"slept": seconds}


class AsyncSleeper(Animator):
    """Await ``asyncio.sleep(args.seconds)`` (default: an hour)."""

    async def execute(self, ops: Any) -> Any:
        _ready(ops)
        await asyncio.sleep(float(_args(ops).get("seconds", _FOREVER)))
        return "slept"


class Talker(Animator):
    """Send ``args.count`` messages, then return."""

    def execute(self, ops: Any) -> Any:
        count = int(_args(ops).get("count", 1))
        for i in range(count):
            ops.message(f"note {i}")
        return count


class ProgressReport(Animator):
    """Report the progress given in ``args.progress`` as keywords, then return."""

    def execute(self, ops: Any) -> Any:
        ops.set_progress(**_args(ops)["progress"])
        return "reported"


class ProgressFlood(Animator):
    """Call ``set_progress`` ``args.n`` times in a hot loop; the last offset is n."""

    def execute(self, ops: Any) -> Any:
        n = int(_args(ops)["n"])
        for i in range(1, n + 1):
            ops.set_progress(percent_complete=i * 100 // n, offset_bytes=i)
        return n


class ProgressThenIdle(Animator):
    """Say "go", report progress 1 then 2 back to back, then idle until canceled."""

    def execute(self, ops: Any) -> Any:
        ops.message("go")
        ops.set_progress(percent_complete=1)
        ops.set_progress(percent_complete=2)
        while not ops.is_canceled():
            time.sleep(0.01)
        ops.set_state(TaskState.CANCELED)


class Waiting(Animator):
    """Go WAITING until the file ``args.gate`` exists, then ACTIVE again, then return."""

    def execute(self, ops: Any) -> Any:
        gate = _args(ops)["gate"]
        ops.set_state(TaskState.WAITING)
        while not os.path.exists(gate):
            if ops.is_canceled():
                ops.set_state(TaskState.CANCELED)
            time.sleep(0.01)
        ops.set_state(TaskState.ACTIVE)
        return "through the gate"


class EndWith(Animator):
    """Call ``set_state(args.state)``; execution must not go past it."""

    def execute(self, ops: Any) -> Any:
        ops.set_state(_args(ops)["state"])
        return "not reached"


class Validating(Animator):
    """Record the validating pid; reject per ``args.reject`` (value, invalid, animator)."""

    def validate(self, create: dict[str, Any]) -> None:
        VALIDATED.append(os.getpid())
        reject = (create.get("args") or {}).get("reject")
        if reject == "value":
            raise ValueError("args.reject says no")
        if reject == "invalid":
            raise InvalidArguments("args.reject is invalid")
        if reject == "animator":
            raise InvalidAnimator(f"{create.get('operation')} is not mine")
        if reject == "lookup":
            raise LookupError("args.reject: nothing to look up")

    def execute(self, ops: Any) -> Any:
        return "validated"


#: Called by ``Reentrant.validate`` when set (a test points it at the manager).
VALIDATE_HOOK: list[Any] = []


class Reentrant(Animator):
    """Call back into the manager from ``validate`` through ``VALIDATE_HOOK``."""

    def validate(self, create: dict[str, Any]) -> None:
        for hook in VALIDATE_HOOK:
            hook()

    def execute(self, ops: Any) -> Any:
        return "reentered"


class HoldsLock(Animator):
    """Carry a lock, so the instance cannot be pickled."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def execute(self, ops: Any) -> Any:
        return None


# -- crashes ---------------------------------------------------------------------


class Segfault(Animator):
    """Dereference NULL."""

    def execute(self, ops: Any) -> Any:
        import ctypes

        ctypes.string_at(0)


class KillSelf(Animator):
    """SIGKILL its own process."""

    def execute(self, ops: Any) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(_FOREVER)


class ExitThree(Animator):
    """Leave with ``os._exit(3)`` and no report."""

    def execute(self, ops: Any) -> Any:
        os._exit(3)


class LastWords(Animator):
    """Report progress and a message, then ``os._exit(3)`` at once."""

    def execute(self, ops: Any) -> Any:
        ops.set_progress(percent_complete=33)
        ops.set_progress(percent_complete=66)  # coalesced: sent with the message
        ops.message("last words")
        os._exit(3)


class Raise(Animator):
    """Raise RuntimeError("boom ...")."""

    def execute(self, ops: Any) -> Any:
        raise RuntimeError("boom " + str(_args(ops).get("text", "")))


class AsyncRaise(Animator):
    """Raise ValueError("async boom") after an await."""

    async def execute(self, ops: Any) -> Any:
        await asyncio.sleep(0)
        raise ValueError("async boom")


class BadResult(Animator):
    """Return a value that is not JSON, chosen by ``args.kind``."""

    def execute(self, ops: Any) -> Any:
        kind = _args(ops)["kind"]
        if kind == "lambda":
            return lambda: None
        if kind == "socket":
            return socket.socket()
        if kind == "set":
            return {1, 2, 3}
        if kind == "object":
            return {"fine": [1, 2], "bad": object()}
        raise AssertionError(kind)


class BigResult(Animator):
    """Return a string of ``args.size`` characters."""

    def execute(self, ops: Any) -> Any:
        return "x" * int(_args(ops)["size"])


class MemoryHog(Animator):
    """Allocate ``args.bytes`` bytes."""

    def execute(self, ops: Any) -> Any:
        data = bytearray(int(_args(ops)["bytes"]))
        return len(data)


# -- cancel ----------------------------------------------------------------------


class Stubborn(Animator):
    """Ignore SIGTERM and never look at cancel; return after ``args.seconds``."""

    def execute(self, ops: Any) -> Any:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _ready(ops)
        _sleep_until(time.monotonic() + float(_args(ops).get("seconds", _FOREVER)))
        return "survived"


class IgnoreCancel(Animator):
    """Notice the cancel, carry on for ``args.linger`` seconds, then return normally."""

    def execute(self, ops: Any) -> Any:
        _ready(ops)
        while not ops.is_canceled():
            time.sleep(0.01)
        time.sleep(float(_args(ops).get("linger", 0.2)))
        return "finished anyway"


# -- process trees ---------------------------------------------------------------


def _fork_sleeper() -> int:
    """Fork a bare child that sleeps; it keeps every inherited descriptor."""
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            time.sleep(_FOREVER)
        finally:
            os._exit(0)
    return pid


def _status(pid: int | str = "self") -> dict[str, list[str]]:
    """The fields of ``/proc/<pid>/status`` (``/proc`` is the host's: host pids)."""
    with open(f"/proc/{pid}/status") as f:
        return {key: value.split() for key, _, value in
                (line.partition(":") for line in f)}


def host_pid() -> int:
    """This process's pid in the outermost (host) PID namespace.

    ``os.getpid()`` is the pid in the process's own namespace (2 for a task
    in a PID namespace of its own); the first field of ``NSpid:`` in
    ``/proc/self/status`` is the host's, which is what a test sees.
    """
    return int(_status()["NSpid"][0])


def in_pid_namespace() -> bool:
    """True when this process is in a PID namespace below the host's."""
    return len(_status()["NSpid"]) > 1


def starter_pid() -> int:
    """The host pid of the starter: the parent, or in a PID namespace the init's parent.

    NOTE: ``PPid:`` of ``/proc/<pid>/status`` is given in the host's view.
    """
    parent = int(_status()["PPid"][0])
    if in_pid_namespace():
        parent = int(_status(parent)["PPid"][0])
    return parent


def host_child_pid(pid: int) -> int:
    """The host pid of a child that ``os.fork()`` returned as ``pid``."""
    if not in_pid_namespace():
        return pid
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            for child in f.read().split():  # host pids
                if int(_status(child)["NSpid"][-1]) == pid:
                    return int(child)
    raise RuntimeError(f"no child {pid}")


def _double_fork_daemon(pidfile: str, lifetime: float = _FOREVER) -> int:
    """Start a daemon (fork, setsid, fork again) that lives ``lifetime`` seconds unless
    killed; return its host pid (see :func:`host_pid`), read from ``pidfile``."""
    first = os.fork()
    if first == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                with open(pidfile + ".tmp", "w") as f:
                    f.write(str(host_pid()))
                os.rename(pidfile + ".tmp", pidfile)
                time.sleep(lifetime)
        finally:
            os._exit(0)
    os.waitpid(first, 0)
    deadline = time.monotonic() + 30
    while not os.path.exists(pidfile):
        if time.monotonic() > deadline:
            raise RuntimeError("the daemon never wrote its pid file")
        time.sleep(0.005)
    with open(pidfile) as f:
        return int(f.read())


def _then(ops: Any, mode: str) -> Any:
    """Finish a tree-building task: ``wait`` for cancel, ``return``, or ``crash``.

    With ``args.gate``, ``return`` and ``crash`` first wait for that file to exist.
    """
    gate = _args(ops).get("gate")
    while mode != "wait" and gate and not os.path.exists(gate):
        time.sleep(0.005)
    if mode == "return":
        return "left them behind"
    if mode == "crash":
        os._exit(1)
    while not ops.is_canceled():
        time.sleep(0.01)
    ops.set_state(TaskState.CANCELED)


class Forker(Animator):
    """Start ``sleep 3600`` and a forked sleeper, report their pids, then ``args.mode``."""

    def execute(self, ops: Any) -> Any:
        import subprocess

        popen = subprocess.Popen(["sleep", "3600"])
        forked = _fork_sleeper()
        _ready(ops, children=[host_child_pid(popen.pid), host_child_pid(forked)])
        return _then(ops, _args(ops).get("mode", "wait"))


class Daemon(Animator):
    """Double-fork a setsid daemon (pid written to ``args.pidfile``), then ``args.mode``."""

    def execute(self, ops: Any) -> Any:
        daemon = _double_fork_daemon(_args(ops)["pidfile"])
        _ready(ops, children=[daemon])
        return _then(ops, _args(ops).get("mode", "wait"))


class RunCounter(Animator):
    """Append a line to ``args.file`` per run, then idle until canceled.

    Shows whether a task was run twice (a backend that re-runs work after a crash).
    """

    def execute(self, ops: Any) -> Any:
        with open(_args(ops)["file"], "a") as f:
            f.write(f"{os.getpid()}\n")
        _ready(ops)
        while not ops.is_canceled():
            time.sleep(0.01)
        ops.set_state(TaskState.CANCELED)


class RerunOnce(Animator):
    """Idempotent work that opts in to a re-run: the first run waits forever (for the
    test to kill its Dask worker), the second returns how many runs there were."""

    rerun_on_worker_loss = True

    def execute(self, ops: Any) -> Any:
        path = _args(ops)["file"]
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        with open(path) as f:
            runs = len(f.read().splitlines())
        if runs > 1:
            return {"runs": runs}
        _ready(ops)
        while not ops.is_canceled():
            time.sleep(0.01)
        ops.set_state(TaskState.CANCELED)


# -- task output (the REST log tests) --------------------------------------------------


class GatedWriter(Animator):
    """Write each ``[stream, text]`` of ``args.lines`` as a line of its own; after line
    ``i`` wait for the file ``<args.gate>/<i>`` (the test's go-ahead), honouring cancel."""

    def execute(self, ops: Any) -> Any:
        args = _args(ops)
        for index, (stream, text) in enumerate(args["lines"]):
            os.write(1 if stream == "stdout" else 2, text.encode() + b"\n")
            while not os.path.exists(os.path.join(args["gate"], str(index))):
                if ops.is_canceled():
                    ops.set_state(TaskState.CANCELED)
                time.sleep(0.01)
        return len(args["lines"])


def register_logs(manager: Any) -> None:
    """Register the writers of the REST log tests; for ``serve --animators animators:...``."""
    import log_animators

    manager.register_animator("GATED", GatedWriter())
    manager.register_animator("PRINTER", log_animators.Printer())
    manager.register_animator("FLOOD", log_animators.Flood())
    manager.register_animator("RAW", log_animators.RawBytes())
