"""Fakes for the REST tests: an in-memory manager and a table-driven access control.

``FakeManager`` keeps the contract of ``supervisor.Manager`` that the REST
layer uses (same errors, same wire form, events in order) without processes:
tests move tasks along by hand with :meth:`FakeManager.set_state`.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from supervisor import (
    HousekeepingError,
    InvalidArguments,
    ManagerTerminated,
    QueueFull,
    TaskNotFound,
    UnsupportedOperation,
)
from supervisor.idempotency import Created, KeyRecord, KeyStore, body_digest, check_key
from supervisor.listing import check_limit, make_query
from supervisor.outcome import Outcome, OutcomeKind
from supervisor.sandbox import Sandbox
from supervisor.task import check_create
from supervisor.wire import DROPPED, ChangeEvent, TaskSnapshot, utc_stamp

Event = dict[str, Any]
TERMINAL = frozenset({"CANCELED", "FAILED", "SUCCEEDED"})


def _now() -> str:
    return utc_stamp()


#: the kind a terminal state set by hand gets unless the test names one
_DEFAULT_KIND = {"SUCCEEDED": OutcomeKind.RETURNED, "FAILED": OutcomeKind.EXCEPTION,
                 "CANCELED": OutcomeKind.CANCELED_HONOURED}


def accept_anything(create: dict[str, Any]) -> None:
    """A validate() that accepts every create dict."""


def require_int_seconds(create: dict[str, Any]) -> None:
    """A validate() in the demo's style: ``args.seconds`` must be an int if given."""
    seconds = (create.get("args") or {}).get("seconds", 1)
    if not isinstance(seconds, int) or isinstance(seconds, bool):
        raise InvalidArguments("args.seconds must be an integer")


