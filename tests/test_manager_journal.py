"""The Manager with a journal (records that survive a restart), lists a page at a time
with filters, and idempotent creates: real task processes, a real journal file."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import animators
import log_animators as la
import pytest
from conftest import EventLog, message_texts, wait_for, wait_state, wait_terminal
from journal_support import rows

from supervisor import IdempotencyConflict, InvalidArguments, TaskNotFound

QUICK, COOP = "QUICK", "COOP"


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    return tmp_path / "tasks.db"


def committed(path: Path, task_id: str) -> str | None:
    found = rows(path, "SELECT state FROM tasks WHERE id = ?", (task_id,))
    return found[0][0] if found else None


# -- restart ----------------------------------------------------------------------------


def test_a_clean_stop_keeps_queued_tasks_and_they_run_after_the_restart(
        manager: Any, journal: Path) -> None:
    first = manager(journal=journal, max_workers=1)
    first.register_animator(COOP, animators.Cooperative())
    first.register_animator(QUICK, animators.Quick())
    running = first.run_task({"operation": COOP})
    wait_state(first, running, "ACTIVE")
    queued = [first.run_task({"operation": QUICK, "args": {"n": n}}) for n in range(3)]
    before = {task_id: first.get_task(task_id) for task_id in queued}
    first.terminate()
    assert first.get_task(running)["outcome"]["kind"] == "canceled-terminate"
    assert [first.get_task(task_id)["state"] for task_id in queued] == ["NEW"] * 3
    assert [committed(journal, task_id) for task_id in queued] == ["NEW"] * 3

    events = EventLog()
    second = manager(journal=journal, max_workers=1)
    second.subscribe(events)
    # NOTE: until QUICK is registered, the queued tasks wait, readable from the journal
    assert second.get_task(queued[0])["state"] == "NEW"
    second.register_animator("LATE", animators.Quick())
    late = second.run_task({"operation": "LATE"})
    wait_terminal(second, late)
    second.register_animator(QUICK, animators.Quick())
    # the table lists them in creation order, the later task after them
    assert [t["meta"]["id"] for t in second.list_tasks()] == [*queued, late]
    assert [t["meta"]["id"] for t in second.list_tasks(after=queued[1])] == [queued[2], late]
    for task_id in queued:
        done = wait_terminal(second, task_id)
        assert done["state"] == "SUCCEEDED", done
        assert done["meta"]["timeCreated"] == before[task_id]["meta"]["timeCreated"]
        assert done["meta"]["version"] > before[task_id]["meta"]["version"]
        assert message_texts(done)[0] == "queued again after a restart"
    started = [e["task"]["meta"]["id"] for e in events.snapshot()
               if e["task"]["state"] == "ACTIVE" and e["task"]["operation"] == QUICK]
    assert started == queued  # in their original order
    assert second.get_task(running)["state"] == "CANCELED"
    assert int(late[len("LATE"):]) > int(queued[-1][len(QUICK):])  # ids are never reused


def test_requeue_false_cancels_the_last_runs_queued_tasks(manager: Any, journal: Path) -> None:
    first = manager(journal=journal, max_workers=1)
    first.register_animator(COOP, animators.Cooperative())
    first.register_animator(QUICK, animators.Quick())
    wait_state(first, first.run_task({"operation": COOP}), "ACTIVE")
    queued = first.run_task({"operation": QUICK})
    first.terminate()

    second = manager(journal=journal)
    second.register_animator(QUICK, animators.Quick(), requeue=False)
    done = wait_terminal(second, queued)
    assert done["state"] == "CANCELED"
    assert done["outcome"]["kind"] == "canceled-queued"
    assert done["outcome"]["message"] == "the supervisor restarted before the task started"
    assert "usage" not in done


def test_without_a_journal_terminate_still_cancels_queued_tasks(manager: Any) -> None:
    m = manager(max_workers=1)
    m.register_animator(COOP, animators.Cooperative())
    m.register_animator(QUICK, animators.Quick())
    wait_state(m, m.run_task({"operation": COOP}), "ACTIVE")
    queued = m.run_task({"operation": QUICK})
    m.terminate()
    assert m.get_task(queued)["outcome"]["kind"] == "canceled-queued"
    assert m.journal_status is None


# -- purged tasks and history --------------------------------------------------------------


def test_a_purged_task_and_its_log_are_answered_from_the_journal(
        manager: Any, journal: Path) -> None:
    m = manager(journal=journal, purge_delay=0)
    m.register_animator("CHATTY", la.Chatty())
    m.register_animator(QUICK, animators.Quick())
    task_id = m.run_task({"operation": "CHATTY"})
    wait_for(lambda: m.list_tasks("CHATTY") == [])  # purged from the table
    done = wait_for(lambda: m.get_task(task_id)["state"] == "SUCCEEDED" and m.get_task(task_id))
    assert done["result"] == "done" and done["outcome"]["kind"] == "returned"
    assert done["usage"]["wallSeconds"] > 0

    def log_texts(stream: str = "stdout") -> list[str]:
        return [line["text"] for line in m.get_log(task_id)["lines"]
                if line["stream"] == stream]

    wait_for(lambda: "no newline at the end" in log_texts(), message=log_texts)
    page = m.get_log(task_id)
    assert page["complete"] and page["dropped"] == 0
    assert log_texts()[:2] == ["out 1", "out 2"] and log_texts("stderr")[0] == "err 1"
    second = m.get_log(task_id, after=1, limit=1)
    assert [line["seq"] for line in second["lines"]] == [2]
    assert second["next"] == 2 and not second["complete"]
    assert [t["meta"]["id"] for t in m.list_tasks(history=True)] == [task_id]
    assert m.journal_status == "ok"
    with pytest.raises(TaskNotFound):
        m.get_task("CHATTY999999")
    with pytest.raises(TaskNotFound):
        m.get_log("CHATTY999999")


# -- lists: pages and filters (with or without a journal) ------------------------------------


@pytest.mark.parametrize("with_journal", [False, True])
def test_pages_follow_each_other_in_creation_order(
        manager: Any, journal: Path, with_journal: bool) -> None:
    m = manager(max_workers=1, purge_delay=0, **({"journal": journal} if with_journal else {}))
    m.register_animator(COOP, animators.Cooperative())
    m.register_animator(QUICK, animators.Quick())
    wait_state(m, m.run_task({"operation": COOP}), "ACTIVE")  # keeps the rest queued
    ids = [m.run_task({"operation": QUICK, "objectId": f"o{n % 3}"}) for n in range(25)]
    pages: list[list[str]] = []
    after = None
    while True:
        page = [t["meta"]["id"] for t in m.list_tasks(QUICK, after=after, limit=10)]
        if not page:
            break
        pages.append(page)
        after = page[-1]
    assert [len(page) for page in pages] == [10, 10, 5]
    assert [task_id for page in pages for task_id in page] == ids
    assert [t["meta"]["id"] for t in m.list_tasks(QUICK, object_id="o1")] == ids[1::3]
    assert len(m.list_tasks(state=["NEW", "ACTIVE"])) == 26
    assert [t["operation"] for t in m.list_tasks(state="ACTIVE")] == [COOP]
    m.cancel_task(ids[9])  # purged at once: a cursor after it still works
    wait_for(lambda: ids[9] not in [t["meta"]["id"] for t in m.list_tasks(QUICK)])
    assert [t["meta"]["id"] for t in m.list_tasks(QUICK, after=ids[9], limit=2)] == ids[10:12]
    with pytest.raises(ValueError, match="after"):
        m.list_tasks(after="NOPE000001")
    with pytest.raises(ValueError, match="state"):
        m.list_tasks(state="DONE")
    with pytest.raises(ValueError, match="limit"):
        m.list_tasks(limit=0)


def test_history_merges_the_journal_with_the_table(manager: Any, journal: Path) -> None:
    m = manager(journal=journal, purge_delay=0, max_workers=1)
    m.register_animator(COOP, animators.Cooperative())
    m.register_animator(QUICK, animators.Quick())
    gone = [m.run_task({"operation": QUICK}) for _ in range(3)]
    for task_id in gone:
        wait_for(lambda task_id=task_id: committed(journal, task_id) == "SUCCEEDED")
    live = m.run_task({"operation": COOP})
    wait_state(m, live, "ACTIVE")
    assert [t["meta"]["id"] for t in m.list_tasks()] == [live]
    everything = m.list_tasks(history=True)
    assert [t["meta"]["id"] for t in everything] == [*gone, live]
    assert everything[-1]["state"] == "ACTIVE"  # the table's version, not an older record
    assert [t["meta"]["id"] for t in m.list_tasks(history=True, after=gone[0], limit=2)] == [
        gone[1], gone[2]]
    assert [t["meta"]["id"] for t in m.list_tasks(history=True, state="SUCCEEDED")] == gone


# -- idempotent creates ----------------------------------------------------------------------


def test_one_key_from_many_threads_creates_one_task(manager: Any) -> None:
    m = manager(max_workers=1)
    m.register_animator(COOP, animators.Cooperative())
    create = {"operation": COOP, "args": {"seconds": 60}}
    results: list[Any] = []
    barrier = threading.Barrier(10)

    def post() -> None:
        barrier.wait()
        results.append(m.create_task(dict(create), idempotency_key="retry-1"))

    threads = [threading.Thread(target=post) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({created.task_id for created in results}) == 1
    assert sorted(created.replayed for created in results) == [False] + [True] * 9
    assert len(m.list_tasks()) == 1
    assert m.run_task(dict(create), "retry-1") == results[0].task_id
    with pytest.raises(IdempotencyConflict, match="retry-1"):
        m.run_task({"operation": COOP, "args": {"seconds": 61}}, idempotency_key="retry-1")
    for bad in ("", "x" * 129, "no spaces", "ü"):
        with pytest.raises(InvalidArguments, match="idempotency key"):
            m.run_task(dict(create), idempotency_key=bad)


def test_a_replay_is_answered_while_the_queue_is_full(manager: Any) -> None:
    m = manager(max_workers=1, max_queued=0)
    m.register_animator(COOP, animators.Cooperative())
    first = m.create_task({"operation": COOP}, idempotency_key="k")
    again = m.create_task({"operation": COOP}, idempotency_key="k")
    assert again == (first.task_id, True)


def test_keys_survive_a_restart_with_a_journal(manager: Any, journal: Path) -> None:
    first = manager(journal=journal)
    first.register_animator(QUICK, animators.Quick())
    made = first.run_task({"operation": QUICK, "args": {"a": [1, 2]}}, idempotency_key="k.1")
    wait_terminal(first, made)
    first.terminate()

    second = manager(journal=journal)
    second.register_animator(QUICK, animators.Quick())
    # NOTE: the same body with its keys in another order is the same body
    again = second.create_task({"args": {"a": [1, 2]}, "operation": QUICK},
                               idempotency_key="k.1")
    assert again == (made, True)
    with pytest.raises(IdempotencyConflict):
        second.run_task({"operation": QUICK}, idempotency_key="k.1")
