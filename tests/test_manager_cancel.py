"""Cancel of running tasks: cooperative, async, ignoring, and SIGTERM-proof ones."""

from __future__ import annotations

import threading
import time
from typing import Any

import animators
import psutil
import pytest
from conftest import (
    TIMEOUT,
    is_alive,
    message_texts,
    pids_gone,
    wait_for,
    wait_state,
    wait_terminal,
)

from supervisor import LocalBackend, TaskNotFound
from supervisor.backend import Launch


def start(m, operation, animator, args=None):
    """Register ``animator``, start a task and wait until it says it is ready."""
    m.register_animator(operation, animator)
    tid = m.run_task({"operation": operation, "args": args or {}})
    wait_for(lambda: animators.ready_info(m.get_task(tid)),
             message=lambda: f"task is {m.get_task(tid)}")
    return tid


def test_cancel_cooperative(manager):
    m = manager(cancel_grace=10)
    tid = start(m, "COOP", animators.Cooperative())
    began = time.monotonic()
    assert m.cancel_task(tid) is None
    assert m.get_task(tid)["cancelRequested"] is True
    task = wait_terminal(m, tid)
    assert time.monotonic() - began < 5
    assert task["state"] == "CANCELED"
    assert task["cancelRequested"] is True
    texts = message_texts(task)
    assert "State change ACTIVE ⇒ CANCELED" in texts
    assert not any("grace" in t for t in texts), texts


def test_cancel_async_at_an_await(manager):
    m = manager(cancel_grace=10)
    tid = start(m, "ASLEEP", animators.AsyncSleeper())
    began = time.monotonic()
    m.cancel_task(tid)
    task = wait_terminal(m, tid)
    assert time.monotonic() - began < 5
    assert task["state"] == "CANCELED"
    assert not any("grace" in t for t in message_texts(task))


def test_cancel_sigterm_ignoring_task_kills_it_after_the_grace(manager):
    grace = 0.5
    m = manager(cancel_grace=grace)
    tid = start(m, "STUBBORN", animators.Stubborn())
    pid = animators.ready_info(m.get_task(tid))["pid"]
    began = time.monotonic()
    m.cancel_task(tid)
    task = wait_terminal(m, tid)
    assert time.monotonic() - began >= grace
    assert task["state"] == "CANCELED"
    assert task.get("result") is None
    text = "\n".join(message_texts(task))
    assert "killed" in text and "grace" in text, text
    assert not (psutil.pid_exists(pid) and is_alive(psutil.Process(pid)))


def test_task_ignoring_cancel_but_returning_before_the_grace_succeeds(manager):
    m = manager(cancel_grace=10)
    tid = start(m, "IGNORE", animators.IgnoreCancel(), {"linger": 0.2})
    m.cancel_task(tid)
    task = wait_terminal(m, tid)
    assert task["state"] == "SUCCEEDED", message_texts(task)
    assert task["result"] == "finished anyway"
    assert task["cancelRequested"] is True


def test_cancel_twice_is_a_no_op(manager):
    m = manager(cancel_grace=0.5)
    tid = start(m, "STUBBORN", animators.Stubborn())
    m.cancel_task(tid)
    version = m.get_task(tid)["meta"]["version"]
    assert m.cancel_task(tid) is None
    task = m.get_task(tid)
    assert task["cancelRequested"] is True
    assert task["state"] in {"ACTIVE", "CANCELED"}
    if task["state"] == "ACTIVE":
        assert task["meta"]["version"] == version
    assert wait_terminal(m, tid)["state"] == "CANCELED"


def test_cancel_after_finish_is_not_found(manager):
    m = manager()
    tid = start(m, "COOP", animators.Cooperative())
    m.cancel_task(tid)
    wait_terminal(m, tid)
    with pytest.raises(TaskNotFound):
        m.cancel_task(tid)


def test_task_cancels_itself(manager):
    m = manager()
    m.register_animator("END", animators.EndWith())
    task = wait_terminal(m, m.run_task({"operation": "END", "args": {"state": "CANCELED"}}))
    assert task["state"] == "CANCELED"
    assert task["cancelRequested"] is False


def test_cancel_waiting_task(manager, tmp_path):
    m = manager(cancel_grace=10)
    m.register_animator("WAIT", animators.Waiting())
    tid = m.run_task({"operation": "WAIT", "args": {"gate": str(tmp_path / "never")}})
    wait_state(m, tid, "WAITING")
    m.cancel_task(tid)
    task = wait_terminal(m, tid)
    assert task["state"] == "CANCELED"
    assert "State change WAITING ⇒ CANCELED" in message_texts(task)


def test_cancel_one_leaves_the_others_running(manager):
    m = manager(max_workers=3)
    m.register_animator("COOP", animators.Cooperative())
    ids = [m.run_task({"operation": "COOP"}) for _ in range(3)]
    for tid in ids:
        wait_state(m, tid, "ACTIVE")
    m.cancel_task(ids[1])
    assert wait_terminal(m, ids[1])["state"] == "CANCELED"
    for tid in (ids[0], ids[2]):
        task = m.get_task(tid)
        assert task["state"] == "ACTIVE"
        assert task["cancelRequested"] is False


class CancelDuringHandOver(LocalBackend):
    """A local backend that has each task canceled, from another thread, while the
    manager hands it over (outside the manager's lock)."""

    manager: Any = None

    def start(self, launch: Launch) -> bool:
        canceler = threading.Thread(target=self.manager.cancel_task, args=(launch.task_id,))
        canceler.start()
        canceler.join(TIMEOUT)
        return super().start(launch)


def test_a_cancel_during_the_hand_over_reaches_the_process(manager):
    """A task canceled while it is being handed over is not recorded CANCELED while its
    process runs: the cancel takes the running path, and once the task is terminal its
    process is gone."""
    backend = CancelDuringHandOver()
    m = manager(max_workers=1, backend=backend, cancel_grace=5)
    backend.manager = m
    m.register_animator("COOP", animators.Cooperative())
    tid = m.run_task({"operation": "COOP"})
    task = wait_terminal(m, tid)
    texts = message_texts(task)
    assert task["state"] == "CANCELED" and task["cancelRequested"], texts
    assert "canceled while queued" not in texts, texts
    info = animators.ready_info(task)
    assert info is not None, f"the process's report was dropped: {texts}"
    assert pids_gone(info["pid"]), "the process outlived its terminal task"
    assert m.counts()["running"] == 0
