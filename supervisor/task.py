"""One task record: state transitions, version bumps, bounded messages, wire form."""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from supervisor.consts import CONSTS
from supervisor.states import TaskState, can_transition, is_terminal
from supervisor.wire import Message, TaskSnapshot, progress_wire

if TYPE_CHECKING:
    from supervisor.tasklog import TaskLog


def utc_stamp(when: float | None = None) -> str:
    """Format a time as the wire's RFC 3339 UTC string with microseconds."""
    moment = datetime.now(UTC) if when is None else datetime.fromtimestamp(when, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Task:
    """The supervisor's record of one task; mutated only under the manager's lock.

    ``args``, ``serviceStates`` and ``result`` are kept as compact JSON bytes
    (encoded once, outside the lock): see :mod:`supervisor.wire`.
    """

    def __init__(self, task_id: str, create: dict[str, Any], encoded: EncodedCreate) -> None:
        self.id = task_id
        self.operation: str = create["operation"]
        self.object_id: str | None = create.get("objectId")
        self.service_states_json = encoded.service_states_json
        self.args_json = encoded.args_json
        self.state = TaskState.NEW
        self.cancel_requested = False
        self.version = 1
        self.time_created = self.time_modified = utc_stamp()
        self.progress: dict[str, Any] | None = None
        self.messages: deque[Message] = deque(maxlen=CONSTS.max_messages)
        self.result_json: bytes | None = None
        #: the operation's animator and limits when the task was created (a
        #: later re-registration applies to later tasks only)
        self.registration: Any = None
        #: its captured output: made when it starts (or when somebody follows it)
        self.log: TaskLog | None = None
        self.started = False  #: a backend took it: output comes until its pipes close
        self._snapshot: TaskSnapshot | None = None

    @property
    def terminal(self) -> bool:
        """True once the task reached CANCELED, FAILED or SUCCEEDED."""
        return is_terminal(self.state)

    def touch(self) -> None:
        """Record a change: the version grows by one and timeModified follows."""
        self.version += 1
        self.time_modified = utc_stamp()

    def note(self, text: str) -> None:
        """Append a message (the oldest drop out beyond the bound); no version bump."""
        self.messages.append(Message(utc_stamp(), text))

    def transition(self, new: TaskState, *notes: str) -> None:
        """Move to ``new``, recording "State change A ⇒ B" and any ``notes``.

        Raises:
            ValueError: the transition is not allowed (e.g. out of a terminal state).
        """
        if not can_transition(self.state, new):
            raise ValueError(f"task {self.id}: no transition {self.state} ⇒ {new}")
        for text in notes:
            self.note(text)
        self.note(f"State change {self.state.value} ⇒ {new.value}")
        self.state = new
        self.touch()
        if self.log is not None and is_terminal(new) and (self.log.closed or not self.started):
            self.log.close(terminal=True)  # NOTE: no output is on its way: followers end

    def set_progress(self, values: dict[str, int], timestamp: float) -> None:
        """Merge reported progress figures (already checked) and stamp them."""
        progress = dict(self.progress or {})
        progress.update(progress_wire(values))
        progress["timestamp"] = utc_stamp(timestamp)
        self.progress = progress
        self.touch()

    def snapshot(self) -> TaskSnapshot:
        """Return the immutable snapshot of this version (built once per version).

        Cheap enough for the lock: it references the JSON parts, it copies none.
        """
        if self._snapshot is None or self._snapshot.version != self.version:
            self._snapshot = TaskSnapshot.build(
                task_id=self.id, operation=self.operation, object_id=self.object_id,
                state=self.state.value, version=self.version,
                time_created=self.time_created, time_modified=self.time_modified,
                cancel_requested=self.cancel_requested,
                service_states_json=self.service_states_json, args_json=self.args_json,
                messages=tuple(self.messages), result_json=self.result_json,
                progress=self.progress,
            )
        return self._snapshot


class ParsedCreate(dict[str, Any]):
    """A create dict that also carries the JSON text its ``args`` and
    ``serviceStates`` were parsed from (``json_text``: field → UTF-8 bytes).

    The REST layer passes one to ``run_task`` so that a big body is parsed
    once and never encoded again: the manager keeps that text as it is. The
    text must be strict JSON on one line that decodes to the field's value.
    """

    json_text: dict[str, bytes]


class EncodedCreate:
    """The big parts of a create dict as compact JSON, encoded before taking the lock."""

    __slots__ = ("args_json", "service_states_json")

    def __init__(self, service_states_json: bytes, args_json: bytes) -> None:
        self.service_states_json = service_states_json
        self.args_json = args_json
