"""Every way a task process can go wrong ends FAILED, and the supervisor carries on."""

from __future__ import annotations

import os
import signal
from typing import Any

import animators
import psutil
import pytest
from conftest import TIMEOUT, describe, is_alive, message_texts, wait_for, wait_terminal

from supervisor.protocol import MAX_RESULT_BYTES

GiB = 1024**3
MiB = 1024**2


def run_one(m: Any, operation: str, animator: Any, args: dict[str, Any] | None = None,
            **limits: Any) -> dict[str, Any]:
    """Register ``animator``, run one task of it, and return the finished task."""
    m.register_animator(operation, animator, **limits)
    return wait_terminal(m, m.run_task({"operation": operation, "args": args or {}}))


def assert_still_works(m: Any) -> None:
    """The manager runs a task normally after the crash."""
    m.register_animator("QUICK", animators.Quick())
    task = wait_terminal(m, m.run_task({"operation": "QUICK", "args": {"after": "crash"}}))
    assert task["state"] == "SUCCEEDED", message_texts(task)
    assert task["result"]["args"] == {"after": "crash"}


def failure_text(task: dict[str, Any]) -> str:
    """Every message after the task went ACTIVE, joined."""
    assert task["state"] == "FAILED", task
    return "\n".join(message_texts(task))


def test_segfault(manager):
    m = manager()
    task = run_one(m, "SEGV", animators.Segfault())
    assert "SIGSEGV" in failure_text(task)
    assert task.get("result") is None
    assert "State change ACTIVE ⇒ FAILED" in message_texts(task)
    assert_still_works(m)


def test_sigkill_itself(manager):
    m = manager()
    task = run_one(m, "KILL", animators.KillSelf())
    assert "SIGKILL" in failure_text(task)
    assert_still_works(m)


def test_os_exit(manager):
    m = manager()
    task = run_one(m, "EXIT", animators.ExitThree())
    text = failure_text(task)
    assert "exit" in text.lower() and "3" in text, text
    assert_still_works(m)


def test_exception(manager):
    m = manager()
    task = run_one(m, "RAISE", animators.Raise(), {"text": "in the child"})
    text = failure_text(task)
    assert "RuntimeError" in text
    assert "boom in the child" in text
    assert_still_works(m)


def test_async_exception(manager):
    m = manager()
    task = run_one(m, "ARAISE", animators.AsyncRaise())
    text = failure_text(task)
    assert "ValueError" in text
    assert "async boom" in text
    assert_still_works(m)


@pytest.mark.parametrize("kind", ["lambda", "socket", "set", "object"])
def test_result_not_json(manager, kind):
    m = manager()
    task = run_one(m, "BAD", animators.BadResult(), {"kind": kind})
    assert task["state"] == "FAILED"
    assert task.get("result") is None
    assert "JSON" in failure_text(task) or "serializ" in failure_text(task).lower()
    assert_still_works(m)


def test_result_too_big(manager):
    m = manager()
    task = run_one(m, "BIG", animators.BigResult(), {"size": 2 * MAX_RESULT_BYTES})
    assert task["state"] == "FAILED"
    assert task.get("result") is None
    assert_still_works(m)


def test_result_just_under_the_bound(manager):
    m = manager()
    size = MAX_RESULT_BYTES - 1024
    task = run_one(m, "BIG", animators.BigResult(), {"size": size})
    assert task["state"] == "SUCCEEDED", message_texts(task)
    assert task["result"] == "x" * size


def test_timeout(manager):
    m = manager()
    task = run_one(m, "STUBBORN", animators.Stubborn(), timeout=0.5)
    assert "timed out" in failure_text(task)
    assert task["cancelRequested"] is False
    assert_still_works(m)


def test_timeout_does_not_touch_a_quick_task(manager):
    m = manager()
    task = run_one(m, "COOP", animators.Cooperative(), {"seconds": 0.1}, timeout=20)
    assert task["state"] == "SUCCEEDED", message_texts(task)


def test_memory_limit(manager):
    m = manager()
    task = run_one(m, "HOG", animators.MemoryHog(), {"bytes": 2 * GiB}, max_memory=512 * MiB)
    assert "MemoryError" in failure_text(task)
    assert_still_works(m)


def test_memory_within_the_limit(manager):
    m = manager()
    task = run_one(m, "HOG", animators.MemoryHog(), {"bytes": 16 * MiB}, max_memory=512 * MiB)
    assert task["state"] == "SUCCEEDED", message_texts(task)
    assert task["result"] == 16 * MiB


