"""One task record: state transitions, version bumps, bounded messages, wire form."""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime
from typing import Any

from supervisor.consts import CONSTS
from supervisor.states import TaskState, can_transition, is_terminal

_PROGRESS_WIRE = {
    "percent_complete": "percentComplete",
    "total_bytes": "totalBytes",
    "offset_bytes": "offsetBytes",
    "transferred_bytes": "transferredBytes",
}


def utc_stamp(when: float | None = None) -> str:
    """Format a time as the wire's RFC 3339 UTC string with microseconds."""
    moment = datetime.now(UTC) if when is None else datetime.fromtimestamp(when, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def copy_json(value: Any) -> Any:
    """Copy JSON data: dicts and lists anew, scalars shared (they are immutable).

    NOTE: several times faster than ``copy.deepcopy``, which matters because
    ``list_tasks`` copies every task under the manager's lock.
    """
    if isinstance(value, dict):
        return {key: copy_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [copy_json(item) for item in value]
    return value


class Task:
    """The supervisor's record of one task; mutated only under the manager's lock."""

    def __init__(self, task_id: str, create: dict[str, Any]) -> None:
        self.id = task_id
        self.operation: str = create["operation"]
        self.object_id: str | None = create.get("objectId")
        self.service_states: dict[str, Any] = copy_json(create.get("serviceStates") or {})
        self.args: dict[str, Any] = copy_json(create.get("args") or {})
        self.state = TaskState.NEW
        self.cancel_requested = False
        self.version = 1
        self.time_created = self.time_modified = utc_stamp()
        self.progress: dict[str, Any] | None = None
        self.messages: deque[dict[str, str]] = deque(maxlen=CONSTS.max_messages)
        self.result: Any = None
        #: the operation's animator and limits when the task was created (a
        #: later re-registration applies to later tasks only)
        self.registration: Any = None
        self._snapshot: dict[str, Any] | None = None

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
        self.messages.append({"time": utc_stamp(), "message": text})

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

    def set_progress(self, values: dict[str, int], timestamp: float) -> None:
        """Merge reported progress figures (already checked) and stamp them."""
        progress = dict(self.progress or {})
        for name, value in values.items():
            progress[_PROGRESS_WIRE[name]] = value
        progress["timestamp"] = utc_stamp(timestamp)
        self.progress = progress
        self.touch()

    def to_wire(self) -> dict[str, Any]:
        """Return the JSON-ready wire dict: a fresh copy the caller may keep."""
        return copy_json(self.snapshot())  # type: ignore[no-any-return]

    def snapshot(self) -> dict[str, Any]:
        """Return the wire dict of this version, shared: never mutate it.

        Built once per version (every change goes through :meth:`touch`, which
        bumps it), so a caller holding the manager's lock only collects
        snapshots and copies them after releasing it.
        """
        if self._snapshot is None or self._snapshot["meta"]["version"] != self.version:
            self._snapshot = self._build_wire()
        return self._snapshot

    def _build_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "meta": {
                "id": self.id,
                "objType": "Task",
                "version": self.version,
                "timeCreated": self.time_created,
                "timeModified": self.time_modified,
            },
            "operation": self.operation,
            # NOTE: shared, not copied: the task never changes these in place,
            # and whoever hands a snapshot out copies it (to_wire).
            "serviceStates": self.service_states,
            "args": self.args,
            "state": self.state.value,
            "cancelRequested": self.cancel_requested,
            "messages": list(self.messages),
            "result": self.result,
        }
        if self.object_id is not None:
            wire["objectId"] = self.object_id
        if self.progress is not None:
            wire["progress"] = self.progress
        return wire
