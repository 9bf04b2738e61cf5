"""The built-in demo animators: ``SLEEP`` and ``HASH``.

They exist so that a fresh ``housekeeping serve`` has something to run, and as
small, complete examples of an animator: cheap validation in the parent that
names the bad field, progress from the child, and cancel honoured promptly.

* ``SLEEP`` (:class:`Sleep`): waits ``args.seconds`` (default 1) in short
  steps, reporting the percentage elapsed.
* ``HASH`` (:class:`Hash`): SHA-256 over ``args.megabytes`` MiB (default 64)
  of generated data, reporting bytes hashed; a CPU-bound task.

Both say what they do on stdout and the digest comes as a ``logging`` record,
so a demo task's log (``housekeeping tasks logs ID``) has lines of both streams.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Protocol

from supervisor.animator import Animator
from supervisor.errors import InvalidAnimator, InvalidArguments
from supervisor.states import TaskState

if TYPE_CHECKING:
    from workers.ops import TaskOps

#: One mebibyte: the unit of ``args.megabytes`` and the chunk size of :class:`Hash`.
MIB = 1024 * 1024
#: The longest sleep :class:`Sleep` accepts (one day).
MAX_SLEEP_SECONDS = 86_400
#: The largest input :class:`Hash` accepts, in MiB.
MAX_HASH_MEGABYTES = 4096


class _Registry(Protocol):
    """What :func:`register` needs of a manager (``supervisor.Manager`` fits)."""

    def register_animator(self, operation: str, animator: Animator) -> object: ...


def register(manager: _Registry) -> None:
    """Register ``SLEEP`` and ``HASH`` with ``manager``.

    The server calls it unless started with ``--no-demo``; embedders may call it
    to get the same two operations.

    Args:
        manager: a ``supervisor.Manager`` (anything with ``register_animator``).
    """
    manager.register_animator("SLEEP", Sleep("SLEEP"))
    manager.register_animator("HASH", Hash("HASH"))


def hash_chunk() -> bytes:
    """Return the 1 MiB block that :class:`Hash` hashes over and over.

    Byte ``k`` of the input is ``k % 256``, so a test can rebuild the input
    without this module and check the digest with :mod:`hashlib`.
    """
    return bytes(range(256)) * (MIB // 256)


def _args(create: dict[str, Any]) -> dict[str, Any]:
    """Return ``create["args"]`` ({} when absent); it must be a JSON object."""
    args = create.get("args")
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise InvalidArguments("args must be an object")
    return args


class _Demo(Animator):
    """Shared check of the operation name (the original animators did the same)."""

    def __init__(self, operation: str | None = None) -> None:
        """Create the animator.

        Args:
            operation: the only operation this instance accepts; ``None`` accepts
                any, so the class can be registered under another name.
        """
        self.operation = operation

    def _check_operation(self, create: dict[str, Any]) -> None:
        """Raise InvalidAnimator when handed an operation this instance is not for."""
        if self.operation is not None and create.get("operation") != self.operation:
            raise InvalidAnimator(
                f"{type(self).__name__} handles {self.operation}, "
                f"not {create.get('operation')!r}"
            )


class Sleep(_Demo):
    """Sleep for ``args.seconds`` with progress; stop promptly on cancel.

    Returns ``{"seconds": <the seconds asked for>}``.
    """

    #: Longest single sleep between cancel checks and progress reports.
    step = 0.05

    def validate(self, create: dict[str, Any]) -> None:
        """Check ``args.seconds``: a number from 0 to 86400 (default 1).

        Raises:
            InvalidArguments: ``args`` is not an object or ``args.seconds`` is bad.
            InvalidAnimator: ``create["operation"]`` is not this instance's.
        """
        self._check_operation(create)
        seconds = _args(create).get("seconds", 1)
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not 0 <= seconds <= MAX_SLEEP_SECONDS  # NOTE: also rejects NaN
        ):
            raise InvalidArguments(
                f"args.seconds must be a number between 0 and {MAX_SLEEP_SECONDS}"
            )

    def execute(self, ops: TaskOps) -> dict[str, Any]:
        """Sleep in steps of at most :attr:`step`, reporting percent elapsed."""
        seconds = (ops.task.get("args") or {}).get("seconds", 1)
        print(f"sleeping {seconds:g} s")
        start = time.monotonic()
        deadline = start + seconds
        while True:
            if ops.is_canceled():
                ops.set_state(TaskState.CANCELED)
            now = time.monotonic()
            if now >= deadline:
                break
            ops.set_progress(percent_complete=math.floor(100 * (now - start) / seconds))
            time.sleep(min(self.step, deadline - now))
        ops.set_progress(percent_complete=100)
        print(f"slept {seconds:g} s")
        return {"seconds": seconds}


class Hash(_Demo):
    """SHA-256 over ``args.megabytes`` MiB of generated data: real CPU work.

    The input is :func:`hash_chunk` repeated, hashed one MiB at a time with a
    cancel check and a progress report after each. Returns
    ``{"digest": <hex>, "megabytes": <n>}``.
    """

    def validate(self, create: dict[str, Any]) -> None:
        """Check ``args.megabytes``: an integer from 1 to 4096 (default 64).

        Raises:
            InvalidArguments: ``args`` is not an object or ``args.megabytes`` is bad.
            InvalidAnimator: ``create["operation"]`` is not this instance's.
        """
        self._check_operation(create)
        megabytes = _args(create).get("megabytes", 64)
        if (
            isinstance(megabytes, bool)
            or not isinstance(megabytes, int)
            or not 1 <= megabytes <= MAX_HASH_MEGABYTES
        ):
            raise InvalidArguments(
                f"args.megabytes must be an integer between 1 and {MAX_HASH_MEGABYTES}"
            )

    def execute(self, ops: TaskOps) -> dict[str, Any]:
        """Hash chunk by chunk, reporting bytes done; the digest is the result."""
        megabytes: int = (ops.task.get("args") or {}).get("megabytes", 64)
        total = megabytes * MIB
        chunk = hash_chunk()
        digest = hashlib.sha256()
        print(f"hashing {megabytes} MiB")
        ops.set_progress(percent_complete=0, total_bytes=total, offset_bytes=0,
                         transferred_bytes=0)
        for done in range(MIB, total + 1, MIB):
            if ops.is_canceled():
                ops.set_state(TaskState.CANCELED)
            digest.update(chunk)
            ops.set_progress(
                percent_complete=100 * done // total,
                total_bytes=total,
                offset_bytes=done,
                transferred_bytes=done,
            )
        logging.getLogger("housekeeping.demo").info("sha256 %s", digest.hexdigest())
        return {"digest": digest.hexdigest(), "megabytes": megabytes}
