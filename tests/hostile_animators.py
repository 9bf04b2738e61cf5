"""Hostile task processes for tests/test_hostile.py, and ``register`` for a server.

Each animator here attacks the boundary between its task process and the
supervisor: it forks a helper that speaks in its name, writes raw frames on
its pipe (a final report it does not mean, a result that is no strict JSON, a
NaN timestamp, a flood), or stops or kills its own starter.
``housekeeping serve --no-demo --animators hostile_animators:register`` (run
from this directory) registers exactly what the library tests register.

Raw frames use the documented wire format of a task pipe
(``supervisor.protocol.frame``: a 4-byte big-endian length, then the pickled
message). Pids are announced as the host sees them (:func:`host_pid`), so
that a test's process checks stay right when a task runs in a PID namespace
of its own. Every linger is bounded, so that a fault the supervisor misses
fails the test fast instead of hanging it; a task that signals its starter
first checks that the process is one (:func:`check_starter`), so that a
broken setup fails the test instead of harming the machine.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import sys
import time
from typing import Any

import animators
from animators import host_child_pid, host_pid, starter_pid

from supervisor import Animator, Sandbox, TaskState
from supervisor.linux import PR_SET_CHILD_SUBREAPER, prctl
from supervisor.protocol import Finished, Note, Progress, frame

MiB = 1024**2
#: setsockopt option that may exceed ``net.core.wmem_max`` (needs CAP_NET_ADMIN).
SO_SNDBUFFORCE = 32

#: How long a hostile task lingers after its attack (the supervisor must end it first).
LINGER = 20.0
#: How long a daemon left by :class:`EscapeStarter` lives if nobody kills it, and a
#: :class:`Patient` task if nobody cancels it.
DAEMON_LIFE = 60.0


def _args(ops: Any) -> dict[str, Any]:
    """The task's ``args`` as the child sees them."""
    return ops.task.get("args") or {}


def ready_text(**extra: Any) -> str:
    """A ``ready {json}`` message (``animators.ready_info`` reads it) with host pids."""
    info = {"pid": host_pid(), "ppid": starter_pid(), **extra}
    return "ready " + json.dumps(info)


def announce(ops: Any, **extra: Any) -> None:
    """Send ``ready {json}`` through the task's own API."""
    ops.message(ready_text(**extra))


def write_raw(ops: Any, data: bytes) -> None:
    """Write ``data`` on the task's pipe behind the API's back, all of it.

    The pipe is a blocking socket: a small write goes out whole in one
    ``os.write``; a big one may be taken in parts, so loop until it is all out.
    """
    fd = ops.pipe_fileno()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def widen_send_buffer(ops: Any, size: int) -> None:
    """Let the pipe hold ``size`` bytes unread, so that a write of that much returns
    before the parent read it (root may go past ``net.core.wmem_max``)."""
    sock = socket.socket(fileno=os.dup(ops.pipe_fileno()))
    try:
        for option in (SO_SNDBUFFORCE, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, size)
                return
    finally:
        sock.close()


def write_info(path: str | None, text: str) -> None:
    """Also put the ``ready`` payload in a file, for when the message itself is lost."""
    if path:
        with open(path, "w") as f:
            f.write(text[len("ready "):])


