"""Every message that crosses a pipe, in both directions, and their codec.

Three channels carry these messages:

* parent -> task process: :class:`Start`, :class:`Cancel`;
* task process -> parent: :class:`Ready`, :class:`Progress`, :class:`StateChanged`,
  :class:`Note`, :class:`Finished`;
* parent <-> starter (a ``SOCK_SEQPACKET`` socket, file descriptors passed with
  ``SCM_RIGHTS``): :class:`Spawn`, :class:`Preload`, :class:`Ping`,
  :class:`Stop` down and :class:`Exited`, :class:`SpawnFailed`, :class:`Pong` up.

The wire format of a task pipe, kept stable (tests of hostile tasks write raw
frames with it): each message is one *frame*, a 4-byte big-endian signed
length followed by that many bytes of payload (:func:`frame`; the format of
``multiprocessing.connection``), and the payload is :func:`encode` of one of
the message classes here. Starter messages are one payload per
``SOCK_SEQPACKET`` packet, without the length.

Everything a task process sends is untrusted. The parent decodes it with
:func:`decode`, which refuses every class but the ones defined here (a crafted
pickle must not run code in the supervisor), and then checks every field with
:func:`check_report` (types, sizes, finiteness, a strict result JSON) before
anything reaches the table. Light imports only: the child and the starter
import this module.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import struct
from dataclasses import dataclass, field
from typing import Any

from supervisor.outcome import REPORTABLE, OutcomeKind

#: Upper bound of one encoded message read from a child (a 1 MiB result plus room).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Upper bound of a task result, JSON-encoded.
MAX_RESULT_BYTES = 1024 * 1024
#: Deepest nesting of arrays and objects in a result (and in a create body).
MAX_JSON_DEPTH = 64
#: Longest note, failure reason or error type name kept from a child (characters).
MAX_TEXT = 4096
#: Longest traceback kept from a child (characters).
MAX_TRACEBACK = 64 * 1024
#: The frame header: the payload's length, 4 bytes, big-endian, signed.
FRAME_HEADER = struct.Struct("!i")
#: Latest wall-clock timestamp a child may report (the year 9999 ends there).
_LAST_TIMESTAMP = 253402300799.0


#: Largest byte count in a progress report (a signed 64-bit integer).
_MAX_PROGRESS = 2**63 - 1
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
        elif number > _MAX_PROGRESS:
            raise ValueError(f"{name} must be at most {_MAX_PROGRESS}")
        checked[name] = number
    return checked


# -- parent -> task process ---------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Hand a task to a warm process."""

    task_json: bytes  #: the task's wire form as JSON (the child decodes it)
    animator: bytes  #: the pickled animator instance
    sys_path: tuple[str, ...]  #: the parent's sys.path at hand-over
    main_path: str | None  #: the parent's main script, when the animator lives in it
    max_memory: int | None  #: RLIMIT_AS in bytes
    #: the rest of the sandbox, applied by the task process before the animator runs
    uid: int | None = None  #: setuid to this (with ``gid``, no supplementary groups)
    gid: int | None = None
    max_processes: int | None = None  #: RLIMIT_NPROC
    max_cpu_seconds: int | None = None  #: RLIMIT_CPU (soft; the hard limit is one more)
    max_open_files: int | None = None  #: RLIMIT_NOFILE
    no_new_privs: bool = False  #: PR_SET_NO_NEW_PRIVS, and no capabilities at all


@dataclass(frozen=True)
class Cancel:
    """Ask the running task to stop (``TaskOps.is_canceled()`` turns true)."""


