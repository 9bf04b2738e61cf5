"""A stateful test of the Manager against a simple model of its tasks.

Rules create tasks (valid ones of many kinds, and invalid ones), cancel them
(queued, running, finished, unknown), wait for them, open the gates that
WAITING and tree-building tasks wait for, and terminate the manager, in any
order. After every step the invariants are checked: the table lists the tasks
in creation order, versions only grow (and every change bumps them), a
terminal state never changes and is one the model allows, and nothing of a
terminal task's process tree is alive; after terminate, nothing is alive at all.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import animators
import fault_animators
import psutil
import pytest
from conftest import (
    TERMINAL,
    TIMEOUT,
    EventLog,
    descendants,
    describe,
    is_alive,
    message_texts,
    wait_for,
    wait_state,
    wait_terminal,
)
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from supervisor import (
    InvalidAnimator,
    InvalidArguments,
    Manager,
    ManagerTerminated,
    TaskNotFound,
    UnsupportedOperation,
)

MAX_WORKERS = 2
CANCEL_GRACE = 0.3

OPERATIONS = {
    "QUICK": fault_animators.Announced(animators.Quick()),
    "COOP": animators.Cooperative(),  # progress; honours cancel
    "ASLEEP": animators.AsyncSleeper(),  # a cancel ends it at its await
    "STUBBORN": animators.Stubborn(),  # ignores cancel and SIGTERM: killed after the grace
    "PROGRESS": fault_animators.Announced(animators.ProgressReport()),
    "WAIT": fault_animators.Announced(animators.Waiting()),  # WAITING until its gate opens
    "FORK": animators.Forker(),  # a tree; returns or crashes once its gate opens
    "SEGV": fault_animators.Announced(animators.Segfault()),
    "EXIT": fault_animators.Announced(animators.ExitThree()),
    "RAISE": fault_animators.Announced(animators.Raise()),
    "REJECT": animators.Validating(),
    "VALIDATE": fault_animators.ValidateRaises(),
}
GATED = {"WAIT", "FORK"}

#: What a task of each operation ends as when nobody cancels it.
NATURAL = {
    "QUICK": "SUCCEEDED", "COOP": "SUCCEEDED", "ASLEEP": "SUCCEEDED", "STUBBORN": "SUCCEEDED",
    "WAIT": "SUCCEEDED", "SEGV": "FAILED", "EXIT": "FAILED", "RAISE": "FAILED",
}
#: Words that a FAILED task's messages must contain, by operation.
FAILURE_CAUSE = {
    "SEGV": "SIGSEGV", "EXIT": "exited with code 3", "RAISE": "RuntimeError: boom",
    "FORK": "exited with code 1", "PROGRESS": "ValueError",
}
#: The reasons a CANCELED task may give.
CANCEL_REASONS = (
    "canceled while queued", "the animator honoured the cancel", "canceled at an await point",
    "killed after cancel grace period", "the manager is terminating",
)
SECONDS = st.sampled_from([0, 0.05, 0.3])
VALID = st.one_of(
    st.tuples(st.just("QUICK"), st.builds(dict)),
    st.tuples(st.sampled_from(["COOP", "ASLEEP", "STUBBORN"]),
              st.fixed_dictionaries({"seconds": SECONDS})),
    st.tuples(st.just("PROGRESS"), st.fixed_dictionaries({"progress": st.fixed_dictionaries(
        {"percent_complete": st.integers(-50, 150)},
        optional={"total_bytes": st.integers(-2, 2**40), "offset_bytes": st.integers(0, 2**40)},
    )})),
    st.tuples(st.just("WAIT"), st.builds(dict)),
    st.tuples(st.just("FORK"), st.fixed_dictionaries({"mode": st.sampled_from(["return",
                                                                                "crash"]),
                                                      "open": st.booleans()})),
    st.tuples(st.sampled_from(["SEGV", "EXIT", "RAISE"]), st.builds(dict)),
)
#: (create, the exception, True if the shape is wrong: refused even after terminate).
INVALID: list[tuple[Any, type[Exception], bool]] = [
    ({"operation": "NOPE"}, UnsupportedOperation, False),
    ({"operation": "QUICK", "bogus": 1}, InvalidArguments, True),
    ({"operation": "QUICK", "args": [1]}, InvalidArguments, True),
    ({"operation": ""}, InvalidArguments, True),
    ({"operation": "QUICK", "objectId": "x" * 129}, InvalidArguments, True),
    ({"objectId": "no operation"}, InvalidArguments, True),
    (["QUICK"], InvalidArguments, True),
    ({"operation": "REJECT", "args": {"reject": "value"}}, InvalidArguments, False),
    ({"operation": "REJECT", "args": {"reject": "animator"}}, InvalidAnimator, False),
    ({"operation": "VALIDATE", "args": {"kind": "zero"}}, InvalidArguments, False),
]


def clamp(percent: int) -> int:
    return min(100, max(0, percent))


@dataclass
class Expected:
    """The model of one task."""

    operation: str
    args: dict[str, Any]
    canceled: bool = False  #: canceled by cancel_task or terminate: may end CANCELED
    cancel_requested: bool = False  #: canceled by cancel_task
    gate: Path | None = None
    watched: dict[int, psutil.Process] = field(default_factory=dict)

    def natural(self) -> str:
        """The terminal state if nobody cancels it."""
        if self.operation == "PROGRESS":
            bad = self.args["progress"].get("total_bytes", 0) < 0
            return "FAILED" if bad else "SUCCEEDED"
        if self.operation == "FORK":
            return "FAILED" if self.args["mode"] == "crash" else "SUCCEEDED"
        return NATURAL[self.operation]

    def allowed(self) -> set[str]:
        """The terminal states the task may reach."""
        return {self.natural(), "CANCELED"} if self.canceled else {self.natural()}


class ManagerMachine(RuleBasedStateMachine):
    """Drive one Manager; check the table and the processes against the model."""

    tasks = Bundle("tasks")

    def __init__(self) -> None:
        super().__init__()
        self.before = descendants()
        self.gates = Path(tempfile.mkdtemp(prefix="stateful-gates-"))
        self.m = Manager(purge_delay=60, max_workers=MAX_WORKERS, cancel_grace=CANCEL_GRACE)
        for operation, animator in OPERATIONS.items():
            self.m.register_animator(operation, animator)
        self.log = EventLog()
        self.m.subscribe(self.log)
        self.created: list[str] = []
        self.model: dict[str, Expected] = {}
        self.seen: dict[str, dict[str, Any]] = {}
        self.terminated = False
        # Warm up: once a first task has run, the starter has booted and
        # preloaded, so the tasks of the rules start within milliseconds.
        self.wait(self._create("QUICK", {}))

    # -- rules -----------------------------------------------------------------

    @initialize(target=tasks, create=VALID)
    def create_first(self, create: tuple[str, dict[str, Any]]) -> str:
        return self._create(*create)

    @initialize(target=tasks, create=VALID)
    def create_second(self, create: tuple[str, dict[str, Any]]) -> str:
        return self._create(*create)

    @precondition(lambda self: not self.terminated)
    @rule(target=tasks, create=VALID)
    def create(self, create: tuple[str, dict[str, Any]]) -> str:
        return self._create(*create)

    @precondition(lambda self: not self.terminated)
    @rule(target=tasks, seconds=SECONDS, extra=st.integers(1, 3))
    def create_burst_and_cancel_the_last(self, seconds: float, extra: int) -> Any:
        """More tasks than workers at once; the last one is most likely still queued."""
        ids = [self._create("STUBBORN", {"seconds": seconds})
               for _ in range(MAX_WORKERS + extra)]
        self._cancel(ids[-1])
        return multiple(*ids)

    @rule(case=st.sampled_from(INVALID))
    def create_invalid(self, case: tuple[Any, type[Exception], bool]) -> None:
        create, error, bad_shape = case
        expected: tuple[type[Exception], ...] = (error,)
        if self.terminated and not bad_shape:
            expected = (ManagerTerminated,)
        with pytest.raises(expected):
            self.m.run_task(create)

    @precondition(lambda self: self.terminated)
    @rule(create=VALID)
    def create_after_terminate(self, create: tuple[str, dict[str, Any]]) -> None:
        with pytest.raises(ManagerTerminated):
            self.m.run_task({"operation": create[0], "args": create[1]})

    @rule(tid=tasks)
    def cancel(self, tid: str) -> None:
        self._cancel(tid)

    @rule(name=st.sampled_from(["QUICK999999", "", "no such task", "../tasks"]))
    def cancel_unknown(self, name: str) -> None:
        with pytest.raises(TaskNotFound):
            self.m.cancel_task(name)
        with pytest.raises(TaskNotFound):
            self.m.get_task(name)

    @rule(tid=tasks)
    def open_gate(self, tid: str) -> None:
        gate = self.model[tid].gate
        if gate is not None:
            gate.touch()

    @rule(tid=tasks)
    def see_waiting(self, tid: str) -> None:
        """A running WAIT task whose gate is shut and that nobody canceled is WAITING."""
        expected = self.model[tid]
        if expected.operation != "WAIT" or expected.canceled or expected.gate is None:
            return
        if expected.gate.exists() or self.m.get_task(tid)["state"] in ("NEW", *TERMINAL):
            return
        task = wait_state(self.m, tid, "WAITING")
        assert task["state"] == "WAITING", task
        event("saw WAITING")

    @rule(tid=tasks)
    def wait(self, tid: str) -> None:
        for expected in self.model.values():  # a gated task ahead must not hold a slot
            if expected.gate is not None:
                expected.gate.touch()
        task = wait_terminal(self.m, tid, timeout=TIMEOUT)
        self._check_terminal(tid, task)

    @rule()
    def wait_all(self) -> None:
        """Open every gate; every task ends, each as the model allows."""
        for tid in self.created:
            self.wait(tid)

    @rule()
    def terminate(self) -> None:
        self.m.terminate()
        self.terminated = True
        for tid in self.created:
            self.model[tid].canceled = True  # terminate cancels every task
        for task in self.m.list_tasks():
            assert task["state"] in TERMINAL, task
        self.check_nothing_alive()

    # -- invariants ------------------------------------------------------------

    @invariant()
    def table_matches_the_model(self) -> None:
        tasks = self.m.list_tasks()  # before looking at processes (see below)
        assert [t["meta"]["id"] for t in tasks] == self.created, "not in creation order"
        running = 0
        for task in tasks:
            tid = task["meta"]["id"]
            self._check_versions(tid, task)
            if task["state"] in TERMINAL:
                self._check_terminal(tid, task)
            elif task["state"] != "NEW":
                running += 1
            if self.model[tid].cancel_requested:
                assert task["cancelRequested"] is True, task
            self._check_progress_fields(task)
        assert running <= MAX_WORKERS, [t["state"] for t in tasks]
        self._check_trees(tasks)

    # -- helpers ---------------------------------------------------------------

    def _create(self, operation: str, args: dict[str, Any]) -> str:
        args = dict(args)
        gate = None
        if operation in GATED:
            gate = self.gates / f"gate{len(self.created)}"
            args["gate"] = str(gate)
            if args.pop("open", False):
                gate.touch()  # it ends as soon as it runs
        tid = self.m.run_task({"operation": operation, "args": args})
        self.created.append(tid)
        self.model[tid] = Expected(operation, args, gate=gate)
        return tid

    def _cancel(self, tid: str) -> None:
        expected = self.model[tid]
        try:
            self.m.cancel_task(tid)
        except TaskNotFound:
            # Unknown ids are refused too; this one exists, so it must have finished.
            assert self.m.get_task(tid)["state"] in TERMINAL
        else:
            assert not self.terminated, "a terminated manager accepted a cancel"
            expected.canceled = expected.cancel_requested = True
            assert self.m.get_task(tid)["cancelRequested"] is True

    def _check_versions(self, tid: str, task: dict[str, Any]) -> None:
        """Versions only grow, every change bumps it, and terminal states never change."""
        old = self.seen.get(tid)
        self.seen[tid] = task
        if old is None:
            return
        old_version, version = old["meta"]["version"], task["meta"]["version"]
        assert version >= old_version, (tid, old_version, version)
        if version == old_version:
            assert task == old, f"{tid} changed without a new version"
        else:
            assert task["meta"]["timeModified"] >= old["meta"]["timeModified"], (old, task)
        if old["state"] in TERMINAL:
            assert task["state"] == old["state"], (tid, old["state"], task["state"])

    def _check_terminal(self, tid: str, task: dict[str, Any]) -> None:
        """The terminal state is one the model allows, and its message names the cause."""
        expected = self.model[tid]
        texts = message_texts(task)
        event(f"{expected.operation} ended {task['state']}")
        assert task["state"] in expected.allowed(), (expected, task["state"], texts)
        joined = "\n".join(texts)
        if task["state"] == "FAILED":
            assert FAILURE_CAUSE[expected.operation] in joined, texts
        elif task["state"] == "CANCELED":
            assert any(reason in joined for reason in CANCEL_REASONS), texts
        elif expected.operation == "PROGRESS":
            sent = expected.args["progress"]
            progress = task["progress"]
            assert progress["percentComplete"] == clamp(sent["percent_complete"]), progress
            if "total_bytes" in sent:
                assert progress["totalBytes"] == sent["total_bytes"], progress
            if "offset_bytes" in sent:
                assert progress["offsetBytes"] == sent["offset_bytes"], progress

    @staticmethod
    def _check_progress_fields(task: dict[str, Any]) -> None:
        progress = task.get("progress")
        if progress is None:
            return
        assert 0 <= progress["percentComplete"] <= 100, progress
        for name in ("totalBytes", "offsetBytes", "transferredBytes"):
            value = progress.get(name)
            assert value is None or (isinstance(value, int) and value >= 0), progress

    def _check_trees(self, tasks: list[dict[str, Any]]) -> None:
        """Watch the tree of each running task; none of a terminal task's is alive.

        ``tasks`` was read before this looks at processes, so a process of a
        task that was terminal then must be gone now.
        """
        below = psutil.Process().children(recursive=True)
        for task in tasks:
            tid = task["meta"]["id"]
            info = animators.ready_info(task)
            if info is None:
                continue
            expected = self.model[tid]
            if task["state"] not in TERMINAL:
                roots = [info["pid"], *info.get("children", [])]
                for pid in roots:
                    try:
                        proc = psutil.Process(pid)
                        for p in [proc, *proc.children(recursive=True)]:
                            expected.watched.setdefault(p.pid, p)
                    except psutil.NoSuchProcess:
                        pass
                continue
            left = [describe(p) for p in expected.watched.values() if is_alive(p)]
            for proc in below:
                try:
                    if os.getpgid(proc.pid) == info["pid"] and is_alive(proc):
                        left.append(describe(proc))
                except (ProcessLookupError, psutil.Error):
                    pass
            for pid in [info["pid"], *info.get("children", [])]:
                try:
                    if is_alive(psutil.Process(pid)):
                        left.append(describe(psutil.Process(pid)))
                except psutil.NoSuchProcess:
                    pass
            assert not left, f"{tid} is {task['state']} but these live: {left}"

    def check_nothing_alive(self) -> None:
        left = [describe(p) for key, p in descendants().items()
                if key not in self.before and is_alive(p)]
        assert left == []

    def teardown(self) -> None:
        try:
            self.m.terminate()
            self.check_nothing_alive()
            # Every task reached exactly one terminal state, the last one it had,
            # and its events carry versions 1, 2, 3, ... in order.
            for tid in self.created:
                wait_for(lambda tid=tid: self.log.states(tid)[-1:] and
                         self.log.states(tid)[-1] in TERMINAL)
                states = self.log.states(tid)
                assert [s for s in states if s in TERMINAL] == [states[-1]], states
                assert states[0] == "NEW", states
                versions = [e["task"]["meta"]["version"] for e in self.log.of(tid)]
                assert versions == list(range(1, len(versions) + 1)), versions
                event(" -> ".join(states))
                if states == ["NEW", "CANCELED"]:
                    texts = message_texts(self.log.of(tid)[-1]["task"])
                    assert any("queued" in t or "terminating" in t for t in texts), texts
                if self.model[tid].operation == "WAIT" and states[-1] == "SUCCEEDED":
                    assert states == ["NEW", "ACTIVE", "WAITING", "ACTIVE", "SUCCEEDED"], states
        finally:
            shutil.rmtree(self.gates, ignore_errors=True)


# NOTE: every step runs real processes, so shrinking a failure would take
# minutes (Hypothesis gives up after five); a failure is reported unshrunk.
ManagerMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
TestManagerMachine = ManagerMachine.TestCase
