"""FakeTaskOps and run(): the fake behaves like TaskOps, and run() like a task process."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from supervisor.animator import Animator
from supervisor.errors import InvalidArguments
from supervisor.protocol import MAX_RESULT_BYTES, Cancel, Finished, Note, Progress, StateChanged
from supervisor.states import TaskState
from workers import TaskEnded
from workers.testing import FakeTaskOps, make_task, run

TIMEOUT = 30  # deadlock guard only

# -- FakeTaskOps ----------------------------------------------------------------


def test_records_every_call_in_order() -> None:
    ops = FakeTaskOps()
    ops.set_progress(percent_complete=10, total_bytes=100)
    ops.message("half way")
    ops.set_state(TaskState.WAITING)
    ops.set_state("ACTIVE")
    ops.set_progress(percent_complete=150, offset_bytes=7)
    assert ops.progress == [{"percent_complete": 10, "total_bytes": 100},
                            {"percent_complete": 100, "offset_bytes": 7}]
    assert ops.last_progress == {"percent_complete": 100, "total_bytes": 100, "offset_bytes": 7}
    assert ops.messages == ["half way"]
    assert ops.states == [TaskState.WAITING, TaskState.ACTIVE]
    assert ops.state is TaskState.ACTIVE
    assert [name for name, _ in ops.calls] == [
        "set_progress", "message", "set_state", "set_state", "set_progress"]


def test_reports_cross_the_pipe_as_protocol_frames() -> None:
    ops = FakeTaskOps()
    ops.set_progress(percent_complete=10)
    ops.message("x" * 5000)
    ops.set_state(TaskState.WAITING)
    sent = ops.sent
    assert [type(message) for message in sent] == [Progress, Note, StateChanged]
    assert sent[0].values == {"percent_complete": 10}
    assert sent[1].text == "x" * 4096  # cut by the real handle before it is sent
    assert sent[2].state == "WAITING"


def test_a_cancel_arrives_as_a_frame_the_real_receive_reads() -> None:
    ops = FakeTaskOps()
    assert not ops.is_canceled()
    ops.pipe.deliver(Cancel())  # as the supervisor would send it
    assert ops.is_canceled() and not ops.pipe.inbound


def test_run_reads_the_final_report_from_the_pipe() -> None:
    state, result, ops = run(Echo(), {"operation": "ECHO", "args": {"n": 1}})
    final = ops.sent[-1]
    assert isinstance(final, Finished)
    assert (final.state, final.result_json, final.kind) == ("SUCCEEDED", '{"n":1}', "returned")
    assert (state, result) == (TaskState.SUCCEEDED, {"n": 1})


def test_progress_is_checked_like_the_real_one() -> None:
    ops = FakeTaskOps()
    with pytest.raises(ValueError, match="total_bytes"):
        ops.set_progress(total_bytes=-1)
    with pytest.raises(TypeError, match="percent_complete"):
        ops.set_progress(percent_complete="5")  # type: ignore[arg-type]
    assert ops.progress == []


@pytest.mark.parametrize("state", [TaskState.CANCELED, TaskState.FAILED, TaskState.SUCCEEDED])
def test_terminal_state_raises_task_ended(state: TaskState) -> None:
    ops = FakeTaskOps()
    with pytest.raises(TaskEnded) as ended:
        ops.set_state(state.value)
    assert ended.value.state is state
    assert ops.state is state
    assert ops.states == [state]


def test_new_and_unknown_states_are_refused() -> None:
    ops = FakeTaskOps()
    with pytest.raises(ValueError, match="NEW"):
        ops.set_state(TaskState.NEW)
    with pytest.raises(ValueError):
        ops.set_state("DONE")
    assert ops.states == []


def test_cancel_after_counts_is_canceled_calls() -> None:
    ops = FakeTaskOps(cancel_after=2)
    assert [ops.is_canceled() for _ in range(4)] == [False, False, True, True]
    assert ops.is_canceled_calls == 4
    assert FakeTaskOps(cancel_after=0).is_canceled()
    with pytest.raises(ValueError):
        FakeTaskOps(cancel_after=-1)


def test_cancel_calls_the_hook_once() -> None:
    ops = FakeTaskOps()
    fired: list[int] = []
    ops.set_cancel_hook(lambda: fired.append(1))
    assert not ops.is_canceled()
    ops.cancel()
    ops.cancel()
    assert ops.is_canceled() and ops.canceled
    assert fired == [1]
    ops.set_cancel_hook(lambda: fired.append(2))  # set after the cancel: called at once
    assert fired == [1, 2]


def test_make_task_has_the_wire_fields() -> None:
    create = {"operation": "OP", "objectId": "vol-1", "serviceStates": {}, "args": {"a": 1}}
    first, second = make_task(create), make_task(create)
    assert first["meta"]["id"] != second["meta"]["id"]
    assert first["meta"]["objType"] == "Task"
    assert {k: first[k] for k in create} == create
    assert first["state"] == "ACTIVE" and first["cancelRequested"] is False
    assert first["result"] is None


# -- run() --------------------------------------------------------------------


def test_run_returns_the_result_as_json_reads_it() -> None:
    state, result, ops = run(Echo(), {"operation": "ECHO", "args": {"x": (1, 2)}})
    assert state is TaskState.SUCCEEDED and ops.state is TaskState.SUCCEEDED
    assert result == {"x": [1, 2]}  # the tuple comes back a list, as over REST
    assert ops.reason is None
    assert ops.task["args"] == {"x": (1, 2)}


def test_run_accepts_a_full_task_and_a_prepared_fake() -> None:
    task = make_task({"operation": "ECHO", "args": {"y": 1}})
    mine = FakeTaskOps()
    state, result, ops = run(Echo(), task, mine)
    assert ops is mine and ops.task is task
    assert (state, result) == (TaskState.SUCCEEDED, {"y": 1})


def test_run_validates_first() -> None:
    with pytest.raises(InvalidArguments, match=r"args\.x"):
        run(Echo(), {"operation": "ECHO", "args": {"bad": True}})
    state, _, _ = run(Echo(), {"operation": "ECHO", "args": {"bad": True}}, validate=False)
    assert state is TaskState.SUCCEEDED


def test_run_reports_a_terminal_set_state() -> None:
    state, result, ops = run(SetsFailed(), {"operation": "FAIL"})
    assert (state, result) == (TaskState.FAILED, None)
    assert ops.reason == "the animator set the state FAILED"


def test_run_lets_exceptions_through() -> None:
    with pytest.raises(ZeroDivisionError):
        run(Raises(), {"operation": "RAISE"})


@pytest.mark.parametrize(("value", "reason"), [
    ({1, 2}, "not JSON-serializable"),
    (float("nan"), "not JSON-serializable"),
    ("x" * MAX_RESULT_BYTES, "result too large"),
])
def test_run_fails_a_bad_result(value: Any, reason: str) -> None:
    state, result, ops = run(Returns(value), {"operation": "RET"}, validate=False)
    assert (state, result) == (TaskState.FAILED, None)
    assert ops.reason is not None and reason in ops.reason


def test_run_refuses_an_unpicklable_animator() -> None:
    animator = Returns(None)
    animator.value = lambda: None
    with pytest.raises(Exception, match="pickle"):
        run(animator, {"operation": "RET"})


def test_run_async_execute() -> None:
    state, result, ops = run(AsyncWaits(), {"operation": "ASYNC", "args": {"n": 3}})
    assert (state, result) == (TaskState.SUCCEEDED, 3)
    assert [p["percent_complete"] for p in ops.progress] == [33, 66, 100]


def test_run_async_cancel_at_await_from_another_thread() -> None:
    ops = FakeTaskOps()
    animator = AsyncWaits()
    outcome: list[Any] = []
    worker = threading.Thread(
        target=lambda: outcome.append(run(animator, {"operation": "A", "args": {"n": 0}}, ops)))
    worker.start()
    assert AsyncWaits.started.wait(TIMEOUT)
    ops.cancel()
    worker.join(TIMEOUT)
    assert not worker.is_alive()
    state, result, _ = outcome[0]
    assert (state, result) == (TaskState.CANCELED, None)
    assert ops.reason == "canceled at an await point"


def test_run_async_cancel_after() -> None:
    state, _, ops = run(AsyncPolls(), {"operation": "A"}, FakeTaskOps(cancel_after=1))
    assert state is TaskState.CANCELED
    assert ops.reason == "canceled at an await point"


def test_run_async_set_state_canceled() -> None:
    state, _, ops = run(AsyncHonours(), {"operation": "A"}, FakeTaskOps(cancel_after=0))
    assert state is TaskState.CANCELED
    assert ops.reason == "the animator honoured the cancel"


class Echo(Animator):
    """Returns its args; refuses args.bad."""

    def validate(self, create: dict[str, Any]) -> None:
        if "bad" in create.get("args", {}):
            raise InvalidArguments("args.x is required")

    def execute(self, ops: Any) -> Any:
        return ops.task.get("args")


class SetsFailed(Animator):
    """Ends itself FAILED through set_state."""

    def execute(self, ops: Any) -> Any:
        ops.set_state(TaskState.FAILED)


class Raises(Animator):
    """Crashes with an exception."""

    def execute(self, ops: Any) -> Any:
        return 1 / 0


class Returns(Animator):
    """Returns whatever it was given."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def execute(self, ops: Any) -> Any:
        return self.value


