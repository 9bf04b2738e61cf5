"""Worker slots and the queue: max_workers, FIFO start order, max_queued."""

from __future__ import annotations

import animators
import pytest
from conftest import EventLog, message_texts, wait_for, wait_state, wait_terminal

from supervisor import QueueFull

RUNNING = {"ACTIVE", "WAITING"}


def max_running(log: EventLog) -> int:
    """The most tasks the event stream ever showed running at once."""
    running: set[str] = set()
    most = 0
    for event in log.snapshot():
        tid = event["task"]["meta"]["id"]
        if event["method"] != "DELETE" and event["task"]["state"] in RUNNING:
            running.add(tid)
        else:
            running.discard(tid)
        most = max(most, len(running))
    return most


def activation_order(log: EventLog) -> list[str]:
    """Task ids in the order their first ACTIVE event arrived."""
    order: list[str] = []
    for event in log.snapshot():
        tid = event["task"]["meta"]["id"]
        if event["task"]["state"] == "ACTIVE" and tid not in order:
            order.append(tid)
    return order


def test_one_worker_starts_tasks_in_creation_order(manager):
    m = manager(max_workers=1)
    m.register_animator("COOP", animators.Cooperative())
    log = EventLog()
    m.subscribe(log)
    ids = [m.run_task({"operation": "COOP", "args": {"seconds": 0.05}}) for _ in range(6)]
    for tid in ids:
        assert wait_terminal(m, tid)["state"] == "SUCCEEDED"
    wait_for(lambda: all(log.states(tid)[-1:] == ["SUCCEEDED"] for tid in ids))
    assert activation_order(log) == ids
    assert max_running(log) == 1


def test_queued_tasks_stay_new_until_a_slot_frees(manager):
    m = manager(max_workers=1)
    m.register_animator("COOP", animators.Cooperative())
    first = m.run_task({"operation": "COOP"})
    wait_state(m, first, "ACTIVE")
    queued = [m.run_task({"operation": "COOP"}) for _ in range(3)]
    assert [m.get_task(t)["state"] for t in queued] == ["NEW"] * 3
    m.cancel_task(first)
    assert wait_terminal(m, first)["state"] == "CANCELED"
    wait_state(m, queued[0], "ACTIVE")
    assert [m.get_task(t)["state"] for t in queued[1:]] == ["NEW"] * 2
    for tid in queued:
        m.cancel_task(tid)
    for tid in queued:
        assert wait_terminal(m, tid)["state"] == "CANCELED"


def test_max_workers_bounds_running_tasks(manager):
    m = manager(max_workers=2)
    m.register_animator("COOP", animators.Cooperative())
    log = EventLog()
    m.subscribe(log)
    ids = [m.run_task({"operation": "COOP", "args": {"seconds": 0.3}}) for _ in range(5)]
    # Two really do run side by side.
    wait_for(lambda: max_running(log) == 2)
    for tid in ids:
        assert wait_terminal(m, tid)["state"] == "SUCCEEDED"
    wait_for(lambda: all(log.states(tid)[-1:] == ["SUCCEEDED"] for tid in ids))
    assert max_running(log) == 2
    assert activation_order(log) == ids


def test_queue_full(manager):
    m = manager(max_workers=1, max_queued=1)
    m.register_animator("COOP", animators.Cooperative())
    running = m.run_task({"operation": "COOP"})
    wait_state(m, running, "ACTIVE")
    queued = m.run_task({"operation": "COOP"})
    with pytest.raises(QueueFull):
        m.run_task({"operation": "COOP"})
    assert [t["meta"]["id"] for t in m.list_tasks()] == [running, queued]
    # A freed slot makes room again.
    m.cancel_task(running)
    wait_state(m, queued, "ACTIVE")
    third = m.run_task({"operation": "COOP"})
    assert m.get_task(third)["state"] == "NEW"
    with pytest.raises(QueueFull):
        m.run_task({"operation": "COOP"})


def test_canceled_queued_task_frees_its_queue_place(manager):
    m = manager(max_workers=1, max_queued=1)
    m.register_animator("COOP", animators.Cooperative())
    running = m.run_task({"operation": "COOP"})
    wait_state(m, running, "ACTIVE")
    queued = m.run_task({"operation": "COOP"})
    m.cancel_task(queued)
    assert m.get_task(queued)["state"] == "CANCELED"
    again = m.run_task({"operation": "COOP"})
    assert m.get_task(again)["state"] == "NEW"


def test_max_queued_zero_accepts_only_what_can_start(manager):
    m = manager(max_workers=1, max_queued=0)
    m.register_animator("COOP", animators.Cooperative())
    running = m.run_task({"operation": "COOP"})
    wait_state(m, running, "ACTIVE")
    with pytest.raises(QueueFull):
        m.run_task({"operation": "COOP"})
    m.cancel_task(running)
    wait_terminal(m, running)
    wait_for(lambda: _accepts(m))


def _accepts(m) -> bool:
    """True once run_task accepts a task (the freed slot may take a moment)."""
    try:
        m.run_task({"operation": "COOP", "args": {"seconds": 0}})
    except QueueFull:
        return False
    return True


def test_cancel_new_task_is_canceled_at_once(manager):
    m = manager(max_workers=1)
    m.register_animator("COOP", animators.Cooperative())
    log = EventLog()
    m.subscribe(log)
    running = m.run_task({"operation": "COOP"})
    wait_state(m, running, "ACTIVE")
    queued = m.run_task({"operation": "COOP"})
    assert m.cancel_task(queued) is None
    task = m.get_task(queued)
    assert task["state"] == "CANCELED"
    assert task["cancelRequested"] is True
    assert "State change NEW ⇒ CANCELED" in message_texts(task)
    m.cancel_task(running)
    assert wait_terminal(m, running)["state"] == "CANCELED"
    wait_for(lambda: log.states(running)[-1:] == ["CANCELED"])
    # The canceled task never ran.
    assert log.states(queued) == ["NEW", "CANCELED"]
