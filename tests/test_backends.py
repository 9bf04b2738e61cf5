"""The same behaviour on both backends: the same animators, the same tests.

Each test runs once with the local backend and once with the Dask backend on
a LocalCluster of two single-threaded worker processes (``backend_manager``
in conftest). Task processes of both run on this machine, so the tests can
check with psutil that every tree is gone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import animators
import outcome_animators
import pytest
from conftest import (
    EventLog,
    message_texts,
    pids_gone,
    wait_for,
    wait_ready,
    wait_state,
    wait_terminal,
)
from test_outcomes import SIMPLE, check_simple

pytestmark = pytest.mark.slow


def test_lifecycle_result_events_and_messages(
    backend_manager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    m = backend_manager()
    log = EventLog()
    m.subscribe(log)
    m.register_animator("QUICK", animators.Quick())
    task_id = m.run_task({"operation": "QUICK", "objectId": "vol-1", "args": {"n": 1}})
    task = wait_terminal(m, task_id)
    assert task["state"] == "SUCCEEDED", task
    # the child saw the supervisor's own task record, id included
    assert task["result"] == {"id": task_id, "args": {"n": 1}}
    assert task["objectId"] == "vol-1"
    assert message_texts(task) == ["State change NEW ⇒ ACTIVE", "State change ACTIVE ⇒ SUCCEEDED"]
    wait_for(lambda: log.has(task_id, "PATCH") and log.states(task_id)[-1] == "SUCCEEDED")
    assert log.states(task_id) == ["NEW", "ACTIVE", "SUCCEEDED"]
    versions = [e["task"]["meta"]["version"] for e in log.of(task_id)]
    assert versions == list(range(1, len(versions) + 1))
    # the outcome waited for every report, and every report came
    assert not [r for r in caplog.records if "reports arrived" in r.getMessage()]


def test_async_animator(backend_manager: Any) -> None:
    m = backend_manager()
    m.register_animator("ASYNC", animators.AsyncQuick())
    task_id = m.run_task({"operation": "ASYNC"})
    assert wait_terminal(m, task_id)["result"] == {"async": True, "id": task_id}


def test_messages_progress_and_waiting_in_order(backend_manager: Any, tmp_path: Path) -> None:
    m = backend_manager()
    m.register_animator("TALK", animators.Talker())
    m.register_animator("PROGRESS", animators.ProgressFlood())
    m.register_animator("WAIT", animators.Waiting())
    talk = m.run_task({"operation": "TALK", "args": {"count": 5}})
    flood = m.run_task({"operation": "PROGRESS", "args": {"n": 200_000}})
    done = wait_terminal(m, talk)
    assert done["result"] == 5
    assert message_texts(done)[1:6] == [f"note {i}" for i in range(5)]
    flooded = wait_terminal(m, flood)
    assert flooded["state"] == "SUCCEEDED"
    assert flooded["progress"]["percentComplete"] == 100
    assert flooded["progress"]["offsetBytes"] == 200_000  # the last value wins
    assert flooded["meta"]["version"] < 1000  # coalesced, not one change per call

    gate = tmp_path / "gate"
    waiting = m.run_task({"operation": "WAIT", "args": {"gate": str(gate)}})
    wait_state(m, waiting, "WAITING")
    gate.touch()
    through = wait_terminal(m, waiting)
    assert through["result"] == "through the gate"
    assert [t for t in message_texts(through) if t.startswith("State change")] == [
        "State change NEW ⇒ ACTIVE", "State change ACTIVE ⇒ WAITING",
        "State change WAITING ⇒ ACTIVE", "State change ACTIVE ⇒ SUCCEEDED",
    ]


def test_cooperative_cancel(backend_manager: Any) -> None:
    m = backend_manager(cancel_grace=10)
    m.register_animator("COOP", animators.Cooperative())
    task_id = m.run_task({"operation": "COOP"})
    pid = wait_ready(m, task_id)["pid"]
    wait_for(lambda: m.get_task(task_id).get("progress"))
    started = time.monotonic()
    m.cancel_task(task_id)
    task = wait_terminal(m, task_id)
    assert task["state"] == "CANCELED" and task["cancelRequested"] is True
    assert time.monotonic() - started < 5  # honoured, not killed after the 10 s grace
    assert not any("killed" in text for text in message_texts(task)), task
    wait_for(lambda: pids_gone(pid), timeout=5)


def test_forced_cancel_kills_a_stubborn_tree(backend_manager: Any) -> None:
    m = backend_manager(cancel_grace=0.5)
    m.register_animator("STUBBORN", animators.Stubborn())
    m.register_animator("FORKER", animators.Forker())
    stubborn = m.run_task({"operation": "STUBBORN"})
    forker = m.run_task({"operation": "FORKER"})
    info = wait_ready(m, stubborn)
    tree = wait_ready(m, forker)
    m.cancel_task(stubborn)
    m.cancel_task(forker)
    task = wait_terminal(m, stubborn)
    assert task["state"] == "CANCELED"
    assert "killed after cancel grace period (0.5 s)" in message_texts(task)
    assert wait_terminal(m, forker)["state"] == "CANCELED"
    wait_for(lambda: pids_gone(info["pid"], tree["pid"], *tree["children"]), timeout=5)


@pytest.mark.parametrize(("animator", "words"), [
    (animators.Segfault(), "SIGSEGV"),
    (animators.ExitThree(), "exited with code 3"),
    (animators.Raise(), "boom"),
    (animators.AsyncRaise(), "async boom"),
])
def test_crashes_fail_naming_the_cause(backend_manager: Any, animator: Any, words: str) -> None:
    m = backend_manager()
    m.register_animator("CRASH", animator)
    task = wait_terminal(m, m.run_task({"operation": "CRASH"}))
    assert task["state"] == "FAILED"
    assert any(words in text for text in message_texts(task)), task


def test_crash_leaving_children_kills_them(backend_manager: Any, tmp_path: Path) -> None:
    m = backend_manager()
    m.register_animator("FORKER", animators.Forker())
    gate = tmp_path / "gate"
    task_id = m.run_task({"operation": "FORKER", "args": {"mode": "crash", "gate": str(gate)}})
    info = wait_ready(m, task_id)
    gate.touch()
    assert wait_terminal(m, task_id)["state"] == "FAILED"
    wait_for(lambda: pids_gone(*info["children"]), timeout=5)


def test_timeout(backend_manager: Any) -> None:
    m = backend_manager()
    m.register_animator("SLOW", animators.Stubborn(), timeout=1.0)
    task_id = m.run_task({"operation": "SLOW"})
    pid = wait_ready(m, task_id)["pid"]
    task = wait_terminal(m, task_id)
    assert task["state"] == "FAILED"
    assert "timed out after 1 s" in message_texts(task)
    wait_for(lambda: pids_gone(pid), timeout=5)


def test_memory_limit(backend_manager: Any) -> None:
    m = backend_manager()
    m.register_animator("HOG", animators.MemoryHog(), max_memory=512 * 1024 * 1024)
    task = wait_terminal(m, m.run_task({"operation": "HOG", "args": {"bytes": 2 << 30}}))
    assert task["state"] == "FAILED"
    assert any("memory limit exceeded" in text for text in message_texts(task)), task
    small = wait_terminal(m, m.run_task({"operation": "HOG", "args": {"bytes": 1 << 20}}))
    assert small["state"] == "SUCCEEDED" and small["result"] == 1 << 20


def test_max_workers_bounds_tasks_in_flight(backend_manager: Any) -> None:
    m = backend_manager(max_workers=1)
    m.register_animator("COOP", animators.Cooperative())
    first = m.run_task({"operation": "COOP"})
    second = m.run_task({"operation": "COOP"})
    wait_ready(m, first)
    assert m.get_task(second)["state"] == "NEW"
    assert m.counts()["running"] == 1
    m.cancel_task(first)
    wait_terminal(m, first)
    wait_ready(m, second)
    m.cancel_task(second)
    assert wait_terminal(m, second)["state"] == "CANCELED"


def test_terminate_cancels_and_kills_every_tree(backend_manager: Any) -> None:
    m = backend_manager(cancel_grace=0.5)
    m.register_animator("STUBBORN", animators.Stubborn())
    m.register_animator("COOP", animators.Cooperative())
    stubborn = m.run_task({"operation": "STUBBORN"})
    coop = m.run_task({"operation": "COOP"})
    pids = [wait_ready(m, stubborn)["pid"], wait_ready(m, coop)["pid"]]
    m.terminate()
    assert m.get_task(stubborn)["state"] == "CANCELED"
    assert m.get_task(coop)["state"] == "CANCELED"
    wait_for(lambda: pids_gone(*pids), timeout=5)


@pytest.mark.parametrize(("operation", "args", "kind", "exit_code", "sig", "error_type"),
                         SIMPLE, ids=[row[2] + "-" + row[0] for row in SIMPLE])
def test_outcome_kinds_and_usage(backend_manager: Any, operation: str, args: dict[str, Any],
                                 kind: str, exit_code: int | None, sig: str | None,
                                 error_type: str | None) -> None:
    m = backend_manager()
    outcome_animators.register(m)
    task = wait_terminal(m, m.run_task({"operation": operation, "args": args}))
    check_simple(task, kind, exit_code, sig, error_type)


def test_a_cancel_the_moment_it_is_active_reaches_the_animator(backend_manager: Any) -> None:
    """ACTIVE means its process runs: a cancel sent on that event is honoured."""
    m = backend_manager()
    m.register_animator("COOP", animators.Cooperative())
    canceled: list[str] = []

    def on_change(event: dict[str, Any]) -> None:
        task = event["task"]
        if task and task["state"] == "ACTIVE" and task["meta"]["id"] not in canceled:
            canceled.append(task["meta"]["id"])
            m.cancel_task(task["meta"]["id"])

    m.subscribe(on_change)
    ids = [m.run_task({"operation": "COOP"}) for _ in range(3)]
    for task_id in ids:
        task = wait_terminal(m, task_id)
        assert task["outcome"]["kind"] == "canceled-honoured", task
        assert message_texts(task)[0] == "State change NEW ⇒ ACTIVE", task
