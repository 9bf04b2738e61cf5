"""The task's wire form, owned here: its fields, its timestamps, its JSON, its copies.

Everything that writes or reads a task as JSON (the manager, REST, the Dask
backend, ``workers.testing``, the journal) takes the field names, the
timestamp format and the encoding from this module.

A task's big parts (``args``, ``serviceStates``, ``result``) are held once,
as the compact JSON text they were received or returned as. A snapshot is a
handful of fields plus references to those texts; its JSON document is
spliced from them when somebody asks, outside the manager's lock::

    Task (under the lock)  ──snapshot()──▶ TaskSnapshot  (version N, immutable)
       args_json ─────────────────────────────▲  shared, never copied
                                              │
    ChangeEvent("PATCH", snapshot) ──▶ every subscriber's backlog (the same object)
                                              │
    REST: snapshot.json() ──▶ the response body; SSE: event.json(); Python: to_dict()

So a 1 MiB task costs about 1 MiB however many versions, events and
subscribers there are, and publishing an event copies nothing.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from supervisor.outcome import Outcome, Usage

#: The fields a create request may carry, with the JSON type of each; every
#: other field of a task is read-only.
CREATE_FIELDS: dict[str, type] = {
    "operation": str, "objectId": str, "serviceStates": dict, "args": dict,
}
#: Longest ``objectId``, in characters.
MAX_OBJECT_ID = 128
#: ``timeCreated``, ``timeModified`` and every other time of the wire: RFC 3339,
#: UTC, microseconds, ``Z``.
STAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

_PROGRESS_WIRE = {
    "percent_complete": "percentComplete",
    "total_bytes": "totalBytes",
    "offset_bytes": "offsetBytes",
    "transferred_bytes": "transferredBytes",
}
#: wire name -> ``TaskOps.set_progress`` keyword
PROGRESS_NAMES = {wire: name for name, wire in _PROGRESS_WIRE.items()}


def utc_stamp(when: float | None = None) -> str:
    """Format a time (POSIX seconds; now by default) as the wire's timestamp
    (:data:`STAMP_FORMAT`)."""
    fraction, whole = math.modf(time.time() if when is None else when)
    micro = round(fraction * 1e6)  # NOTE: as datetime rounds (half to even, carried)
    second = int(whole) + micro // 1_000_000
    # NOTE: every version of every task is stamped; the part up to the second
    # is formatted once per second, the microseconds each time.
    global _last_second
    cached = _last_second
    if cached[0] != second:
        cached = _last_second = (
            second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{cached[1]}.{micro % 1_000_000:06d}Z"


_last_second: tuple[int, str] = (-1, "")


def parse_stamp(text: object) -> float | None:
    """Parse a wire timestamp to POSIX seconds; None if it is not one."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def create_fields(task: Mapping[str, Any]) -> dict[str, Any]:
    """The creation fields of a task (or of a create request), as given."""
    return {name: task[name] for name in CREATE_FIELDS if name in task}


def encode_json(value: Any) -> bytes:
    """Encode ``value`` as compact UTF-8 JSON that never fails on odd strings.

    NOTE: a lone surrogate (``"\\ud800"``, valid in a JSON escape and so in a
    posted body or a task result) cannot be encoded as UTF-8; such a document
    falls back to ASCII escapes instead of failing.
    """
    text = _COMPACT(value)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _COMPACT_ASCII(value).encode("ascii")


@functools.lru_cache(maxsize=256)
def _string_json(text: str) -> bytes:
    """``encode_json(text)``, remembered: a few operation names make most tasks."""
    return encode_json(text)


#: ``json.dumps`` with these options, its encoder made once (dumps makes one per call)
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_COMPACT_ASCII = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


class Message:
    """One entry of a task's ``messages``: its time, its text and its JSON, encoded once."""

    __slots__ = ("json", "text", "time")

    def __init__(self, time: str, text: str) -> None:
        self.time = time
        self.text = text
        self.json = encode_json({"time": time, "message": text})