def test_memory_limit_with_an_async_animator(manager):
    m = manager()
    task = run_one(m, "ASYNC", animators.AsyncQuick(), max_memory=512 * MiB)
    assert task["state"] == "SUCCEEDED", message_texts(task)


def test_memory_limit_applies_to_its_operation_only(manager):
    m = manager()
    m.register_animator("LIMITED", animators.MemoryHog(), max_memory=512 * MiB)
    task = run_one(m, "FREE", animators.MemoryHog(), {"bytes": 600 * MiB})
    assert task["state"] == "SUCCEEDED", message_texts(task)


def test_crashes_do_not_disturb_a_running_task(manager):
    m = manager(max_workers=4)
    m.register_animator("COOP", animators.Cooperative())
    survivor = m.run_task({"operation": "COOP"})
    for operation, animator in [("SEGV", animators.Segfault()), ("KILL", animators.KillSelf()),
                                ("EXIT", animators.ExitThree()), ("RAISE", animators.Raise())]:
        assert run_one(m, operation, animator)["state"] == "FAILED"
    assert m.get_task(survivor)["state"] == "ACTIVE"
    m.cancel_task(survivor)
    assert wait_terminal(m, survivor)["state"] == "CANCELED"


def test_starter_killed_from_outside(manager):
    m = manager(max_workers=2)
    m.register_animator("COOP", animators.Cooperative())
    tid = m.run_task({"operation": "COOP"})
    info = wait_for(lambda: animators.ready_info(m.get_task(tid)))
    task_process = psutil.Process(info["pid"])
    starter = psutil.Process(info["ppid"])
    assert starter.ppid() == os.getpid(), describe(starter)

    starter.send_signal(signal.SIGKILL)
    task = wait_terminal(m, tid)
    assert task["state"] == "FAILED", message_texts(task)
    assert "starter" in failure_text(task)
    assert not is_alive(task_process), describe(task_process)
    # A new starter takes over and tasks run again.
    assert_still_works(m)
    again = m.run_task({"operation": "COOP"})
    info = wait_for(lambda: animators.ready_info(m.get_task(again)))
    assert info["ppid"] != starter.pid
    m.cancel_task(again)
    assert wait_terminal(m, again)["state"] == "CANCELED"


def test_last_reports_before_a_crash_are_kept(manager):
    m = manager()
    task = run_one(m, "LAST", animators.LastWords())
    texts = message_texts(task)
    assert task["state"] == "FAILED"
    assert "last words" in texts
    assert texts.index("last words") < texts.index("State change ACTIVE ⇒ FAILED")
    assert task["progress"]["percentComplete"] == 66


def test_task_process_and_starter_killed_together(manager):
    m = manager(max_workers=2)
    m.register_animator("COOP", animators.Cooperative())
    tid = m.run_task({"operation": "COOP"})
    info = wait_for(lambda: animators.ready_info(m.get_task(tid)))
    task_process = psutil.Process(info["pid"])
    starter = psutil.Process(info["ppid"])
    assert starter.ppid() == os.getpid(), describe(starter)
    # As an OOM killer might: the task process, then its starter, at once.
    task_process.send_signal(signal.SIGKILL)
    starter.send_signal(signal.SIGKILL)
    task = wait_terminal(m, tid)
    assert task["state"] == "FAILED", message_texts(task)
    assert not is_alive(task_process)
    assert_still_works(m)


def test_a_slow_import_in_the_starter_is_not_a_hung_starter(manager):
    """The starter cannot answer pings while it imports an animator module; one that
    takes longer than ``starter_deadline`` to import is waited for, not killed: the
    task running meanwhile goes on, and the module's tasks run."""
    from supervisor.consts import CONSTS

    m = manager(max_workers=2)
    m.register_animator("COOP", animators.Cooperative())
    running = m.run_task({"operation": "COOP"})
    wait_for(lambda: animators.ready_info(m.get_task(running)))
    import slow_import  # NOTE: here, so that only this test pays for the import

    assert slow_import.SLOW_IMPORT_SECONDS > CONSTS.starter_deadline
    m.register_animator("SLOW", slow_import.Imported())
    tid = m.run_task({"operation": "SLOW"})
    task = wait_terminal(m, tid, timeout=TIMEOUT)
    assert task["state"] == "SUCCEEDED", message_texts(task)
    assert m.get_task(running)["state"] == "ACTIVE", message_texts(m.get_task(running))
    m.cancel_task(running)
    assert wait_terminal(m, running)["state"] == "CANCELED"