# -- task process -> parent ---------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """A warm process is up and waits for its :class:`Start` (sent before any task code
    runs, so it can be believed)."""

    pid: int  #: as the host sees it
    init_pid: int = 0  #: the host pid of the init in front of it, in a PID namespace


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
    #: the :class:`~supervisor.outcome.OutcomeKind` it claims, one of ``REPORTABLE``
    kind: str | None = None


# -- parent <-> starter -------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    """Fork one warm process on the fds passed alongside (SCM_RIGHTS): its pipe end,
    then the write ends of its stdout and stderr."""

    token: int = 0  #: named again by :class:`SpawnFailed` and :class:`Exited`
    private_pids: bool = False  #: fork it behind an init of a new PID namespace
    private_network: bool = False  #: ...with a network namespace of its own


@dataclass(frozen=True)
class SpawnFailed:
    """The starter's ``fork()`` failed (EAGAIN, ENOMEM); the parent retries later."""

    token: int
    error: str


@dataclass(frozen=True)
class Ping:
    """Are you alive? The starter answers :class:`Pong` with the same number."""

    seq: int


@dataclass(frozen=True)
class Pong:
    """The starter's answer to :class:`Ping`."""

    seq: int


@dataclass(frozen=True)
class Preload:
    """Import animator modules (and the main script of an animator defined in
    ``__main__``) in the starter so that later forks inherit them."""

    modules: tuple[str, ...]
    sys_path: tuple[str, ...] = field(default=())
    main_path: str | None = None


@dataclass(frozen=True)
class Stop:
    """Kill every process below the starter and exit."""


@dataclass(frozen=True)
class Exited:
    """A direct child of the starter was reaped, and any orphans it left killed.

    ``exitcode`` follows :attr:`multiprocessing.Process.exitcode`: negative is a signal.
    """

    pid: int  #: the starter's child: the task process, or the init in front of it
    exitcode: int  #: the task process's (an init passes its task process's on)
    token: int = 0  #: the :class:`Spawn` it came from
    #: ``(user CPU s, system CPU s, peak RSS bytes)`` of the task process and of
    #: every process its reaper reaped for it (``wait4``), if known
    usage: tuple[float, float, int] | None = None


_CLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (Start, Cancel, Ready, Progress, StateChanged, Note, Finished,
                Spawn, SpawnFailed, Ping, Pong, Preload, Stop, Exited)
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


def frame(message: object) -> bytes:
    """Turn a message into one whole frame of a task pipe (header and payload)."""
    payload = encode(message)
    return FRAME_HEADER.pack(len(payload)) + payload


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


# -- checks of what a task process sends ----------------------------------------


def clean_text(value: object, limit: int = MAX_TEXT) -> str:
    """Return ``value`` as a string of at most ``limit`` characters that encodes as UTF-8.

    Raises:
        ProtocolError: ``value`` is not a string.
    """
    if not isinstance(value, str):
        raise ProtocolError(f"expected a string, got {type(value).__name__}")
    text = value[:limit]
    if not text.isascii():
        # NOTE: a lone surrogate ("\ud800") survives pickle but not UTF-8; it
        # would make every later JSON answer that shows it fail.
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _optional_text(value: object, limit: int) -> str | None:
    return None if value is None else clean_text(value, limit)