#: ``,"state":...,"cancelRequested":...`` of every state, as encode_json writes it.
_STATE_PARTS = {(state, canceled): b',"state":"%s","cancelRequested":%s' % (
    state.encode(), b"true" if canceled else b"false")
    for state in ("NEW", "ACTIVE", "WAITING", "CANCELED", "FAILED", "SUCCEEDED")
    for canceled in (False, True)}
#: Largest task document a snapshot keeps once joined, in bytes.
_KEPT_DOCUMENT = 16 * 1024


class TaskSnapshot:
    """One version of one task, immutable: its wire form as fields and JSON parts.

    ``json()`` is the task's JSON document, joined from the parts (and the
    messages' JSON) when asked, outside the lock; ``to_dict()`` is a fresh
    wire dict the caller may keep and change. ``outcome`` and ``usage`` are
    the data behind the document's fields of those names (None until known).
    """

    __slots__ = ("_json", "_parts", "cancel_requested", "created_at", "id", "messages",
                 "modified_at", "number", "object_id", "operation", "outcome", "size",
                 "state", "time_created", "time_modified", "usage", "version")

    def __init__(self, *, task_id: str, operation: str, state: str, version: int,
                 time_created: str, time_modified: str, cancel_requested: bool,
                 messages: tuple[Message, ...], parts: tuple[bytes | None, ...],
                 object_id: str | None = None, outcome: Outcome | None = None,
                 usage: Usage | None = None, number: int = 0,
                 created_at: float | None = None, modified_at: float | None = None) -> None:
        self.id = task_id
        self.operation = operation
        self.object_id = object_id
        self.state = state
        self.version = version
        self.time_created = time_created
        self.time_modified = time_modified
        #: the same times as POSIX seconds
        self.created_at = created_at if created_at is not None else (
            parse_stamp(time_created) or 0.0)
        self.modified_at = modified_at if modified_at is not None else (
            parse_stamp(time_modified) or 0.0)
        self.cancel_requested = cancel_requested
        self.messages = messages
        self.outcome = outcome
        self.usage = usage
        self.number = number  #: the task's creation number (its place in creation order)
        self._parts = parts
        self._json: bytes | None = None
        #: the length of :meth:`json`, in bytes (what a backlog of it costs at most)
        self.size = sum(map(len, filter(None, parts))) + len(parts) + sum(
            len(message.json) + 1 for message in messages)

    @classmethod
    def build(cls, *, task_id: str, operation: str, object_id: str | None, state: str,
              version: int, time_created: str, time_modified: str, cancel_requested: bool,
              service_states_json: bytes, args_json: bytes, messages: tuple[Message, ...],
              result_json: bytes | None, progress: Mapping[str, Any] | None,
              outcome: Outcome | None = None, usage: Usage | None = None,
              number: int = 0, created_at: float | None = None,
              modified_at: float | None = None) -> TaskSnapshot:
        """Assemble a snapshot from a task's fields; cheap: the big parts are shared."""
        # NOTE: spliced, not encoded as a dict: a snapshot is built for every
        # version of every task. The stamps are ASCII digits and punctuation
        # (utc_stamp); the two strings are encoded as encode_json would.
        # A task id is 1-128 of [A-Za-z0-9_-] (the table makes them so, and
        # run_task_as checks them): quoted, it is its own JSON.
        head = b"".join((
            b'{"meta":{"id":"', task_id.encode(), b'","objType":"Task","version":',
            str(version).encode(), b',"timeCreated":"', time_created.encode(),
            b'","timeModified":"', time_modified.encode(), b'"},"operation":',
            _string_json(operation)))
        parts: list[bytes | None] = [
            head, b',"serviceStates":', service_states_json, b',"args":', args_json,
            _STATE_PARTS[state, cancel_requested],
            b',"messages":[', None,  # NOTE: None: the messages go here
            b'],"result":', result_json if result_json is not None else b"null",
        ]
        extra: dict[str, Any] = {}
        if object_id is not None:
            extra["objectId"] = object_id
        if progress is not None:
            extra["progress"] = dict(progress)
        if outcome is not None:
            extra["outcome"] = outcome.to_wire()
        if usage is not None:
            extra["usage"] = usage.to_wire()
        if extra:
            parts += [b",", encode_json(extra)[1:-1]]
        parts.append(b"}")
        return cls(task_id=task_id, operation=operation, state=state, version=version,
                   time_created=time_created, time_modified=time_modified,
                   cancel_requested=cancel_requested, messages=messages, parts=tuple(parts),
                   object_id=object_id, outcome=outcome, usage=usage, number=number,
                   created_at=created_at, modified_at=modified_at)

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any], number: int = 0,
                  json_bytes: bytes | None = None) -> TaskSnapshot:
        """A snapshot of a wire dict (a test fake's, a journal's record).

        ``json_bytes``, if given, is the document ``wire`` was decoded from
        (compact UTF-8): it is kept as the snapshot's JSON instead of encoding
        ``wire`` again.

        Raises:
            KeyError, ValueError, TypeError: ``wire`` is not a task's wire form.
        """
        from supervisor.outcome import Outcome, Usage

        meta = wire["meta"]
        messages = tuple(Message(str(m.get("time", "")), str(m.get("message", "")))
                         for m in wire.get("messages") or [])
        outcome = wire.get("outcome")
        usage = wire.get("usage")
        return cls(task_id=meta["id"], operation=wire["operation"], state=wire["state"],
                   version=meta["version"], time_created=meta["timeCreated"],
                   time_modified=meta["timeModified"],
                   cancel_requested=bool(wire.get("cancelRequested")), messages=messages,
                   parts=(json_bytes if json_bytes is not None else encode_json(wire),),
                   object_id=wire.get("objectId"),
                   outcome=None if outcome is None else Outcome.from_wire(outcome),
                   usage=None if usage is None else Usage.from_wire(usage), number=number)

    def json(self) -> bytes:
        """The task's JSON document (compact UTF-8, strict, on one line).

        NOTE: joined at the first call and kept when small (a list of a thousand
        tasks is then a join of kept documents); a big one is joined each time,
        so that a 1 MiB task still costs about 1 MiB however many versions are kept.
        """
        document = self._json
        if document is None:
            document = b"".join(b",".join(m.json for m in self.messages) if part is None
                                else part for part in self._parts)
            if len(document) <= _KEPT_DOCUMENT:
                self._json = document
        return document

    def to_dict(self) -> dict[str, Any]:
        """A fresh wire dict of this version."""
        return json.loads(self.json())  # type: ignore[no-any-return]


