"""The demo animators: validation branches, and execute run in-process on FakeTaskOps."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from typing import Any

import pytest
from conftest import TIMEOUT, message_texts, wait_for, wait_terminal

from supervisor.animator import Animator
from supervisor.errors import InvalidAnimator, InvalidArguments
from supervisor.states import TaskState
from workers import demo
from workers.demo import MIB, Hash, Sleep
from workers.testing import FakeTaskOps, run

# -- validate -----------------------------------------------------------------


@pytest.mark.parametrize("args", [None, {}, {"seconds": 0}, {"seconds": 0.25},
                                  {"seconds": 86400}, {"seconds": 3, "other": "x"}])
def test_sleep_accepts(args: dict[str, Any] | None) -> None:
    create: dict[str, Any] = {"operation": "SLEEP"}
    if args is not None:
        create["args"] = args
    Sleep("SLEEP").validate(create)


@pytest.mark.parametrize("seconds", [-1, -0.001, 86400.5, float("nan"), float("inf"),
                                     "1", True, None, [1]])
def test_sleep_rejects_seconds(seconds: object) -> None:
    with pytest.raises(InvalidArguments, match=r"^args\.seconds must be a number"):
        Sleep("SLEEP").validate({"operation": "SLEEP", "args": {"seconds": seconds}})


@pytest.mark.parametrize("args", [None, {}, {"megabytes": 1}, {"megabytes": 4096}])
def test_hash_accepts(args: dict[str, Any] | None) -> None:
    create: dict[str, Any] = {"operation": "HASH"}
    if args is not None:
        create["args"] = args
    Hash("HASH").validate(create)


@pytest.mark.parametrize("megabytes", [0, -1, 4097, 1.0, 2.5, "8", True, None])
def test_hash_rejects_megabytes(megabytes: object) -> None:
    with pytest.raises(InvalidArguments,
                       match=r"^args\.megabytes must be an integer between 1 and 4096$"):
        Hash("HASH").validate({"operation": "HASH", "args": {"megabytes": megabytes}})


@pytest.mark.parametrize("animator", [Sleep(), Hash()])
@pytest.mark.parametrize("args", [[], "x", 3])
def test_args_must_be_an_object(animator: Animator, args: object) -> None:
    with pytest.raises(InvalidArguments, match=r"^args must be an object$"):
        animator.validate({"operation": "X", "args": args})


def test_operation_is_checked_when_named() -> None:
    with pytest.raises(InvalidAnimator, match="HASH"):
        Sleep("SLEEP").validate({"operation": "HASH"})
    Sleep().validate({"operation": "NAPS"})  # unnamed: any operation


def test_register_adds_both_operations() -> None:
    registry = DummyRegistry()
    demo.register(registry)
    assert sorted(registry.animators) == ["HASH", "SLEEP"]
    assert isinstance(registry.animators["SLEEP"], Sleep)
    assert isinstance(registry.animators["HASH"], Hash)
    for animator in registry.animators.values():
        assert type(pickle.loads(pickle.dumps(animator))) is type(animator)


# -- execute ------------------------------------------------------------------


def test_sleep_reports_progress_and_returns_seconds() -> None:
    state, result, ops = run(Sleep("SLEEP"), {"operation": "SLEEP", "args": {"seconds": 0.2}})
    assert (state, result) == (TaskState.SUCCEEDED, {"seconds": 0.2})
    percents = [p["percent_complete"] for p in ops.progress]
    assert len(percents) >= 3  # steps of at most Sleep.step (0.05 s)
    assert percents == sorted(percents)
    assert percents[-1] == 100


def test_sleep_zero_returns_at_once() -> None:
    state, result, ops = run(Sleep(), {"operation": "SLEEP", "args": {"seconds": 0}})
    assert (state, result) == (TaskState.SUCCEEDED, {"seconds": 0})
    assert ops.progress == [{"percent_complete": 100}]


def test_sleep_honours_cancel() -> None:
    ops = FakeTaskOps(cancel_after=2)
    state, result, _ = run(Sleep(), {"operation": "SLEEP", "args": {"seconds": 60}}, ops)
    assert (state, result) == (TaskState.CANCELED, None)
    assert ops.is_canceled_calls == 3
    assert ops.states == [TaskState.CANCELED]
    assert ops.reason == "the animator honoured the cancel"


def expected_digest(megabytes: int) -> str:
    """SHA-256 of the documented input: byte k is k % 256."""
    return hashlib.sha256(bytes(range(256)) * (megabytes * MIB // 256)).hexdigest()


def test_hash_digest_and_progress() -> None:
    state, result, ops = run(Hash(), {"operation": "HASH", "args": {"megabytes": 3}})
    assert state is TaskState.SUCCEEDED
    assert result == {"digest": expected_digest(3), "megabytes": 3}
    total = 3 * MIB
    assert [p["offset_bytes"] for p in ops.progress] == [0, MIB, 2 * MIB, total]
    assert [p["percent_complete"] for p in ops.progress] == [0, 33, 66, 100]
    assert all(p["total_bytes"] == total for p in ops.progress)
    assert all(p["transferred_bytes"] == p["offset_bytes"] for p in ops.progress)


def test_hash_default_is_64_megabytes() -> None:
    state, result, ops = run(Hash(), {"operation": "HASH"})
    assert state is TaskState.SUCCEEDED
    assert result == {"digest": expected_digest(64), "megabytes": 64}
    assert ops.last_progress["total_bytes"] == 64 * MIB


def test_hash_honours_cancel() -> None:
    ops = FakeTaskOps(cancel_after=2)
    state, result, _ = run(Hash(), {"operation": "HASH", "args": {"megabytes": 100}}, ops)
    assert (state, result) == (TaskState.CANCELED, None)
    assert ops.last_progress["offset_bytes"] == 2 * MIB  # two chunks, then the cancel


# -- with a real manager --------------------------------------------------------


def test_hash_in_a_task_process(manager: Callable[..., Any]) -> None:
    m = manager(max_workers=1)
    demo.register(m)
    task_id = m.run_task({"operation": "HASH", "args": {"megabytes": 2}})
    task = wait_terminal(m, task_id)
    assert task["state"] == "SUCCEEDED", message_texts(task)
    assert task["result"] == {"digest": expected_digest(2), "megabytes": 2}
    assert task["progress"]["percentComplete"] == 100
    assert task["progress"]["totalBytes"] == task["progress"]["offsetBytes"] == 2 * MIB


def test_sleep_in_a_task_process_honours_cancel(manager: Callable[..., Any]) -> None:
    m = manager(max_workers=1, cancel_grace=TIMEOUT)  # a kill would take TIMEOUT
    demo.register(m)
    task_id = m.run_task({"operation": "SLEEP", "args": {"seconds": 600}})
    wait_for(lambda: (m.get_task(task_id).get("progress") or {}).get("percentComplete", -1)
             >= 0)
    m.cancel_task(task_id)
    task = wait_terminal(m, task_id, timeout=TIMEOUT / 2)
    assert task["state"] == "CANCELED"
    assert any("honoured" in text for text in message_texts(task)), message_texts(task)


def test_invalid_arguments_are_refused_by_the_manager(manager: Callable[..., Any]) -> None:
    m = manager(max_workers=1)
    demo.register(m)
    with pytest.raises(InvalidArguments, match=r"args\.megabytes"):
        m.run_task({"operation": "HASH", "args": {"megabytes": 0}})
    assert m.list_tasks() == []


class DummyRegistry:
    """Records register_animator calls, as a manager would take them."""

    def __init__(self) -> None:
        self.animators: dict[str, Animator] = {}

    def register_animator(self, operation: str, animator: Animator) -> None:
        assert operation not in self.animators
        self.animators[operation] = animator
