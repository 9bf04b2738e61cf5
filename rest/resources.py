"""The task resources: thin responders over a manager and a guard.

Responders authenticate, validate, call the manager and write JSON. They do
not catch the supervisor's errors: ``rest.app`` maps those to HTTP in one place.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from rest.errors import JSON_TYPE, ApiError, encode_json
from rest.listing import next_link, parse_list_request, select_page, total_count
from rest.validation import MAX_NAME_LENGTH, parse_create
from supervisor import TaskNotFound
from supervisor.idempotency import KEY_PATTERN, Created
from supervisor.wire import ChangeEvent, TaskSnapshot

if TYPE_CHECKING:
    import falcon

    from rest.auth import Guard

log = logging.getLogger("housekeeping.rest")

API_PREFIX = "/api/v1"

#: What every task id looks like (``meta.id``: URL-safe, at most 128 characters).
TASK_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_NAME_LENGTH}}}")

Event = dict[str, Any]


class TaskManager(Protocol):
    """What the REST layer needs of a manager (``supervisor.Manager`` fits)."""

    def run_task(self, create: dict[str, Any], idempotency_key: str | None = None) -> str:
        """Validate and queue a task; return its id."""

    def create_task(self, create: dict[str, Any], *,
                    idempotency_key: str | None = None) -> Created:
        """Validate and queue a task (or, for a known idempotency key, find the one it
        made); return its id and whether it was made before."""

    def get_snapshot(self, task_id: str) -> TaskSnapshot:
        """Return the task's current snapshot (its JSON, its operation, ...)."""

    def list_snapshots(self, operation: str | None = None, *,
                       state: str | Iterable[str] | None = None, object_id: str | None = None,
                       after: str | None = None, limit: int | None = None,
                       history: bool = False) -> list[TaskSnapshot]:
        """Return the tasks' snapshots that match the filters, in creation order, after
        the task ``after`` (ValueError if it is unknown), at most ``limit``."""

    def cancel_task(self, task_id: str) -> None:
        """Ask a task to stop."""

    def subscribe_changes(self, callback: Callable[[ChangeEvent], None]) -> Callable[[], None]:
        """Deliver the shared change events to ``callback``; return the unsubscribe function."""

    def get_log(self, task_id: str, after: int = 0, limit: int | None = None) -> dict[str, Any]:
        """Return the task's log lines above ``after`` (``{"lines", "next", "dropped",
        "complete"}``)."""

    def subscribe_log(self, task_id: str, callback: Callable[[dict[str, Any]], None], *,
                      after: int | None = None) -> Callable[[], None]:
        """Deliver the task's log lines (those above ``after`` first), then one last
        ``{"end", "next"}``, to ``callback``; return the unsubscribe function."""

    def log_totals(self) -> dict[tuple[str, str], tuple[int, int]]:
        """Return (bytes captured, lines dropped) by (operation, stream), so far."""

    def registered_operations(self) -> list[str]:
        """Return the operations that have an animator, sorted."""

    def operations(self) -> list[dict[str, Any]]:
        """Return each registered operation with its limits, as ``GET /operations`` shows."""

    @property
    def containment(self) -> str:
        """How task trees are held by default: ``"pid-namespace"`` or ``"subreaper"``."""

    @property
    def journal_status(self) -> str | None:
        """``"ok"`` or what is wrong with the journal; None without one."""

    def counts(self) -> dict[str, int]:
        """Return the number of tasks by state."""

    def counts_by_operation(self) -> dict[str, dict[str, int]]:
        """Return the number of tasks by operation and state."""


def send_json(resp: falcon.Response, value: Any, status: int = 200) -> None:
    """Write ``value`` as the JSON body of ``resp``."""
    resp.status = status
    resp.content_type = JSON_TYPE
    resp.data = encode_json(value)


def send_snapshot(resp: falcon.Response, snapshot: TaskSnapshot, status: int = 200) -> None:
    """Write a task's JSON as the body of ``resp`` (as it is: nothing is decoded)."""
    resp.status = status
    resp.content_type = JSON_TYPE
    resp.data = snapshot.json()


def operation_param(req: falcon.Request) -> str | None:
    """Return the ``?operation=`` filter; absent or empty means every operation."""
    return req.get_param("operation") or None


def check_task_id(task_id: str) -> None:
    """Answer 404 at once for a path id that no task can have.

    NOTE: the manager's "not found" message quotes the id; a hostile id (say,
    10,000 characters) is neither looked up nor echoed back in full.
    """
    if not TASK_ID.fullmatch(task_id):
        shown = task_id if len(task_id) <= 64 else task_id[:64] + "…"
        raise ApiError(404, f"task {shown!r} not found: ids are 1 to {MAX_NAME_LENGTH} "
                            "characters of A-Z, a-z, 0-9, _ and -")


def not_found(task_id: str) -> TaskNotFound:
    """The error of an unknown id, also for a task the caller may not view."""
    return TaskNotFound(f"task {task_id!r} not found")


