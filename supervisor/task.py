"""One task record: state transitions, version bumps, bounded messages, wire form."""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

from supervisor.consts import CONSTS
from supervisor.errors import InvalidArguments
from supervisor.states import TaskState, can_transition, is_terminal
from supervisor.wire import (
    CREATE_FIELDS,
    MAX_OBJECT_ID,
    Message,
    TaskSnapshot,
    encode_json,
    progress_wire,
    utc_stamp,
)

if TYPE_CHECKING:
    from supervisor.outcome import Outcome, Usage
    from supervisor.tasklog import TaskLog


class Task:
    """The supervisor's record of one task; mutated only under the manager's lock.

    ``args``, ``serviceStates`` and ``result`` are kept as compact JSON bytes
    (encoded once, outside the lock): see :mod:`supervisor.wire`.
    """

    def __init__(self, task_id: str, create: dict[str, Any], encoded: EncodedCreate,
                 number: int = 0, created_at: float | None = None) -> None:
        self.id = task_id
        self.number = number  #: its place in creation order (the id counter's value)
        self.operation: str = create["operation"]
        self.object_id: str | None = create.get("objectId")
        self.service_states_json = encoded.service_states_json
        self.args_json = encoded.args_json
        self.state = TaskState.NEW
        self.cancel_requested = False
        self.version = 1
        self.created_at = self.modified_at = time.time() if created_at is None else created_at
        self.time_created = self.time_modified = utc_stamp(self.created_at)
        self.progress: dict[str, Any] | None = None
        self.messages: deque[Message] = deque(maxlen=CONSTS.max_messages)
        self.result_json: bytes | None = None
        self.outcome: Outcome | None = None  #: how it ended (terminal tasks only)
        self.usage: Usage | None = None  #: what it cost (tasks that ran)
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
        self.modified_at = time.time()
        self.time_modified = utc_stamp(self.modified_at)

    def note(self, text: str) -> None:
        """Append a message (the oldest drop out beyond the bound); no version bump."""
        self.messages.append(Message(utc_stamp(), text))

    def transition(self, new: TaskState, *notes: str, outcome: Outcome | None = None,
                   usage: Usage | None = None) -> None:
        """Move to ``new``, recording any ``notes`` and "State change A ⇒ B".

        A terminal state needs its ``outcome`` (whose message is the first note).

        Raises:
            ValueError: the transition is not allowed (e.g. out of a terminal state),
                or a terminal one comes without its outcome.
        """
        if not can_transition(self.state, new):
            raise ValueError(f"task {self.id}: no transition {self.state} ⇒ {new}")
        if is_terminal(new):
            if outcome is None or outcome.state is not new:
                raise ValueError(f"task {self.id}: {new} needs an outcome of that state")
            self.outcome = outcome
            self.usage = usage if usage is not None else self.usage
            if outcome.message:
                notes = (outcome.message, *notes)
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
                progress=self.progress, outcome=self.outcome, usage=self.usage,
                number=self.number, created_at=self.created_at, modified_at=self.modified_at,
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


def check_create(create: object) -> EncodedCreate:
    """Check the shape of a create dict; raise InvalidArguments naming the field.

    Returns:
        Its ``args`` and ``serviceStates`` as compact JSON (strict: no NaN).
    """
    if not isinstance(create, dict):
        raise InvalidArguments(f"the task must be a JSON object, not {type(create).__name__}")
    for name in create:
        if name not in CREATE_FIELDS:
            raise InvalidArguments(f"unknown or read-only field {name!r}")
    if "operation" not in create:
        raise InvalidArguments("operation is required")
    for name, kind in CREATE_FIELDS.items():
        if name in create and not isinstance(create[name], kind):
            if name != "operation" and create[name] is None:
                continue
            raise InvalidArguments(f"{name} must be {'a string' if kind is str else 'an object'}")
    if not create["operation"]:
        raise InvalidArguments("operation must not be empty")
    object_id = create.get("objectId")
    if isinstance(object_id, str) and len(object_id) > MAX_OBJECT_ID:
        raise InvalidArguments(f"objectId must be at most {MAX_OBJECT_ID} characters")
    encoded = []
    given = create.json_text if isinstance(create, ParsedCreate) else {}
    for name in ("serviceStates", "args"):
        if isinstance(create.get(name), dict) and name in given:
            encoded.append(given[name])  # NOTE: as parsed by the REST layer, not re-encoded
            continue
        value = create.get(name)
        if not value:
            encoded.append(b"{}")  # NOTE: the common case, without an encoder call
            continue
        try:
            encoded.append(encode_json(value))
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidArguments(f"{name} must be JSON: {exc}") from None
    return EncodedCreate(*encoded)