def json_depth(value: Any) -> int:
    """Return the nesting depth of a parsed JSON value (a scalar is 0), iteratively.

    NOTE: a container without containers in it is skipped at C speed (the
    set of its items' types), so a long flat list costs milliseconds.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if _CONTAINERS.isdisjoint(set(map(type, children))):
            continue
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


_CONTAINERS = frozenset({dict, list})


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def finite_float(text: str) -> float:
    """``parse_float`` of strict JSON: a number beyond a float (``1e400``) is refused."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def check_result_json(text: object) -> str:
    """Check a result's JSON text strictly; return it in a form safe to serve.

    Strict means: a string of at most :data:`MAX_RESULT_BYTES`, valid JSON
    without ``NaN``/``Infinity`` or numbers beyond a float, nested at most
    :data:`MAX_JSON_DEPTH` deep. The text returned is ASCII on one line (it is
    spliced into event-stream lines): as given if it already is, else
    re-encoded compactly, and then at most :data:`MAX_RESULT_BYTES` too.

    Raises:
        ProtocolError: naming what is wrong.
    """
    if not isinstance(text, str):
        raise ProtocolError(f"result_json is {type(text).__name__}, not a string")
    if len(text) > MAX_RESULT_BYTES:
        raise ProtocolError(f"result of {len(text)} characters (limit {MAX_RESULT_BYTES})")
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=finite_float)
    except RecursionError:
        raise ProtocolError(f"result nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as exc:
        raise ProtocolError(f"result is not strict JSON: {str(exc)[:200]}") from None
    # NOTE: counting brackets is an upper bound of the depth at C speed; walk
    # the value only when it could be too deep.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and json_depth(value) > MAX_JSON_DEPTH:
        raise ProtocolError(f"result nested more than {MAX_JSON_DEPTH} levels deep")
    if not text.isascii() or "\n" in text or "\r" in text:
        # NOTE: escapes non-ASCII (lone surrogates included), drops the line breaks
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
        if len(text) > MAX_RESULT_BYTES:
            raise ProtocolError(f"result of {len(text)} bytes of JSON once escaped "
                                f"(limit {MAX_RESULT_BYTES})")
    return text


def check_timestamp(value: object) -> float:
    """Check a wall-clock timestamp from a child: a finite number of seconds since 1970."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"timestamp is {type(value).__name__}, not a number")
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        raise ProtocolError(f"timestamp {repr(value)[:40]} is out of range") from None
    if not 0.0 <= number <= _LAST_TIMESTAMP:  # NaN fails this too
        raise ProtocolError(f"timestamp {repr(value)[:40]} is out of range")
    return number


_TERMINAL_NAMES = frozenset({"CANCELED", "FAILED", "SUCCEEDED"})
_RUNNING_NAMES = frozenset({"ACTIVE", "WAITING"})


def check_report(message: object) -> object:
    """Check a decoded message from a task process; return it with safe fields.

    Raises:
        ProtocolError: the message is not one a task process may send, or a
            field has the wrong type, size or value.
    """
    try:
        if isinstance(message, Progress):
            if not isinstance(message.values, dict):
                raise ProtocolError("progress values are not a dict")
            return Progress(check_progress(message.values), check_timestamp(message.timestamp))
        if isinstance(message, StateChanged):
            if message.state not in _RUNNING_NAMES:
                raise ProtocolError(f"bad state {message.state!r}"[:200])
            return message
        if isinstance(message, Note):
            return Note(clean_text(message.text))
        if isinstance(message, Finished):
            return _check_finished(message)
        if isinstance(message, Ready):
            for pid in (message.pid, message.init_pid):
                if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
                    raise ProtocolError(f"bad pid {pid!r}"[:200])
            if message.pid < 1:
                raise ProtocolError(f"bad pid {message.pid!r}")
            return message
    except ProtocolError:
        raise
    except Exception as exc:  # NOTE: any field may be missing or of any type
        raise ProtocolError(f"bad {type(message).__name__}: "
                            f"{type(exc).__name__}: {exc}"[:300]) from None
    raise ProtocolError(f"a task process may not send {type(message).__name__}")


def _check_finished(message: Finished) -> Finished:
    if message.state not in _TERMINAL_NAMES:
        raise ProtocolError(f"bad final state {message.state!r}"[:200])
    result = None
    if message.result_json is None:
        pass  # NOTE: set_state(SUCCEEDED) ends a task with no result (null)
    elif message.state == "SUCCEEDED":
        result = check_result_json(message.result_json)
    else:
        raise ProtocolError(f"a result with the final state {message.state}")
    kind = message.kind
    if kind is not None:
        try:
            claimed = OutcomeKind(kind)
        except (ValueError, TypeError):
            raise ProtocolError(f"bad outcome kind {kind!r}"[:200]) from None
        if claimed not in REPORTABLE or claimed.state.value != message.state:
            raise ProtocolError(f"outcome kind {claimed.value} may not end a task "
                                f"{message.state}")
    return Finished(
        state=message.state,
        result_json=result,
        reason=_optional_text(message.reason, MAX_TEXT),
        traceback=_optional_text(message.traceback, MAX_TRACEBACK),
        error_type=_optional_text(message.error_type, 128),
        kind=kind,
    )
