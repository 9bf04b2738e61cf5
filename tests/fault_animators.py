"""Misbehaving animators of the fault matrix (tests/test_faults.py), and ``register`` for a server.

``housekeeping serve --no-demo --animators fault_animators:register`` (run from
this directory, or with it on ``PYTHONPATH``) registers exactly what the
library half of the matrix registers, so both ways in face the same faults.
Task processes import this module by name: keep it light to import (a child
may run under a tight RLIMIT_AS).

Most animators announce themselves with a ``ready {json}`` message first (the
format of ``animators.ready_info``), carrying the task process's pid, so that a
test can check that nothing of the tree is alive once the task is terminal.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import time
from typing import Any

import animators

from supervisor import Animator, InvalidArguments
from supervisor.protocol import Finished, Note, encode

MiB = 1024**2

#: Events seen by :func:`raising_subscriber` in this process (before it raised).
RAISED: list[dict[str, Any]] = []

_LINGER = 10.0  # bounded, so that a fault the supervisor missed fails fast


def announce(ops: Any, **extra: Any) -> None:
    """Send ``ready {json}`` with the task process's pid and parent pid."""
    info = {"pid": animators.host_pid(), "ppid": animators.starter_pid(), **extra}
    ops.message("ready " + json.dumps(info))


def _args(ops: Any) -> dict[str, Any]:
    """The task's ``args`` as the child sees them."""
    return ops.task.get("args") or {}


def _linger(seconds: float = _LINGER) -> None:
    """Sleep in short steps, ignoring everything (a kill is what ends it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)


class Announced(Animator):
    """Announce the task process, then run the wrapped animator's ``execute``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def validate(self, create: dict[str, Any]) -> None:
        self.inner.validate(create)

    def execute(self, ops: Any) -> Any:
        announce(ops)
        return self.inner.execute(ops)


class AnnouncedAsync(Animator):
    """Announce the task process, then await the wrapped animator's async ``execute``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def execute(self, ops: Any) -> Any:
        announce(ops)
        return await self.inner.execute(ops)


class SysExit(Animator):
    """Call ``sys.exit(2)`` inside ``execute``."""

    def execute(self, ops: Any) -> Any:
        announce(ops)
        sys.exit(2)


class ClosePipe(Animator):
    """Close the task process's end of the pipe; then linger if ``args.linger``, and return."""

    def execute(self, ops: Any) -> Any:
        announce(ops)
        os.close(ops.pipe_fileno())
        if _args(ops).get("linger"):
            _linger()
        return "nobody hears this"


class _Exploit:
    """A pickle that would run ``touch args.marker`` in whoever unpickles it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _frame(message: object) -> bytes:
    """One well-formed frame on a task pipe: length, then the pickled message."""
    payload = encode(message)
    return struct.pack("!i", len(payload)) + payload


def garbage(kind: str, marker: str = "") -> bytes:
    """The bytes a :class:`Garbage` task writes to its pipe for ``kind``."""
    if kind == "length":  # "garb" read as a frame length: about 1.7 GB
        return b"garbage!"
    if kind == "undecodable":  # a well-formed frame whose payload is no pickle
        return struct.pack("!i", 4) + b"junk"
    if kind == "pickle":  # a well-formed frame whose pickle would run a command
        payload = pickle.dumps(_Exploit(marker))
        return struct.pack("!i", len(payload)) + payload
    if kind == "bad-final":  # a real protocol message with an impossible final state
        return _frame(Finished("ACTIVE"))
    raise ValueError(kind)


class Garbage(Animator):
    """Write a ``ready`` note and ``garbage(args.kind)`` in one ``os.write``; then linger.

    One write puts the valid note and the garbage in the parent's same read.
    The note's content also goes to the file ``args.infofile``, so that a test
    finds the task's pid even if the note is lost. With ``args.at_once`` the
    task returns at once instead of lingering.
    """

    def execute(self, ops: Any) -> Any:
        args = _args(ops)
        info = {"pid": animators.host_pid(), "ppid": animators.starter_pid()}
        with open(args["infofile"], "w") as f:
            json.dump(info, f)
        note = _frame(Note("ready " + json.dumps(info)))
        os.write(ops.pipe_fileno(), note + garbage(args["kind"], args.get("marker", "")))
        if not args.get("at_once"):
            _linger()
        return "garbage went unnoticed"


class ValidateRaises(Animator):
    """Raise an exception that is no ``InvalidArguments`` from ``validate``, per ``args.kind``."""

    def validate(self, create: dict[str, Any]) -> None:
        kind = (create.get("args") or {}).get("kind")
        if kind == "zero":
            _ = 1 / 0
        elif kind == "key":
            _ = {}["args.missing"]
        elif kind == "attribute":
            _ = create.get("objectId").upper()  # type: ignore[union-attr]
        elif kind == "empty":
            raise RuntimeError()
        elif kind == "invalid":
            raise InvalidArguments("args.kind says invalid")

    def execute(self, ops: Any) -> Any:
        return "validated"


def boom(event: dict[str, Any]) -> str:
    """What :func:`raising_subscriber` raises for ``event``: ``subscriber boom: METHOD ID vN``."""
    task = event.get("task") or {}
    meta = task.get("meta") or {}
    return f"subscriber boom: {event.get('method')} {meta.get('id')} v{meta.get('version')}"


def raising_subscriber(event: dict[str, Any]) -> None:
    """Record the event, then raise ``RuntimeError(boom(event))``."""
    RAISED.append(event)
    raise RuntimeError(boom(event))


#: operation -> (animator, register_animator keywords); the matrix's whole setup.
REGISTRY: dict[str, tuple[Animator, dict[str, Any]]] = {
    "QUICK": (animators.Quick(), {}),
    "SEGV": (Announced(animators.Segfault()), {}),
    "KILL": (Announced(animators.KillSelf()), {}),
    "EXIT": (Announced(animators.ExitThree()), {}),
    "SYSEXIT": (SysExit(), {}),
    "RAISE": (Announced(animators.Raise()), {}),
    "ARAISE": (AnnouncedAsync(animators.AsyncRaise()), {}),
    "BADRESULT": (Announced(animators.BadResult()), {}),
    "BIGRESULT": (Announced(animators.BigResult()), {}),
    "HOG": (Announced(animators.MemoryHog()), {"max_memory": 512 * MiB}),
    "TIMEOUT": (animators.Stubborn(), {"timeout": 1.0}),
    "STUBBORN": (animators.Stubborn(), {}),
    "COOP": (animators.Cooperative(), {}),
    "FORKER": (animators.Forker(), {}),
    "DAEMON": (animators.Daemon(), {}),
    "CLOSEPIPE": (ClosePipe(), {}),
    "GARBAGE": (Garbage(), {}),
    "VALIDATE": (ValidateRaises(), {}),
    "REJECT": (animators.Validating(), {}),
}


def register(manager: Any) -> None:
    """Register every operation of ``REGISTRY`` and subscribe :func:`raising_subscriber`."""
    for operation, (animator, limits) in REGISTRY.items():
        manager.register_animator(operation, animator, **limits)
    manager.subscribe(raising_subscriber)