class AsyncWaits(Animator):
    """Async: n progress steps; with n=0 it waits forever (for a cancel)."""

    started = threading.Event()

    async def execute(self, ops: Any) -> Any:
        n = ops.task["args"]["n"]
        for i in range(1, n + 1):
            await asyncio.sleep(0)
            ops.set_progress(percent_complete=100 * i // n)
        if n == 0:
            AsyncWaits.started.set()
            await asyncio.Event().wait()
        return n


class AsyncPolls(Animator):
    """Async: polls is_canceled but ignores it; only the await can end it."""

    async def execute(self, ops: Any) -> Any:
        while True:
            ops.is_canceled()
            await asyncio.sleep(0)


class AsyncHonours(Animator):
    """Async: honours the cancel itself, before any await."""

    async def execute(self, ops: Any) -> Any:
        if ops.is_canceled():
            ops.set_state(TaskState.CANCELED)
        return "not canceled"


def test_run_records_the_outcome_kind_as_the_task_process_would() -> None:
    import animators
    import outcome_animators

    from supervisor import OutcomeKind

    cases = [(animators.Quick(), {}, TaskState.SUCCEEDED, OutcomeKind.RETURNED),
             (outcome_animators.FailByAnimator(), {}, TaskState.FAILED,
              OutcomeKind.FAILED_BY_ANIMATOR),
             (animators.BadResult(), {"kind": "set"}, TaskState.FAILED, OutcomeKind.RESULT)]
    for animator, args, state, kind in cases:
        got, _, ops = run(animator, {"operation": "X", "args": args})
        assert (got, ops.kind) == (state, kind), animator
    state, _, ops = run(animators.Cooperative(), {"operation": "X"}, FakeTaskOps(cancel_after=2))
    assert (state, ops.kind) == (TaskState.CANCELED, OutcomeKind.CANCELED_HONOURED)
    ops = FakeTaskOps()
    threading.Timer(0.05, ops.cancel).start()  # from another thread, as a test would
    state, _, ops = run(animators.AsyncSleeper(), {"operation": "X"}, ops)
    assert (state, ops.kind, ops.reason) == (
        TaskState.CANCELED, OutcomeKind.CANCELED_HONOURED, "canceled at an await point")
