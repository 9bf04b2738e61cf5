"""A stateful test of the Manager: create, cancel, wait and terminate in any order."""

from __future__ import annotations

import animators
import pytest
from conftest import TERMINAL, TIMEOUT, EventLog, descendants, describe, wait_for, wait_terminal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from supervisor import Manager, ManagerTerminated, TaskNotFound

MAX_WORKERS = 2
OPERATIONS = {
    "QUICK": animators.Quick(),
    "COOP": animators.Cooperative(),
    "ASLEEP": animators.AsyncSleeper(),
    "STUBBORN": animators.Stubborn(),  # ignores cancel and SIGTERM: killed after the grace
}


class ManagerMachine(RuleBasedStateMachine):
    """Drive one Manager and check the table's invariants after every step."""

    tasks = Bundle("tasks")

    def __init__(self) -> None:
        super().__init__()
        self.before = descendants()
        self.m = Manager(purge_delay=60, max_workers=MAX_WORKERS, cancel_grace=0.3)
        for operation, animator in OPERATIONS.items():
            self.m.register_animator(operation, animator)
        self.log = EventLog()
        self.m.subscribe(self.log)
        self.created: list[str] = []
        self.canceled: set[str] = set()
        self.seen: dict[str, tuple[int, str]] = {}
        self.terminated = False

    @precondition(lambda self: not self.terminated)
    @rule(target=tasks, operation=st.sampled_from(sorted(OPERATIONS)),
          seconds=st.sampled_from([0, 0.1, 0.4]))
    def create(self, operation: str, seconds: float) -> str:
        tid = self.m.run_task({"operation": operation, "args": {"seconds": seconds}})
        self.created.append(tid)
        return tid

    @precondition(lambda self: self.terminated)
    @rule(operation=st.sampled_from(sorted(OPERATIONS)))
    def create_after_terminate(self, operation: str) -> None:
        with pytest.raises(ManagerTerminated):
            self.m.run_task({"operation": operation})

    @rule(tid=tasks)
    def cancel(self, tid: str) -> None:
        try:
            self.m.cancel_task(tid)
        except TaskNotFound:
            assert self.m.get_task(tid)["state"] in TERMINAL
        else:
            self.canceled.add(tid)
            assert self.m.get_task(tid)["cancelRequested"] is True

    @rule(tid=tasks)
    def wait(self, tid: str) -> None:
        task = wait_terminal(self.m, tid, timeout=TIMEOUT)
        if task["cancelRequested"]:
            assert task["state"] in {"CANCELED", "SUCCEEDED"}, task
        else:
            assert task["state"] == "SUCCEEDED", task

    @rule()
    def terminate(self) -> None:
        self.m.terminate()
        self.terminated = True
        for task in self.m.list_tasks():
            assert task["state"] in TERMINAL, task
        self.check_nothing_alive()

    @invariant()
    def table_is_consistent(self) -> None:
        tasks = self.m.list_tasks()
        assert [t["meta"]["id"] for t in tasks] == self.created
        running = 0
        for task in tasks:
            tid, version, state = task["meta"]["id"], task["meta"]["version"], task["state"]
            if tid in self.seen:
                old_version, old_state = self.seen[tid]
                assert version >= old_version, (tid, old_version, version)
                if old_state in TERMINAL:
                    assert state == old_state, (tid, old_state, state)
            if state in {"ACTIVE", "WAITING"}:
                running += 1
            self.seen[tid] = (version, state)
        assert running <= MAX_WORKERS

    def check_nothing_alive(self) -> None:
        left = [describe(p) for key, p in descendants().items() if key not in self.before]
        assert left == []

    def teardown(self) -> None:
        self.m.terminate()
        self.check_nothing_alive()
        # Every task reached exactly one terminal state, the last one it had.
        for tid in self.created:
            wait_for(lambda tid=tid: self.log.states(tid)[-1:] and
                     self.log.states(tid)[-1] in TERMINAL)
            states = self.log.states(tid)
            assert [s for s in states if s in TERMINAL] == [states[-1]], states
            versions = [e["task"]["meta"]["version"] for e in self.log.of(tid)]
            assert versions == list(range(1, len(versions) + 1)), versions


ManagerMachine.TestCase.settings = settings(
    max_examples=10,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestManagerMachine = ManagerMachine.TestCase
