"""The seams: the REST layer's FakeManager keeps the real Manager's contract; task-side
processes import no parent code; one thread owns the shutdown."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
from typing import Any

import animators
import hypothesis.strategies as st
import psutil
import pytest
from conftest import TIMEOUT, message_texts, pids_gone, wait_for
from conftest import wait_terminal as wait_terminal_of
from fakes import FakeManager
from hypothesis import given

from rest.resources import TaskManager
from supervisor import (
    IdempotencyConflict,
    InvalidArguments,
    Manager,
    TaskNotFound,
    UnsupportedOperation,
)
from supervisor.backend import Backend, Host, Launch, Registration
from supervisor.outcome import Ending, Outcome, OutcomeKind

# -- FakeManager against the Manager -----------------------------------------------------

#: the methods of the TaskManager protocol (what the REST layer calls)
PROTOCOL_METHODS = sorted(
    name for name, member in vars(TaskManager).items()
    if callable(member) and not name.startswith("_"))


def test_the_protocol_is_not_empty() -> None:
    assert {"run_task", "get_snapshot", "cancel_task", "subscribe_changes"} <= set(
        PROTOCOL_METHODS)


@pytest.mark.parametrize("name", PROTOCOL_METHODS)
def test_fake_and_real_take_the_same_parameters(name: str) -> None:
    def shape(cls: type) -> list[tuple[str, Any, bool]]:
        parameters = inspect.signature(getattr(cls, name)).parameters.values()
        return [(p.name, p.kind, p.default is inspect.Parameter.empty) for p in parameters]

    assert shape(FakeManager) == shape(Manager), name
    assert shape(Manager) == shape(TaskManager), name


def _scenario(m: Any) -> dict[str, Any]:
    """What the REST layer can see of a manager, as comparable data."""
    seen: dict[str, Any] = {}
    events: list[str] = []

    def record(event: Any) -> None:
        # NOTE: HASH tasks only: the real manager's running SLEEP task reports progress
        if event.task.operation == "HASH":
            events.append(f"{event.method} {event.task.state}")

    m.subscribe_changes(record)
    task_id = m.run_task({"operation": "HASH", "objectId": "o-1", "args": {"x": [1, 2]},
                          "serviceStates": {"s": "up"}})
    task = m.get_snapshot(task_id).to_dict()
    seen["keys"] = sorted(task)
    seen["meta"] = sorted(task["meta"])
    seen["new"] = {k: task[k] for k in ("operation", "objectId", "args", "serviceStates",
                                         "state", "cancelRequested", "result")}
    seen["version"] = task["meta"]["version"]
    seen["json"] = json.loads(m.get_snapshot(task_id).json()) == task
    seen["listed"] = [s.id for s in m.list_snapshots("HASH")] == [task_id]
    seen["other"] = m.list_snapshots("NOPE")
    for bad, error in (({"operation": "NOPE"}, UnsupportedOperation),
                       ({"operation": "HASH", "bogus": 1}, InvalidArguments)):
        with pytest.raises(error):
            m.run_task(bad)
    with pytest.raises(TaskNotFound):
        m.get_snapshot("NOPE000001")
    with pytest.raises(TaskNotFound):
        m.cancel_task("NOPE000001")
    queued = m.run_task({"operation": "HASH"})
    m.cancel_task(queued)
    canceled = m.get_snapshot(queued).to_dict()
    seen["canceled"] = (canceled["state"], canceled["outcome"], canceled["cancelRequested"],
                        message_texts(canceled)[-2:])
    with pytest.raises(TaskNotFound):
        m.cancel_task(queued)
    wait_for(lambda: len(events) >= 3)  # NOTE: the manager delivers on a thread of its own
    seen["events"] = events[:3]
    body = {"operation": "HASH", "objectId": "o-2", "args": {"k": 1}}
    first = m.create_task(dict(body), idempotency_key="key-1")
    again = m.create_task({"args": {"k": 1}, "objectId": "o-2", "operation": "HASH"},
                          idempotency_key="key-1")
    seen["idempotent"] = (first.replayed, again.replayed, again.task_id == first.task_id,
                          m.run_task(dict(body), "key-1") == first.task_id)
    for bad_key, error in (("key-1", IdempotencyConflict), ("not a key", InvalidArguments)):
        with pytest.raises(error):
            m.run_task({"operation": "HASH"}, idempotency_key=bad_key)
    names = {task_id: "first", queued: "queued", first.task_id: "keyed"}

    def listed(**filters: Any) -> list[tuple[str, str]]:
        return [(names.get(s.id, s.id), s.state) for s in m.list_snapshots("HASH", **filters)]

    seen["pages"] = [listed(limit=2), listed(after=task_id), listed(after=queued, limit=1),
                     listed(state=["CANCELED", "NEW"], object_id="o-2"),
                     listed(state="CANCELED")]
    for bad in ({"after": "NOPE000001"}, {"state": "DONE"}, {"limit": 0}):
        with pytest.raises(ValueError):
            m.list_snapshots("HASH", **bad)
    seen["log"] = m.get_log(queued)
    seen["operations"] = [o["operation"] for o in m.operations()]
    seen["counts"] = sorted(m.counts())
    return seen


def test_fake_behaves_as_the_manager(manager: Any) -> None:
    fake = FakeManager()
    real = manager(max_workers=1)
    real.register_animator("SLEEP", animators.Cooperative())
    real.register_animator("HASH", animators.Quick())
    # NOTE: the real one's slot is taken, so that its HASH tasks wait as the fake's do
    sleeper = real.run_task({"operation": "SLEEP"})
    wait_for(lambda: real.get_task(sleeper)["state"] == "ACTIVE")
    expected = _scenario(real)
    assert _scenario(fake) == expected


# -- what task-side processes import ----------------------------------------------------


def test_task_side_processes_import_no_parent_code() -> None:
    code = ("import sys, workers.starter, workers.child, workers.pid1; "
            "print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True, timeout=TIMEOUT).stdout.split())
    parent_side = {"supervisor.manager", "supervisor.dispatcher", "supervisor.ledger",
                   "supervisor.backends", "supervisor.events", "psutil", "falcon", "rest",
                   "distributed"}
    assert not parent_side & loaded, parent_side & loaded
    assert {"supervisor.protocol", "supervisor.outcome"} <= loaded


def test_the_package_still_exports_everything() -> None:
    import supervisor

    for name in supervisor.__all__:
        assert getattr(supervisor, name) is not None, name


# -- one thread owns the shutdown -------------------------------------------------------


def test_terminate_while_the_starter_dies(manager: Any, caplog: pytest.LogCaptureFixture,
                                          ) -> None:
    """The starter is killed and terminate() runs at once, many times: no descriptor is
    closed twice, nothing is left, every task ends."""
    caplog.set_level(logging.ERROR)
    for _ in range(12):
        m = manager(max_workers=1, cancel_grace=0.2)
        m.register_animator("COOP", animators.Cooperative())
        task_id = m.run_task({"operation": "COOP"})
        info = wait_for(lambda m=m, task_id=task_id: animators.ready_info(m.get_task(task_id)))
        starter = psutil.Process(info["ppid"])
        assert starter.ppid() == os.getpid()
        starter.send_signal(signal.SIGKILL)
        m.terminate()
        assert m.get_task(task_id)["state"] in ("FAILED", "CANCELED")
        assert pids_gone(info["pid"], info["ppid"])
    bad = [r for r in caplog.records if r.exc_info or "Bad file descriptor" in r.getMessage()
           or "shutdown" in r.getMessage()]
    assert not bad, [r.getMessage() for r in bad]


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_the_wire_stamp_is_datetimes_own(when: float) -> None:
    """utc_stamp formats the second once and the microseconds each time: the same text."""
    from datetime import UTC, datetime

    from supervisor.wire import STAMP_FORMAT, utc_stamp

    assert utc_stamp(when) == datetime.fromtimestamp(when, UTC).strftime(STAMP_FORMAT)


@given(operation=st.text(min_size=1, max_size=20), object_id=st.none() | st.text(max_size=20),
       state=st.sampled_from(["NEW", "ACTIVE", "WAITING", "CANCELED", "FAILED", "SUCCEEDED"]),
       canceled=st.booleans(), version=st.integers(1, 10**9),
       when=st.floats(min_value=0, max_value=4e9, allow_nan=False),
       notes=st.lists(st.text(max_size=10), max_size=3))
def test_a_spliced_snapshot_is_the_compact_json_of_its_fields(
        operation: str, object_id: str | None, state: str, canceled: bool, version: int,
        when: float, notes: list[str]) -> None:
    from supervisor.wire import Message, TaskSnapshot, encode_json, utc_stamp

    stamp = utc_stamp(when)
    messages = tuple(Message(stamp, text) for text in notes)
    snapshot = TaskSnapshot.build(
        task_id="OP000001", operation=operation, object_id=object_id, state=state,
        version=version, time_created=stamp, time_modified=stamp, cancel_requested=canceled,
        service_states_json=b"{}", args_json=b'{"a":[1]}', messages=messages,
        result_json=None, progress=None)
    expected: dict[str, Any] = {
        "meta": {"id": "OP000001", "objType": "Task", "version": version,
                 "timeCreated": stamp, "timeModified": stamp},
        "operation": operation, "serviceStates": {}, "args": {"a": [1]}, "state": state,
        "cancelRequested": canceled,
        "messages": [{"time": stamp, "message": text} for text in notes], "result": None}
    if object_id is not None:
        expected["objectId"] = object_id
    assert snapshot.json() == encode_json(expected)
    assert snapshot.json() is snapshot.json()  # kept once joined (a small document)


class _ReturnsAtOnce(Backend):
    """A backend whose tasks run remotely (NEW until a report) and end SUCCEEDED with
    no report at all, as a Dask task whose reports were lost does."""

    starts_running = False

    async def open(self, host: Host) -> None:
        self._host = host

    def can_start(self, registration: Registration) -> bool:
        return True

    def start(self, launch: Launch) -> bool:
        ending = Ending(Outcome(OutcomeKind.RETURNED, ""), "42")
        loop = asyncio.get_running_loop()
        loop.call_soon(self.host.task_finished, launch.task_id, ending)
        loop.call_soon(self.host.task_output_closed, launch.task_id)
        return True

    def cancel(self, task_id: str) -> None:
        pass

    def kill(self, task_id: str, reason: str) -> None:
        pass

    async def shutdown(self) -> None:
        pass


def test_a_remote_task_that_returns_with_no_report_ran(manager: Any) -> None:
    m = manager(backend=_ReturnsAtOnce(), max_workers=1)
    m.register_animator("QUICK", animators.Quick())
    task = wait_terminal_of(m, m.run_task({"operation": "QUICK"}))
    assert task["state"] == "SUCCEEDED" and task["result"] == 42, task
    assert message_texts(task) == ["State change NEW ⇒ ACTIVE",
                                   "State change ACTIVE ⇒ SUCCEEDED"]
