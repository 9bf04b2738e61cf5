"""Every message that crosses a pipe, in both directions, and their codec.

Three channels carry these messages:

* parent -> task process: :class:`Start`, :class:`Cancel`;
* task process -> parent: :class:`Ready`, :class:`Progress`, :class:`StateChanged`,
  :class:`Note`, :class:`Finished`;
* parent <-> starter (a ``SOCK_SEQPACKET`` socket, file descriptors passed with
  ``SCM_RIGHTS``): :class:`Spawn`, :class:`Preload`, :class:`Stop` down and
  :class:`Exited` up.

Messages are pickled. The parent decodes what a child sends with
:func:`decode`, which refuses every class but the ones defined here: a task
process is untrusted-ish, and a crafted pickle must not run code in the
supervisor. Light imports only: the child and the starter import this module.
"""

from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass, field
from typing import Any

#: Upper bound of one encoded message read from a child (a 1 MiB result plus room).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Upper bound of a task result, JSON-encoded.
MAX_RESULT_BYTES = 1024 * 1024


_PROGRESS_FIELDS = ("percent_complete", "total_bytes", "offset_bytes", "transferred_bytes")


def check_progress(values: dict[str, Any]) -> dict[str, int]:
    """Validate ``set_progress`` keywords; percent is clamped to 0..100."""
    checked: dict[str, int] = {}
    for name, value in values.items():
        if name not in _PROGRESS_FIELDS:
            raise TypeError(f"set_progress() got an unexpected keyword argument {name!r}")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number")
        number = int(value)
        if name == "percent_complete":
            number = min(100, max(0, number))
        elif number < 0:
            raise ValueError(f"{name} must not be negative")
        checked[name] = number
    return checked


# -- parent -> task process ---------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Hand a task to a warm process."""

    task: dict[str, Any]
    animator: bytes  #: the pickled animator instance
    sys_path: tuple[str, ...]  #: the parent's sys.path at hand-over
    main_path: str | None  #: the parent's main script, when the animator lives in it
    max_memory: int | None  #: RLIMIT_AS in bytes


@dataclass(frozen=True)
class Cancel:
    """Ask the running task to stop (``TaskOps.is_canceled()`` turns true)."""


# -- task process -> parent ---------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """A warm process is up and waits for its :class:`Start`."""

    pid: int


@dataclass(frozen=True)
class Progress:
    """The latest progress figures (coalesced in the child)."""

    values: dict[str, int]
    timestamp: float  #: wall time in the child when the values were set


@dataclass(frozen=True)
class StateChanged:
    """The animator moved between ACTIVE and WAITING."""

    state: str


@dataclass(frozen=True)
class Note:
    """A free-text message of the animator, recorded in ``task["messages"]``."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The final report; the child exits right after sending it."""

    state: str  #: a terminal state name
    result_json: str | None = None  #: the JSON-encoded result (SUCCEEDED only)
    reason: str | None = None  #: why it FAILED or was CANCELED, one line
    traceback: str | None = None  #: formatted in the child, logged by the parent
    error_type: str | None = None  #: the exception's type name, if one ended it


# -- parent <-> starter -------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    """Fork one warm process on the pipe end passed alongside (SCM_RIGHTS)."""


@dataclass(frozen=True)
class Preload:
    """Import animator modules in the starter so that later forks inherit them."""

    modules: tuple[str, ...]
    sys_path: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class Stop:
    """Kill every process below the starter and exit."""


@dataclass(frozen=True)
class Exited:
    """A direct child of the starter was reaped, and any orphans it left killed.

    ``exitcode`` follows :attr:`multiprocessing.Process.exitcode`: negative is a signal.
    """

    pid: int
    exitcode: int


_CLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (Start, Cancel, Ready, Progress, StateChanged, Note, Finished,
                Spawn, Preload, Stop, Exited)
}


class ProtocolError(Exception):
    """Raised when bytes from a pipe are not a well-formed protocol message."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickle only the message classes of this module."""

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name in _CLASSES:
            return _CLASSES[name]
        raise ProtocolError(f"forbidden class {module}.{name} in a message")


def encode(message: object) -> bytes:
    """Turn a message into bytes for ``Connection.send_bytes``."""
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> object:
    """Turn bytes from an untrusted peer back into a message.

    Raises:
        ProtocolError: the bytes are not one of this module's messages.
    """
    try:
        message = _RestrictedUnpickler(io.BytesIO(data)).load()
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"undecodable message: {type(exc).__name__}: {exc}") from None
    if type(message).__name__ not in _CLASSES or type(message) is not _CLASSES[
        type(message).__name__
    ]:
        raise ProtocolError(f"not a protocol message: {type(message).__name__}")
    return message