class FakeManager:
    """An in-memory stand-in for ``supervisor.Manager``; events are delivered synchronously."""

    def __init__(self, operations: dict[str, Callable[[dict[str, Any]], None]] | None = None):
        self.validators: dict[str, Callable[[dict[str, Any]], None]] = (
            dict(operations) if operations is not None
            else {"SLEEP": require_int_seconds, "HASH": accept_anything}
        )
        self.tasks: dict[str, dict[str, Any]] = {}
        self.created: list[dict[str, Any]] = []  #: every create dict run_task accepted
        self.queue_full = False
        self.terminated = False
        self.purge_at_once = False  #: purge each task as soon as it is created/canceled
        self.broken: dict[str, Exception] = {}  #: method name -> exception it raises
        self._counter = itertools.count(1)
        #: key -> (callback, raw): raw ones get ChangeEvents, the others dicts
        self._subscribers: dict[int, tuple[Callable[[Any], None], bool]] = {}
        self._keys = itertools.count(1)
        self._lock = threading.RLock()
        #: task id -> its log lines; task id -> {key: follower callback}; (operation, stream) ->
        #: [bytes, dropped] (the test controls write_log/end_log fill them)
        self.logs: dict[str, list[dict[str, Any]]] = {}
        self.log_dropped: dict[str, int] = {}
        self.log_followers: dict[str, dict[int, Callable[[dict[str, Any]], None]]] = {}
        self.log_totals_kept: dict[tuple[str, str], list[int]] = {}
        self._log_ended: set[str] = set()
        self._killed: set[str] = set()  #: ids whose outcome was a forced kill
        self._numbers: dict[str, int] = {}  #: every id made -> its creation number
        self._idempotency_keys = KeyStore()
        #: as ``Manager.journal_status``; tests set it to see /healthz report it
        self.journal_status: str | None = None

    # -- the Manager API the REST layer uses --------------------------------

    def run_task(self, create: dict[str, Any], idempotency_key: str | None = None) -> str:
        return self.create_task(create, idempotency_key=idempotency_key).task_id

    def create_task(self, create: dict[str, Any], *,
                    idempotency_key: str | None = None) -> Created:
        self._maybe_break("run_task")
        check_create(create)  # NOTE: the manager's own check of the shape
        digest = None
        if idempotency_key is not None:
            check_key(idempotency_key)
            digest = body_digest(create)
            with self._lock:
                first = self._idempotency_keys.find(idempotency_key, digest)
            if first is not None:
                return Created(first, True)
        if self.terminated:
            raise ManagerTerminated("the manager is terminating")
        validate = self.validators.get(create["operation"])
        if validate is None:
            raise UnsupportedOperation(f"unsupported operation {create['operation']!r}")
        try:
            validate(dict(create))
        except HousekeepingError:
            raise
        except Exception as exc:  # as the real manager: any other error is a 400
            raise InvalidArguments(str(exc) or type(exc).__name__) from exc
        if self.queue_full:
            raise QueueFull("queue full: 3 tasks already wait")
        with self._lock:
            if idempotency_key is not None and digest is not None:
                first = self._idempotency_keys.find(idempotency_key, digest)
                if first is not None:
                    return Created(first, True)
            number = next(self._counter)
            task_id = f"{create['operation'][:20]}{number:06d}"
            self._numbers[task_id] = number
            stamp = _now()
            task: dict[str, Any] = {
                "meta": {"id": task_id, "objType": "Task", "version": 1,
                         "timeCreated": stamp, "timeModified": stamp},
                "operation": create["operation"],
                "serviceStates": copy.deepcopy(create.get("serviceStates") or {}),
                "args": copy.deepcopy(create.get("args") or {}),
                "state": "NEW",
                "cancelRequested": False,
                "messages": [],
                "result": None,
            }
            if create.get("objectId") is not None:
                task["objectId"] = create["objectId"]
            self.created.append(copy.deepcopy(create))
            self.tasks[task_id] = task
            self._emit("POST", task)
            if idempotency_key is not None and digest is not None:
                self._idempotency_keys.remember(
                    idempotency_key, KeyRecord(digest, task_id, time.time()))
            if self.purge_at_once:
                self.purge(task_id)
        return Created(task_id, False)

    def get_task(self, task_id: str) -> dict[str, Any]:
        self._maybe_break("get_task")
        with self._lock:
            if task_id not in self.tasks:
                raise TaskNotFound(f"task {task_id!r} not found")
            return copy.deepcopy(self.tasks[task_id])

    def list_tasks(self, operation: str | None = None, *,
                   state: str | Iterable[str] | None = None, object_id: str | None = None,
                   after: str | None = None, limit: int | None = None,
                   history: bool = False) -> list[dict[str, Any]]:
        self._maybe_break("list_tasks")
        query = make_query(operation, state, object_id)
        check_limit(limit)
        with self._lock:
            number = 0
            if after is not None:
                if not isinstance(after, str) or after not in self._numbers:
                    raise ValueError(f"after: no task {after!r} is known")
                number = self._numbers[after]
            found = []
            for task_id, task in self.tasks.items():
                if self._numbers[task_id] <= number or not query.matches(
                        _Listed(task, self._numbers[task_id]), task["state"]):
                    continue
                found.append(copy.deepcopy(task))
                if limit is not None and len(found) >= limit:
                    break
            return found

    def get_snapshot(self, task_id: str) -> TaskSnapshot:
        self._maybe_break("get_snapshot")
        return TaskSnapshot.from_wire(self.get_task(task_id))

    def list_snapshots(self, operation: str | None = None, *,
                       state: str | Iterable[str] | None = None, object_id: str | None = None,
                       after: str | None = None, limit: int | None = None,
                       history: bool = False) -> list[TaskSnapshot]:
        self._maybe_break("list_snapshots")
        return [TaskSnapshot.from_wire(task, self._numbers[task["meta"]["id"]])
                for task in self.list_tasks(operation, state=state, object_id=object_id,
                                            after=after, limit=limit, history=history)]

    def cancel_task(self, task_id: str) -> None:
        self._maybe_break("cancel_task")
        with self._lock:
            task = self.tasks.get(task_id)
            if task is None or task["state"] in TERMINAL:
                raise TaskNotFound(f"task {task_id!r} not found or already finished")
            if task["cancelRequested"]:
                return
            task["cancelRequested"] = True
            if task["state"] == "NEW":
                self.set_state(task_id, "CANCELED", "canceled while queued",
                               kind=OutcomeKind.CANCELED_QUEUED)
            else:
                self._touch(task)
                self._emit("PATCH", task)
            if self.purge_at_once:
                self.purge(task_id)

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        return self._subscribe(callback, raw=False)

    def subscribe_changes(self, callback: Callable[[ChangeEvent], None]) -> Callable[[], None]:
        return self._subscribe(callback, raw=True)

    def _subscribe(self, callback: Callable[[Any], None], raw: bool) -> Callable[[], None]:
        key = next(self._keys)
        with self._lock:
            self._subscribers[key] = (callback, raw)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.pop(key, None)

        return unsubscribe

    def get_log(self, task_id: str, after: int = 0, limit: int | None = None) -> dict[str, Any]:
        self._maybe_break("get_log")
        with self._lock:
            if task_id not in self.tasks:
                raise TaskNotFound(f"task {task_id!r} not found")
            kept = self.logs.get(task_id, [])
            lines = [dict(line) for line in kept if line["seq"] > after][:limit]
            last = kept[-1]["seq"] if kept else 0
            next_after = lines[-1]["seq"] if lines else after
            complete = task_id in self._log_ended and next_after >= last
            return {"lines": lines, "next": next_after,
                    "dropped": self.log_dropped.get(task_id, 0), "complete": complete}

    def subscribe_log(self, task_id: str, callback: Callable[[dict[str, Any]], None], *,
                      after: int | None = None) -> Callable[[], None]:
        """Deliver the stored lines above ``after`` at once (keep them few: the
        caller's mailbox may block), then each line that write_log adds."""
        self._maybe_break("subscribe_log")
        key = next(self._keys)
        with self._lock:
            if task_id not in self.tasks:
                raise TaskNotFound(f"task {task_id!r} not found")
            kept = self.logs.get(task_id, [])
            start = after if after is not None else (kept[-1]["seq"] if kept else 0)
            for line in kept:
                if line["seq"] > start:
                    callback(dict(line))
            if task_id in self._log_ended:  # NOTE: as the manager: a complete log ends at once
                callback({"end": "complete", "next": kept[-1]["seq"] if kept else start})
                return lambda: None
            self.log_followers.setdefault(task_id, {})[key] = callback

        def unsubscribe() -> None:
            with self._lock:
                self.log_followers.get(task_id, {}).pop(key, None)

        return unsubscribe

    def log_totals(self) -> dict[tuple[str, str], tuple[int, int]]:
        with self._lock:
            return {key: (kept[0], kept[1]) for key, kept in self.log_totals_kept.items()}

    def registered_operations(self) -> list[str]:
        return sorted(self.validators)

    def operations(self) -> list[dict[str, Any]]:
        unconfined = Sandbox(private_pids=False).to_wire()
        return [{"operation": name, "timeout": None, "maxMemory": None, "sandbox": unconfined}
                for name in self.registered_operations()]

    #: as ``Manager.containment`` says it
    containment = "subreaper"

    def counts(self) -> dict[str, int]:
        self._maybe_break("counts")
        with self._lock:
            counts = dict.fromkeys(["NEW", "ACTIVE", "WAITING", "CANCELED", "FAILED",
                                    "SUCCEEDED"], 0)
            for task in self.tasks.values():
                counts[task["state"]] += 1
            counts["queued"] = counts["NEW"]  # NOTE: no task is being handed over here
            counts["running"] = counts["ACTIVE"] + counts["WAITING"]
            counts["total"] = len(self.tasks)
            return counts

    def counts_by_operation(self) -> dict[str, dict[str, int]]:
        self._maybe_break("counts_by_operation")
        with self._lock:
            found: dict[str, dict[str, int]] = {
                operation: dict.fromkeys(["NEW", "ACTIVE", "WAITING", "CANCELED", "FAILED",
                                          "SUCCEEDED"], 0)
                for operation in {*self.validators, *(t["operation"] for t in self.tasks.values())}
            }
            for task in self.tasks.values():
                found[task["operation"]][task["state"]] += 1
            return dict(sorted(found.items()))

    def terminate(self) -> None:
        self.terminated = True

    # -- test controls --------------------------------------------------------

    @property
    def subscriber_count(self) -> int:
        """How many subscribers are registered."""
        return len(self._subscribers)

    def set_state(self, task_id: str, state: str, message: str | None = None, *,
                  kind: OutcomeKind | None = None, killed: bool = False) -> None:
        """Move a task to ``state`` (as its child would), publishing a PATCH; a
        terminal state gets an outcome of ``kind`` (``killed``: a forced kill)."""
        with self._lock:
            task = self.tasks[task_id]
            if state in TERMINAL and task["state"] == "NEW":
                self._log_ended.add(task_id)  # NOTE: as the manager: it never ran, wrote nothing
            if state in TERMINAL and task["state"] not in TERMINAL:
                outcome = Outcome(kind or _DEFAULT_KIND[state], message or "", killed=killed)
                assert outcome.state.value == state, (outcome, state)
                task["outcome"] = outcome.to_wire()
                if killed:
                    self._killed.add(task_id)
            if message:
                task["messages"].append({"time": _now(), "message": message})
            task["messages"].append(
                {"time": _now(), "message": f"State change {task['state']} ⇒ {state}"})
            task["state"] = state
            if state == "SUCCEEDED":
                task["result"] = {"ok": True}
            self._touch(task)
            self._emit("PATCH", task)

    def purge(self, task_id: str) -> None:
        """Remove a task from the table, publishing a DELETE (and ending its log's followers)."""
        with self._lock:
            task = self.tasks.pop(task_id)
            self._emit("DELETE", task)
            self.end_log(task_id, "purged")
            self.logs.pop(task_id, None)

    def write_log(self, task_id: str, stream: str, text: str) -> dict[str, Any]:
        """Add one line to a task's log (as its process would), delivering it to followers."""
        with self._lock:
            kept = self.logs.setdefault(task_id, [])
            line = {"seq": (kept[-1]["seq"] if kept else self.log_dropped.get(task_id, 0)) + 1,
                    "time": _now(), "stream": stream, "text": text}
            kept.append(line)
            totals = self.log_totals_kept.setdefault(
                (self.tasks[task_id]["operation"], stream), [0, 0])
            totals[0] += len(text.encode()) + 1
            for callback in list(self.log_followers.get(task_id, {}).values()):
                callback(dict(line))
            return line

    def drop_log_lines(self, task_id: str, count: int) -> None:
        """Discard a task's oldest ``count`` lines, counting them as dropped."""
        with self._lock:
            kept = self.logs[task_id]
            gone, self.logs[task_id] = kept[:count], kept[count:]
            self.log_dropped[task_id] = self.log_dropped.get(task_id, 0) + len(gone)
            for line in gone:
                self.log_totals_kept[(self.tasks[task_id]["operation"], line["stream"])][1] += 1

    def end_log(self, task_id: str, why: str = "complete") -> None:
        """Every follower of a task's log gets its last ``{"end": why, "next": N}``;
        ``"complete"`` also marks the log complete, ``"behind"`` only drops them."""
        with self._lock:
            if why == "complete":
                self._log_ended.add(task_id)
            kept = self.logs.get(task_id, [])
            followers = self.log_followers.pop(task_id, {})
            next_after = kept[-1]["seq"] if kept else 0
        for callback in followers.values():
            callback({"end": why, "next": next_after})

    def log_subscriber_count(self, task_id: str) -> int:
        """How many followers a task's log has."""
        return len(self.log_followers.get(task_id, {}))

    def drop_subscribers(self) -> None:
        """Give every subscriber the manager's last event for a subscriber that fell behind."""
        with self._lock:
            subscribers = list(self._subscribers.values())
            self._subscribers.clear()
        for callback, raw in subscribers:
            callback(DROPPED if raw else DROPPED.to_dict())

    def _touch(self, task: dict[str, Any]) -> None:
        task["meta"]["version"] += 1
        task["meta"]["timeModified"] = _now()

    def _emit(self, method: str, task: dict[str, Any]) -> None:
        task_id = task["meta"]["id"]
        scope: dict[str, Any] = {"operation": task["operation"], "state": task["state"]}
        if method == "POST":
            scope["meta.id"] = task_id
        snapshot = TaskSnapshot.from_wire(task)
        if task_id in self._killed and snapshot.outcome is not None:
            # NOTE: not on the wire; the real manager's snapshots carry it for the metrics
            snapshot.outcome = replace(snapshot.outcome, killed=True)
        change = ChangeEvent(method, "/tasks" if method == "POST" else f"/tasks/{task_id}",
                             scope, snapshot)
        for callback, raw in list(self._subscribers.values()):
            callback(change if raw else change.to_dict())

    def _maybe_break(self, method: str) -> None:
        if method in self.broken:
            raise self.broken[method]