class ChangeEvent:
    """One change event, immutable, shared by every subscriber that receives it.

    ``to_dict()`` is the event as :meth:`Manager.subscribe` delivers it:
    ``{"method", "uri", "scope", "task"}``, with a fresh task dict.
    """

    __slots__ = ("method", "scope", "size", "task", "uri")

    def __init__(self, method: str, uri: str, scope: Mapping[str, str],
                 task: TaskSnapshot | None) -> None:
        self.method = method
        self.uri = uri
        self.scope = dict(scope)
        self.task = task
        #: what a backlog counts for it (the DROPPED marker counts nothing)
        self.size = 0 if method == "DROPPED" else 128 + (task.size if task is not None else 0)

    def json(self) -> bytes:
        """The event's JSON document (``task`` spliced in from the snapshot)."""
        head = encode_json({"method": self.method, "uri": self.uri, "scope": self.scope})
        task = self.task.json() if self.task is not None else b"null"
        return b"".join((head[:-1], b',"task":', task, b"}"))

    def to_dict(self) -> dict[str, Any]:
        """The event as a fresh dict (its task decoded anew)."""
        return {"method": self.method, "uri": self.uri, "scope": dict(self.scope),
                "task": self.task.to_dict() if self.task is not None else None}


#: The last event of a subscriber that fell too far behind.
DROPPED = ChangeEvent("DROPPED", "/tasks", {}, None)


def progress_wire(values: Mapping[str, int]) -> dict[str, int]:
    """Name reported progress figures as the wire does (``percentComplete``, ...)."""
    return {_PROGRESS_WIRE[name]: value for name, value in values.items()}
