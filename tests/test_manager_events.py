"""Change events: order, shape, and subscribers that misbehave."""

from __future__ import annotations

import logging
import threading

import animators
from conftest import EventLog, wait_for, wait_state, wait_terminal


def test_post_then_patches_then_delete(manager):
    m = manager(purge_delay=0.1)
    m.register_animator("TALK", animators.Talker())
    log = EventLog()
    m.subscribe(log)
    ids = [m.run_task({"operation": "TALK", "args": {"count": 3}}) for _ in range(3)]
    wait_for(lambda: all(log.has(tid, "DELETE") for tid in ids))
    for tid in ids:
        events = log.of(tid)
        methods = [e["method"] for e in events]
        assert methods[0] == "POST"
        assert methods[-1] == "DELETE"
        assert set(methods[1:-1]) == {"PATCH"}
        versions = [e["task"]["meta"]["version"] for e in events[:-1]]
        assert versions == list(range(1, len(versions) + 1))
        assert events[-1]["task"]["meta"]["version"] >= versions[-1]
        assert events[-2]["task"]["state"] == "SUCCEEDED"


def test_event_shape(manager):
    m = manager(purge_delay=0)
    m.register_animator("QUICK", animators.Quick())
    log = EventLog()
    m.subscribe(log)
    tid = m.run_task({"operation": "QUICK"})
    wait_for(lambda: log.has(tid, "DELETE"))
    post, *patches, delete = log.of(tid)
    assert post["uri"] == "/tasks"
    assert post["scope"] == {"meta.id": tid, "operation": "QUICK", "state": "NEW"}
    assert post["task"]["meta"]["id"] == tid
    for event in [*patches, delete]:
        assert event["uri"] == f"/tasks/{tid}"
        assert "meta.id" not in event["scope"]
        assert event["scope"]["operation"] == "QUICK"
        assert event["scope"]["state"] == event["task"]["state"]
    assert delete["task"]["state"] == "SUCCEEDED"


def test_events_arrive_in_change_order_across_tasks(manager):
    m = manager(max_workers=2)
    m.register_animator("QUICK", animators.Quick())
    m.register_animator("ASYNC", animators.AsyncQuick())
    log = EventLog()
    m.subscribe(log)
    ids = [m.run_task({"operation": op}) for op in ["QUICK", "ASYNC"] * 5]
    wait_for(lambda: all(log.states(tid)[-1:] == ["SUCCEEDED"] for tid in ids))
    posts = [e["task"]["meta"]["id"] for e in log.snapshot() if e["method"] == "POST"]
    assert posts == ids
    last_version: dict[str, int] = {}
    for event in log.snapshot():
        tid = event["task"]["meta"]["id"]
        version = event["task"]["meta"]["version"]
        assert version == last_version.get(tid, 0) + 1
        last_version[tid] = version


def test_two_subscribers_see_the_same_stream(manager):
    m = manager()
    m.register_animator("TALK", animators.Talker())
    first, second = EventLog(), EventLog()
    m.subscribe(first)
    m.subscribe(second)
    tid = m.run_task({"operation": "TALK", "args": {"count": 4}})
    wait_for(lambda: first.states(tid)[-1:] == ["SUCCEEDED"])
    wait_for(lambda: second.states(tid)[-1:] == ["SUCCEEDED"])
    assert first.snapshot() == second.snapshot()


def test_unsubscribe(manager):
    m = manager()
    m.register_animator("QUICK", animators.Quick())
    gone, stays = EventLog(), EventLog()
    unsubscribe = m.subscribe(gone)
    m.subscribe(stays)
    before = m.run_task({"operation": "QUICK"})
    wait_for(lambda: gone.states(before)[-1:] == ["SUCCEEDED"])
    unsubscribe()
    unsubscribe()  # harmless twice
    count = len(gone.snapshot())
    after = [m.run_task({"operation": "QUICK"}) for _ in range(2)]
    for tid in after:
        wait_for(lambda tid=tid: stays.states(tid)[-1:] == ["SUCCEEDED"])
    assert len(gone.snapshot()) == count
    assert not any(gone.of(tid) for tid in after)


def test_raising_subscriber_does_not_stall_anything(manager):
    m = manager()
    m.register_animator("QUICK", animators.Quick())
    calls = []

    def explode(event):
        calls.append(event)
        raise RuntimeError("subscriber bug")

    m.subscribe(explode)
    log = EventLog()
    m.subscribe(log)
    ids = [m.run_task({"operation": "QUICK"}) for _ in range(3)]
    for tid in ids:
        assert wait_terminal(m, tid)["state"] == "SUCCEEDED"
        wait_for(lambda tid=tid: log.states(tid)[-1:] == ["SUCCEEDED"])
    # The failing subscriber is still called for every event.
    wait_for(lambda: len(calls) >= len(log.snapshot()))


def test_blocked_subscriber_does_not_stall_anything(manager):
    m = manager()
    m.register_animator("TALK", animators.Talker())
    release = threading.Event()
    blocked_calls = []

    def block(event):
        blocked_calls.append(event)
        release.wait(60)

    m.subscribe(block)
    log = EventLog()
    m.subscribe(log)
    try:
        ids = [m.run_task({"operation": "TALK", "args": {"count": 5}}) for _ in range(3)]
        for tid in ids:
            assert wait_terminal(m, tid)["state"] == "SUCCEEDED"
            wait_for(lambda tid=tid: log.states(tid)[-1:] == ["SUCCEEDED"])
        assert len(blocked_calls) == 1
    finally:
        release.set()
    # Once released, it catches up in order.
    wait_for(lambda: len(blocked_calls) == len(log.snapshot()))
    assert blocked_calls == log.snapshot()


def test_slow_subscriber_is_dropped_past_its_backlog(manager, caplog):
    caplog.set_level(logging.DEBUG)
    m = manager(max_workers=1, purge_delay=0)
    m.register_animator("COOP", animators.Cooperative())
    release = threading.Event()
    slow_calls = []

    def slow(event):
        slow_calls.append(event)
        release.wait(120)

    m.subscribe(slow)
    fast = EventLog()
    m.subscribe(fast)
    try:
        blocker = m.run_task({"operation": "COOP"})
        wait_state(m, blocker, "ACTIVE")
        # NEW then CANCELED at once then purged: at least three events per round,
        # with no child process involved, so the backlog fills quickly.
        rounds = 4_000
        for i in range(rounds):
            m.cancel_task(m.run_task({"operation": "COOP"}))
            if i % 500 == 499:
                wait_for(lambda i=i: sum(
                    1 for e in fast.snapshot() if e["method"] == "POST") >= i + 2)

        def dropped():
            return [r for r in caplog.records
                    if any(w in r.getMessage().lower() for w in ("drop", "behind", "backlog"))]

        wait_for(dropped, message=lambda: f"{len(caplog.records)} log records")
        # The manager and the other subscriber kept going all along.
        m.cancel_task(blocker)
        wait_for(lambda: fast.has(blocker, "DELETE"))
        assert len(fast.snapshot()) >= 3 * rounds
        assert len(slow_calls) == 1
    finally:
        release.set()
    assert len(slow_calls) <= 10_001 + 10
