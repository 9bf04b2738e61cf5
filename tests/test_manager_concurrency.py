"""Several managers in one process, and many threads calling one manager at once."""

from __future__ import annotations

import random
import threading

import animators
import psutil
from conftest import TERMINAL, descendants, describe, is_alive, wait_for, wait_state, wait_terminal

from supervisor import QueueFull, TaskNotFound


def test_two_managers_in_one_process(manager):
    before = descendants()
    first, second = manager(), manager()
    for m in (first, second):
        m.register_animator("COOP", animators.Cooperative())
        m.register_animator("QUICK", animators.Quick())
    a = first.run_task({"operation": "COOP"})
    b = second.run_task({"operation": "COOP"})
    info_a = wait_for(lambda: animators.ready_info(first.get_task(a)))
    info_b = wait_for(lambda: animators.ready_info(second.get_task(b)))
    # Each manager has its own starter and sees only its own tasks.
    assert info_a["ppid"] != info_b["ppid"]
    assert [t["meta"]["id"] for t in first.list_tasks()] == [a]
    assert [t["meta"]["id"] for t in second.list_tasks()] == [b]
    starter_b = psutil.Process(info_b["ppid"])
    proc_b = psutil.Process(info_b["pid"])

    first.terminate()
    assert first.get_task(a)["state"] == "CANCELED"
    # The second manager is untouched: its task and its starter live on.
    assert second.get_task(b)["state"] == "ACTIVE"
    assert second.get_task(b)["cancelRequested"] is False
    assert is_alive(proc_b) and is_alive(starter_b)
    left = [p for key, p in descendants().items() if key not in before]
    assert {p.pid for p in left} >= {starter_b.pid, proc_b.pid}
    assert info_a["ppid"] not in {p.pid for p in left}, [describe(p) for p in left]

    quick = second.run_task({"operation": "QUICK"})
    assert wait_terminal(second, quick)["state"] == "SUCCEEDED"
    second.cancel_task(b)
    assert wait_terminal(second, b)["state"] == "CANCELED"


def test_many_threads_at_once(manager):
    m = manager(max_workers=2, max_queued=None, purge_delay=60)
    m.register_animator("QUICK", animators.Quick())
    m.register_animator("COOP", animators.Cooperative())
    threads_count, per_thread = 8, 20
    created: dict[int, list[str]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads_count)

    def worker(n: int) -> None:
        rng = random.Random(n)
        mine: list[str] = []
        try:
            barrier.wait(10)
            for _ in range(per_thread):
                op = rng.choice(["QUICK", "COOP"])
                args = {"seconds": 0.05} if op == "COOP" else {"n": n}
                tid = m.run_task({"operation": op, "args": args})
                mine.append(tid)
                m.get_task(tid)
                m.list_tasks(op)
                if rng.random() < 0.3:
                    try:
                        m.cancel_task(rng.choice(mine))
                    except TaskNotFound:
                        pass  # it finished already
        except BaseException as exc:
            errors.append(exc)
        created[n] = mine

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert errors == []
    all_ids = [tid for mine in created.values() for tid in mine]
    assert len(all_ids) == len(set(all_ids)) == threads_count * per_thread
    listed = [t["meta"]["id"] for t in m.list_tasks()]
    assert sorted(listed) == sorted(all_ids)
    # Creation order holds within each thread.
    position = {tid: i for i, tid in enumerate(listed)}
    for mine in created.values():
        assert [position[tid] for tid in mine] == sorted(position[tid] for tid in mine)
    for tid in all_ids:
        task = wait_terminal(m, tid)
        assert task["state"] in TERMINAL
        if not task["cancelRequested"]:
            assert task["state"] == "SUCCEEDED", task


def test_threads_cancel_the_same_task(manager):
    m = manager(cancel_grace=0.5)
    m.register_animator("STUBBORN", animators.Stubborn())
    tid = m.run_task({"operation": "STUBBORN"})
    wait_state(m, tid, "ACTIVE")
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def cancel() -> None:
        try:
            barrier.wait(10)
            m.cancel_task(tid)
        except TaskNotFound:
            pass  # someone else's cancel already finished it
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=cancel) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert wait_terminal(m, tid)["state"] == "CANCELED"


def test_queue_full_under_threads(manager):
    m = manager(max_workers=1, max_queued=5)
    m.register_animator("COOP", animators.Cooperative())
    blocker = m.run_task({"operation": "COOP"})
    wait_state(m, blocker, "ACTIVE")
    accepted: list[str] = []
    refused: list[int] = []
    lock = threading.Lock()

    def submit() -> None:
        for _ in range(5):
            try:
                tid = m.run_task({"operation": "COOP"})
            except QueueFull:
                with lock:
                    refused.append(1)
            else:
                with lock:
                    accepted.append(tid)

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(accepted) == 5
    assert len(refused) == 25
    assert all(m.get_task(tid)["state"] == "NEW" for tid in accepted)
