"""Every error the Manager API raises, and that a refused call leaves no trace."""

from __future__ import annotations

from typing import Any

import animators
import pytest
from conftest import EventLog, message_texts, wait_for, wait_terminal

from supervisor import (
    HousekeepingError,
    InvalidAnimator,
    InvalidArguments,
    LocalBackend,
    Manager,
    TaskNotFound,
    UnsupportedOperation,
)
from supervisor.backend import Launch


@pytest.fixture
def m(manager):
    """A manager that knows QUICK and VALID."""
    instance = manager()
    instance.register_animator("QUICK", animators.Quick())
    instance.register_animator("VALID", animators.Validating())
    return instance


def assert_nothing_recorded(m: Any, log: EventLog) -> None:
    """A refused run_task adds no task and sends no event."""
    assert m.list_tasks() == []
    # A task accepted afterwards is the first event the subscriber sees.
    tid = m.run_task({"operation": "QUICK"})
    wait_terminal(m, tid)
    assert log.snapshot()[0]["method"] == "POST"
    assert log.snapshot()[0]["task"]["meta"]["id"] == tid


@pytest.mark.parametrize("create", [None, [], "QUICK", 42, ("operation", "QUICK")])
def test_create_must_be_a_dict(m, create):
    log = EventLog()
    m.subscribe(log)
    with pytest.raises(InvalidArguments):
        m.run_task(create)
    assert_nothing_recorded(m, log)


@pytest.mark.parametrize(
    ("create", "field"),
    [
        ({}, "operation"),
        ({"args": {}}, "operation"),
        ({"operation": None}, "operation"),
        ({"operation": 5}, "operation"),
        ({"operation": ["QUICK"]}, "operation"),
        ({"operation": "QUICK", "objectId": 5}, "objectId"),
        ({"operation": "QUICK", "objectId": "x" * 129}, "objectId"),
        ({"operation": "QUICK", "objectId": ["vol"]}, "objectId"),
        ({"operation": "QUICK", "serviceStates": []}, "serviceStates"),
        ({"operation": "QUICK", "serviceStates": "up"}, "serviceStates"),
        ({"operation": "QUICK", "args": []}, "args"),
        ({"operation": "QUICK", "args": "megabytes=64"}, "args"),
    ],
)
def test_invalid_arguments_name_the_field(m, create, field):
    log = EventLog()
    m.subscribe(log)
    with pytest.raises(InvalidArguments, match=field):
        m.run_task(create)
    assert_nothing_recorded(m, log)


def test_longest_object_id_is_accepted(m):
    tid = m.run_task({"operation": "QUICK", "objectId": "x" * 128})
    task = wait_terminal(m, tid)
    assert task["state"] == "SUCCEEDED"
    assert task["objectId"] == "x" * 128


def test_unsupported_operation(m):
    log = EventLog()
    m.subscribe(log)
    with pytest.raises(UnsupportedOperation, match="NOPE"):
        m.run_task({"operation": "NOPE"})
    assert_nothing_recorded(m, log)


@pytest.mark.parametrize(
    ("reject", "error"),
    [
        ("value", ValueError),
        ("invalid", InvalidArguments),
        ("animator", InvalidAnimator),
        ("lookup", LookupError),
    ],
)
def test_exception_from_validate_surfaces(m, reject, error):
    log = EventLog()
    m.subscribe(log)
    with pytest.raises(InvalidArguments if error is LookupError else error) as info:
        m.run_task({"operation": "VALID", "args": {"reject": reject}})
    assert str(info.value)
    if error is LookupError:
        # Any other exception is reported as InvalidArguments, chained.
        assert isinstance(info.value.__cause__, LookupError)
    assert_nothing_recorded(m, log)


@pytest.mark.parametrize(
    "animator",
    [object(), "QUICK", animators.Quick, lambda ops: None],
    ids=["object", "str", "class", "function"],
)
def test_register_a_non_animator(manager, animator):
    m = manager()
    with pytest.raises(TypeError):
        m.register_animator("BAD", animator)
    with pytest.raises(UnsupportedOperation):
        m.run_task({"operation": "BAD"})


def test_register_an_unpicklable_animator(manager):
    m = manager()
    with pytest.raises(TypeError):
        m.register_animator("LOCKED", animators.HoldsLock())
    with pytest.raises(UnsupportedOperation):
        m.run_task({"operation": "LOCKED"})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"purge_delay": -1},
        {"purge_delay": -0.001},
        {"max_workers": 0},
        {"max_workers": -3},
        {"max_queued": -1},
        {"cancel_grace": -0.1},
    ],
    ids=lambda kwargs: "-".join(f"{k}={v}" for k, v in kwargs.items()),
)
def test_bad_manager_settings(kwargs):
    with pytest.raises(ValueError):
        Manager(**kwargs)


def test_edge_manager_settings_are_fine(manager):
    m = manager(purge_delay=0, max_workers=1, max_queued=0, cancel_grace=0)
    m.register_animator("QUICK", animators.Quick())
    log = EventLog()
    m.subscribe(log)
    tid = m.run_task({"operation": "QUICK"})
    wait_for(lambda: log.has(tid, "DELETE"))
    assert log.states(tid) == ["NEW", "ACTIVE", "SUCCEEDED"]


def test_cancel_unknown_task(m):
    with pytest.raises(TaskNotFound):
        m.cancel_task("QUICK999999")


def test_cancel_finished_task(m):
    tid = m.run_task({"operation": "QUICK"})
    assert wait_terminal(m, tid)["state"] == "SUCCEEDED"
    with pytest.raises(TaskNotFound):
        m.cancel_task(tid)
    assert m.get_task(tid)["state"] == "SUCCEEDED"
    assert m.get_task(tid)["cancelRequested"] is False


def test_error_hierarchy():
    for error in (InvalidArguments, InvalidAnimator, TaskNotFound, UnsupportedOperation):
        assert issubclass(error, HousekeepingError)
    assert issubclass(InvalidArguments, ValueError)
    assert issubclass(TaskNotFound, LookupError)


class StartRaisesOnce(LocalBackend):
    """A local backend whose first ``start`` raises (a bug in a backend)."""

    raised = False

    def start(self, launch: Launch) -> bool:
        if not self.raised:
            self.raised = True
            raise RuntimeError("backend bug")
        return super().start(launch)


def test_a_start_that_raises_fails_that_task_only(manager):
    """An exception from the backend's ``start`` (run outside the lock) fails that task,
    is logged, and neither stalls the queue nor the loop: the next task runs."""
    m = manager(max_workers=1, backend=StartRaisesOnce())
    m.register_animator("QUICK", animators.Quick())
    first = m.run_task({"operation": "QUICK"})
    failed = wait_terminal(m, first)
    assert failed["state"] == "FAILED", message_texts(failed)
    assert "could not be started: RuntimeError: backend bug" in message_texts(failed)
    second = wait_terminal(m, m.run_task({"operation": "QUICK"}))
    assert second["state"] == "SUCCEEDED", message_texts(second)
    assert m.counts()["running"] == 0