def purged_stub(task_id: str, operation: str) -> dict[str, Any]:
    """Describe a task that was purged before the response could show it.

    NOTE: with ``purge_delay=0`` a task that ends within microseconds of its
    creation (or of its cancel) can be gone before the responder reads it back;
    the request still succeeded, so it is answered with this stub, not 404.
    """
    return {"meta": {"id": task_id, "objType": "Task"}, "operation": operation, "purged": True}


class TaskCollection:
    """``/api/v1/tasks``: list (GET) and create (POST)."""

    def __init__(self, manager: TaskManager, guard: Guard) -> None:
        self._manager = manager
        self._guard = guard

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """List a page of the tasks the caller may view, in creation order (see
        :mod:`rest.listing`)."""
        subject = self._guard.authenticate(req)
        request = parse_list_request(req)
        visible = None
        if self._guard.enabled:
            def visible(operation: str) -> bool:
                return self._guard.allows("view", subject, operation)
        tasks, more = select_page(self._manager, request, visible)
        if more:
            resp.set_header("Link", next_link(req, tasks[-1].id))
        if request.after is None:
            total = total_count(self._manager, request, visible)
            if total is not None:
                resp.set_header("X-Total-Count", str(max(total, len(tasks))))
        resp.content_type = JSON_TYPE
        resp.data = b"[" + b",".join(task.json() for task in tasks) + b"]"

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Create a task: 201 with the task and its ``Location``; with an
        ``Idempotency-Key`` already used for the same body, 200 with the first task
        and ``Idempotent-Replayed: true``."""
        subject = self._guard.authenticate(req)
        key = idempotency_key(req)
        create = parse_create(req)
        operation: str = create["operation"]
        self._guard.require("create", subject, operation)
        # NOTE: create_task reports any exception from the animator's validate()
        # as InvalidArguments (400); errors map to HTTP in app.py.
        task_id, replayed = self._manager.create_task(create, idempotency_key=key)
        resp.location = f"{API_PREFIX}/tasks/{task_id}"
        status = 200 if replayed else 201
        if replayed:
            resp.set_header("Idempotent-Replayed", "true")
        try:
            send_snapshot(resp, self._manager.get_snapshot(task_id), status)
        except TaskNotFound:
            send_json(resp, purged_stub(task_id, operation), status)


def idempotency_key(req: falcon.Request) -> str | None:
    """The ``Idempotency-Key`` header, checked (400 if malformed); None if absent."""
    key = req.get_header("Idempotency-Key")
    if key is not None and not KEY_PATTERN.fullmatch(key):
        raise ApiError(400, "Idempotency-Key must be 1 to 128 characters of A-Z, a-z, "
                            "0-9, _, . and -")
    return key


class TaskItem:
    """``/api/v1/tasks/{task_id}``: one task (GET)."""

    def __init__(self, manager: TaskManager, guard: Guard) -> None:
        self._manager = manager
        self._guard = guard

    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        """Return the task (404, as for an unknown id, if the caller may not view it)."""
        subject = self._guard.authenticate(req)
        check_task_id(task_id)
        task = self._manager.get_snapshot(task_id)
        if not self._guard.allows("view", subject, task.operation):
            raise not_found(task_id)
        send_snapshot(resp, task)


class TaskCancel:
    """``/api/v1/tasks/{task_id}/cancel``: ask a task to stop (POST)."""

    def __init__(self, manager: TaskManager, guard: Guard) -> None:
        self._manager = manager
        self._guard = guard

    def on_post(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        """Cancel the task; 200 with the task, now with ``cancelRequested: true``.

        A caller that may cancel but not view the task gets only its id and
        ``cancelRequested``; one that may do neither gets the 404 of an
        unknown id, so that ids it may not see cannot be probed.
        """
        subject = self._guard.authenticate(req)
        check_task_id(task_id)
        operation = self._manager.get_snapshot(task_id).operation
        may_view = self._guard.allows("view", subject, operation)
        if not self._guard.allows("cancel", subject, operation):
            if not may_view:
                raise not_found(task_id)
            raise ApiError(403, f"not allowed to cancel {operation} tasks")
        self._manager.cancel_task(task_id)
        if not may_view:
            send_json(resp, {"meta": {"id": task_id}, "cancelRequested": True})
            return
        try:
            send_snapshot(resp, self._manager.get_snapshot(task_id))
        except TaskNotFound:
            send_json(resp, purged_stub(task_id, operation))


class Health:
    """``/healthz``: liveness, task counts and open event streams, without authentication."""

    def __init__(self, manager: TaskManager, open_streams: Callable[[], int]) -> None:
        self._manager = manager
        self._open_streams = open_streams

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Return ``{"status": "ok", <state>: <count>, ..., "operations", "containment",
        "eventStreams"}``, and ``"journal"`` (``"ok"`` or its error) if there is one."""
        body: dict[str, Any] = {"status": "ok"}
        body.update(self._manager.counts())
        body["operations"] = self._manager.registered_operations()
        body["containment"] = self._manager.containment
        body["eventStreams"] = self._open_streams()
        journal = self._manager.journal_status
        if journal is not None:
            body["journal"] = journal
        send_json(resp, body)
