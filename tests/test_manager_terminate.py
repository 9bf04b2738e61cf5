"""terminate(): refuse new work, cancel everything, and return only when nothing is alive."""

from __future__ import annotations

import time
from typing import Any

import animators
import psutil
import pytest
from conftest import (
    TERMINAL,
    EventLog,
    descendants,
    describe,
    is_alive,
    message_texts,
    wait_for,
    wait_state,
)

from supervisor import Manager, ManagerTerminated, TaskNotFound


def new_descendants(before: dict) -> list[str]:
    """Processes below the test process that were not there in ``before``."""
    return [describe(p) for key, p in descendants().items() if key not in before]


def ready_procs(m: Any, tid: str) -> list[psutil.Process]:
    """The task's process and the ones it started, once it says it is ready."""
    info = wait_for(lambda: animators.ready_info(m.get_task(tid)))
    return [psutil.Process(pid) for pid in [info["pid"], *info.get("children", [])]]


def test_terminate_with_everything_running(manager, tmp_path):
    grace = 0.5
    before = descendants()
    m = manager(cancel_grace=grace, max_workers=6)
    for operation, animator in [
        ("COOP", animators.Cooperative()),
        ("ASLEEP", animators.AsyncSleeper()),
        ("STUBBORN", animators.Stubborn()),
        ("FORK", animators.Forker()),
        ("DAEMON", animators.Daemon()),
        ("WAIT", animators.Waiting()),
    ]:
        m.register_animator(operation, animator)
    ids = {
        "COOP": m.run_task({"operation": "COOP"}),
        "ASLEEP": m.run_task({"operation": "ASLEEP"}),
        "STUBBORN": m.run_task({"operation": "STUBBORN"}),
        "FORK": m.run_task({"operation": "FORK"}),
        "DAEMON": m.run_task({"operation": "DAEMON",
                              "args": {"pidfile": str(tmp_path / "daemon.pid")}}),
        "WAIT": m.run_task({"operation": "WAIT", "args": {"gate": str(tmp_path / "never")}}),
    }
    procs = []
    for operation, tid in ids.items():
        if operation == "WAIT":
            wait_state(m, tid, "WAITING")
        else:
            procs += ready_procs(m, tid)
    queued = m.run_task({"operation": "COOP"})
    assert m.get_task(queued)["state"] == "NEW"

    began = time.monotonic()
    m.terminate()
    elapsed = time.monotonic() - began
    # Nothing is alive the moment terminate() returns: no retries here.
    assert not [describe(p) for p in procs if is_alive(p)]
    assert new_descendants(before) == []
    assert grace <= elapsed < grace + 10, elapsed
    for tid in [*ids.values(), queued]:
        task = m.get_task(tid)
        assert task["state"] == "CANCELED", (tid, message_texts(task))
        assert task["cancelRequested"] is True


def test_terminate_is_idempotent(manager):
    before = descendants()
    m = manager()
    m.register_animator("COOP", animators.Cooperative())
    tid = m.run_task({"operation": "COOP"})
    wait_state(m, tid, "ACTIVE")
    m.terminate()
    began = time.monotonic()
    m.terminate()
    assert time.monotonic() - began < 1
    assert m.get_task(tid)["state"] == "CANCELED"
    assert new_descendants(before) == []


def test_terminate_of_an_idle_manager_leaves_no_helper(manager):
    before = descendants()
    m = manager()
    m.register_animator("QUICK", animators.Quick())
    tid = m.run_task({"operation": "QUICK"})
    wait_for(lambda: m.get_task(tid)["state"] in TERMINAL)
    wait_for(lambda: new_descendants(before))  # the starter and warm processes
    m.terminate()
    assert new_descendants(before) == []


def test_terminate_does_not_wait_the_grace_for_nothing(manager):
    m = manager(cancel_grace=20)
    m.register_animator("COOP", animators.Cooperative())
    m.register_animator("ASLEEP", animators.AsyncSleeper())
    ids = [m.run_task({"operation": op}) for op in ("COOP", "ASLEEP")]
    for tid in ids:
        ready_procs(m, tid)
    began = time.monotonic()
    m.terminate()
    assert time.monotonic() - began < 5
    assert [m.get_task(tid)["state"] for tid in ids] == ["CANCELED", "CANCELED"]


def test_task_finishing_during_the_grace_keeps_its_state(manager):
    m = manager(cancel_grace=10)
    m.register_animator("IGNORE", animators.IgnoreCancel())
    tid = m.run_task({"operation": "IGNORE", "args": {"linger": 0.2}})
    ready_procs(m, tid)
    m.terminate()
    task = m.get_task(tid)
    assert task["state"] == "SUCCEEDED", message_texts(task)
    assert task["result"] == "finished anyway"


def test_new_work_refused_after_terminate(manager):
    m = manager()
    m.register_animator("QUICK", animators.Quick())
    done = m.run_task({"operation": "QUICK"})
    wait_for(lambda: m.get_task(done)["state"] in TERMINAL)
    m.terminate()
    with pytest.raises(ManagerTerminated):
        m.run_task({"operation": "QUICK"})
    with pytest.raises(TaskNotFound):
        m.cancel_task(done)
    assert [t["meta"]["id"] for t in m.list_tasks()] == [done]


def test_context_manager(manager):
    before = descendants()
    with Manager(cancel_grace=0.5) as m:
        m.register_animator("COOP", animators.Cooperative())
        tid = m.run_task({"operation": "COOP"})
        procs = ready_procs(m, tid)
    assert m.get_task(tid)["state"] == "CANCELED"
    assert not [describe(p) for p in procs if is_alive(p)]
    assert new_descendants(before) == []
    with pytest.raises(ManagerTerminated):
        m.run_task({"operation": "COOP"})


def test_context_manager_terminates_on_error(manager):
    before = descendants()
    with pytest.raises(KeyError), Manager(cancel_grace=0.5) as m:
        m.register_animator("COOP", animators.Cooperative())
        tid = m.run_task({"operation": "COOP"})
        ready_procs(m, tid)
        raise KeyError("boom")
    assert m.get_task(tid)["state"] == "CANCELED"
    assert new_descendants(before) == []


def test_subscribers_see_the_cancellations(manager):
    m = manager()
    m.register_animator("COOP", animators.Cooperative())
    log = EventLog()
    m.subscribe(log)
    tid = m.run_task({"operation": "COOP"})
    ready_procs(m, tid)
    m.terminate()
    wait_for(lambda: log.states(tid)[-1:] == ["CANCELED"])