def linger(seconds: float = LINGER) -> None:
    """Sleep in short steps, looking at nothing; only a kill ends it early."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)


def wait_for_file(path: str, seconds: float = 10.0) -> None:
    """Wait until ``path`` exists (a test's go-ahead).

    Raises:
        RuntimeError: it did not appear within ``seconds``.
    """
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {seconds:g} s")
        time.sleep(0.005)


def check_starter(pid: int) -> None:
    """Refuse to go on unless ``pid`` is a starter (``workers.starter`` in its command line).

    Raises:
        RuntimeError: it is something else; signalling it could harm the machine.
    """
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read()
    if b"workers.starter" not in cmdline:
        raise RuntimeError(f"process {pid} is not a starter: {cmdline[:200]!r}")


def _fork_sleeper() -> int:
    """Fork a child that lingers (part of the tree the supervisor must kill)."""
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            linger()
        finally:
            os._exit(0)
    return pid


# -- a well-behaved task, for company ----------------------------------------------


class Patient(Animator):
    """Announce, then wait for a cancel and honour it (bounded: return after a minute)."""

    def execute(self, ops: Any) -> Any:
        announce(ops)
        deadline = time.monotonic() + DAEMON_LIFE
        while time.monotonic() < deadline:
            if ops.is_canceled():
                ops.set_state(TaskState.CANCELED)
            time.sleep(0.01)
        return "nobody canceled"


# -- a helper speaks in the task's name ---------------------------------------------


class HelperExits(Animator):
    """Fork a helper that calls ``sys.exit(0)``, while the task process lingers.

    The helper is a copy of the task process inside ``execute``, so its
    ``SystemExit`` ends up in the child's report handler: before the fix it
    sent a final report (FAILED "SystemExit: 0") that was taken as the task's
    outcome, and a report switched the timeout off.
    """

    def execute(self, ops: Any) -> Any:
        helper = os.fork()
        if helper == 0:
            sys.exit(0)
        announce(ops, children=[host_child_pid(helper)])
        linger()
        return "outlived the timeout"


# -- raw frames ----------------------------------------------------------------------


class RawFinished(Animator):
    """Write ``ready`` and a raw ``Finished("SUCCEEDED")`` in one write, then linger.

    A sleeper child is forked first (so there is a tree to kill) and SIGTERM
    is ignored: the report is a claim, the process must still go.
    """

    def execute(self, ops: Any) -> Any:
        sleeper = _fork_sleeper()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        final = Finished(TaskState.SUCCEEDED.value, result_json=json.dumps({"raw": True}))
        write_raw(ops, frame(Note(ready_text(children=[host_child_pid(sleeper)]))) + frame(final))
        linger()
        return "not the outcome"


def bad_result(kind: str) -> str:
    """The ``result_json`` of a :class:`RawResult` task for ``kind``."""
    if kind == "not-json":
        return "this is {not JSON"
    if kind == "deep":
        return "[" * 100_000 + "]" * 100_000
    if kind == "nan":
        return '{"x": NaN}'
    if kind == "huge":  # valid JSON, three times the result limit
        return json.dumps("x" * (3 * MiB - 2))
    if kind == "overflow":  # a number no float can hold
        return '{"x": 1e400}'
    if kind == "escaped":  # under the limit as sent, 4.8 MB once escaped as ASCII
        return json.dumps("\U0001f600" * 400_000, ensure_ascii=False)
    if kind == "lines":  # valid JSON with line breaks between its tokens
        return '{"a":\n1,\r"event": "x"}'
    if kind == "fieldless":  # a Finished without its fields: ``result_json`` missing
        return ""
    raise ValueError(kind)


class RawResult(Animator):
    """Write ``ready`` and a raw ``Finished`` whose ``result_json`` is ``bad_result(args.kind)``.

    Both go in one write, with ``args.padding`` valid Progress frames between
    them (work for the parent's parser); then the task lingers (``args.then``
    "linger"), returns (its real final report following the raw one:
    "return") or leaves with ``os._exit(0)`` at once ("exit").
    """

    def execute(self, ops: Any) -> Any:
        args = _args(ops)
        text = ready_text()
        write_info(args.get("infofile"), text)
        now = time.time()
        padding = b"".join(frame(Progress({"offset_bytes": i}, now))
                           for i in range(int(args.get("padding", 0))))
        final = Finished(TaskState.SUCCEEDED.value, result_json=bad_result(args["kind"]))
        if args["kind"] == "fieldless":
            final = Finished.__new__(Finished)
        data = frame(Note(text)) + padding + frame(final)
        if args.get("then") == "exit":
            widen_send_buffer(ops, len(data))
        write_raw(ops, data)
        then = args.get("then", "linger")
        if then == "linger":
            linger()
        elif then == "exit":
            os._exit(0)
        return "the real result"


class NanProgress(Animator):
    """Write ``ready`` and a ``Progress`` stamped NaN (or ``args.stamp``: "huge", an
    int no float can hold) in one ``os.write``; then linger."""

    def execute(self, ops: Any) -> Any:
        text = ready_text()
        write_info(_args(ops).get("infofile"), text)
        stamp = 10**400 if _args(ops).get("stamp") == "huge" else math.nan
        data = frame(Note(text)) + frame(Progress({"percent_complete": 50}, stamp))
        written = os.write(ops.pipe_fileno(), data)
        assert written == len(data), f"one write took {written} of {len(data)} bytes"
        linger()
        return "NaN went unnoticed"


#: The ``offset_bytes`` of a :class:`ProgressFlood` task's last report.
FLOOD_LAST = 987_654_321


class ProgressFlood(Animator):
    """Write ``args.frames`` raw ``Progress`` frames as fast as the pipe takes them.

    Then one last Progress (``percent_complete`` 100, ``offset_bytes``
    :data:`FLOOD_LAST`) and a ``flooded {json}`` message with the count and
    the seconds it took; then wait (bounded) for a cancel and honour it, or
    return when nobody cancels.
    """

    def execute(self, ops: Any) -> Any:
        count = int(_args(ops).get("frames", 300_000))
        notes = _args(ops).get("what") == "notes"  # Note frames instead of Progress
        announce(ops)
        started = time.monotonic()
        batch = 1000
        for first in range(0, count, batch):
            now = time.time()
            write_raw(ops, b"".join(
                frame(Note(f"note {i}") if notes else
                      Progress({"percent_complete": i * 100 // count, "offset_bytes": i}, now))
                for i in range(first, min(first + batch, count))
            ))
        write_raw(ops, frame(Progress({"percent_complete": 100, "offset_bytes": FLOOD_LAST},
                                      time.time())))
        elapsed = time.monotonic() - started
        write_raw(ops, frame(Note("flooded " + json.dumps({"frames": count,
                                                           "seconds": elapsed}))))
        deadline = time.monotonic() + LINGER
        while time.monotonic() < deadline:
            if ops.is_canceled():
                ops.set_state(TaskState.CANCELED)
            time.sleep(0.01)
        return {"frames": count}


# -- the starter ---------------------------------------------------------------------


class StopStarter(Animator):
    """Stop the starter (SIGSTOP; it checks that its parent is one first), then linger."""

    def execute(self, ops: Any) -> Any:
        starter = os.getppid()
        check_starter(starter)
        announce(ops, starter=starter)
        os.kill(starter, signal.SIGSTOP)
        linger()
        return "the starter was stopped and nobody noticed"


class EscapeStarter(Animator):
    """Escape both subreapers below the supervisor, then SIGKILL the starter.

    The task process stops being a child subreaper, so its daemon (a
    ``setsid`` double fork, pid in ``args.pidfile``) is re-parented to the
    starter; killing the starter (checked to be one) sends the daemon further
    up, to whatever subreaper is above the starter, or to PID 1. The kill
    waits for the file ``args.gate`` (bounded), so that a test can look at
    the daemon first.
    """

    def execute(self, ops: Any) -> Any:
        starter = os.getppid()
        check_starter(starter)
        prctl(PR_SET_CHILD_SUBREAPER, 0)
        daemon = animators._double_fork_daemon(_args(ops)["pidfile"], DAEMON_LIFE)
        announce(ops, children=[daemon], starter=starter)
        wait_for_file(_args(ops)["gate"])
        os.kill(starter, signal.SIGKILL)
        linger()
        return "the starter was killed and nobody noticed"


#: operation -> (animator, register_animator keywords); the whole setup.
REGISTRY: dict[str, tuple[Animator, dict[str, Any]]] = {
    "QUICK": (animators.Quick(), {}),
    "PATIENT": (Patient(), {}),
    "HELPER_EXIT": (HelperExits(), {"timeout": 3}),
    "RAW_FINISHED": (RawFinished(), {}),
    "RAW_RESULT": (RawResult(), {}),
    "NAN_PROGRESS": (NanProgress(), {}),
    "FLOOD": (ProgressFlood(), {}),
    # NOTE: these two reach the starter, which a PID namespace hides (see
    # test_containment.py); here they test the fallback without one.
    "STOP_STARTER": (StopStarter(), {"sandbox": Sandbox(private_pids=False)}),
    "ESCAPE": (EscapeStarter(), {"sandbox": Sandbox(private_pids=False)}),
}


def register(manager: Any) -> None:
    """Register every operation of ``REGISTRY``."""
    for operation, (animator, limits) in REGISTRY.items():
        manager.register_animator(operation, animator, **limits)