class _Listed:
    """A fake's task dict as a list filter sees it."""

    def __init__(self, task: dict[str, Any], number: int) -> None:
        self.operation: str = task["operation"]
        self.object_id: str | None = task.get("objectId")
        self.number = number


class DummyAccessControl:
    """Access control from a table: token -> (subject, {action: operations})."""

    def __init__(self, grants: dict[str, dict[str, set[str]]]) -> None:
        self.grants = grants  #: token (also the subject's name) -> action -> operations

    def authenticate(self, req: Any) -> str | None:
        header = req.get_header("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token not in self.grants:
            return None
        return token

    def _can(self, subject: str, action: str, operation: str) -> bool:
        allowed = self.grants[subject].get(action, set())
        return "*" in allowed or operation in allowed

    def can_view(self, subject: str, operation: str) -> bool:
        return self._can(subject, "view", operation)

    def can_create(self, subject: str, operation: str) -> bool:
        return self._can(subject, "create", operation)

    def can_cancel(self, subject: str, operation: str) -> bool:
        return self._can(subject, "cancel", operation)


def register_misbehaving(manager: Any) -> None:
    """Register two of the manager tests' animators; for ``serve --animators fakes:...``.

    ``STUBBORN`` ignores cancel and SIGTERM (only the kill after the grace ends
    it); ``FORKER`` starts subprocesses of its own.
    """
    import animators

    manager.register_animator("STUBBORN", animators.Stubborn())
    manager.register_animator("FORKER", animators.Forker())
