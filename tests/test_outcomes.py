"""Outcomes as data and usage per task: every kind from a real task, in the library and
over REST, with its exit status, error type and cost; forced kills in /metrics."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import outcome_animators
import psutil
import pytest
from animators import ready_info
from conftest import TIMEOUT, wait_for, wait_state, wait_terminal
from rest_support import ROOT, LiveServer
from test_metrics import parse, value

from supervisor import Outcome, OutcomeKind, Usage

TASKS = "/api/v1/tasks"

#: operation, args -> kind, exitCode, signal, errorType (None: not checked)
SIMPLE: list[tuple[str, dict[str, Any], str, int | None, str | None, str | None]] = [
    ("RETURN", {}, "returned", 0, None, None),
    ("RAISE", {"text": "x"}, "exception", 0, None, "RuntimeError"),
    ("FAIL", {}, "failed-by-animator", 0, None, None),
    ("EXIT", {"code": 3}, "crash", 3, None, None),
    ("SEGFAULT", {}, "crash", None, "SIGSEGV", None),
    # NOTE: it ignores SIGTERM: the SIGKILL after the grace ends it
    ("TIMEOUT", {}, "timeout", None, "SIGKILL", None),
    ("MEMORY", {"bytes": 1 << 30}, "memory", 0, None, "MemoryError"),
    ("CPU", {"seconds": TIMEOUT}, "cpu", None, "SIGXCPU", None),
    ("RESULT", {"kind": "set"}, "result", 0, None, "TypeError"),
    ("PROTOCOL", {}, "protocol", None, "SIGKILL", None),
]


def check_simple(task: dict[str, Any], kind: str, exit_code: int | None, sig: str | None,
                 error_type: str | None) -> None:
    outcome = task["outcome"]
    assert set(outcome) == {"kind", "message", "exitCode", "signal", "errorType"}, outcome
    assert outcome["kind"] == kind, task
    assert task["state"] == OutcomeKind(kind).state.value
    assert (outcome["exitCode"], outcome["signal"]) == (exit_code, sig), outcome
    if error_type is not None:
        assert outcome["errorType"] == error_type, outcome
    # the outcome's message is the first line of the terminal version, the
    # "State change" line the last: the human lines are kept as they were
    if outcome["message"]:
        texts = [entry["message"] for entry in task["messages"]]
        assert outcome["message"] in texts, texts
    assert task["usage"]["wallSeconds"] >= 0, task
    Outcome.from_wire(outcome)
    Usage.from_wire(task["usage"])


def started(m: Any, task_id: str) -> dict[str, Any]:
    """Wait until the task's animator said it is ready (it runs); return its info."""
    return wait_for(lambda: ready_info(m.get_task(task_id)))  # type: ignore[no-any-return]


def kill_starter(info: dict[str, Any], supervisor_pid: int) -> None:
    """SIGKILL the starter of a task process (checking it is the supervisor's child)."""
    starter = psutil.Process(info["ppid"])
    assert starter.ppid() == supervisor_pid, starter
    starter.send_signal(signal.SIGKILL)


# -- the library -----------------------------------------------------------------------


@pytest.fixture
def m(manager: Any) -> Any:
    made = manager(max_workers=4, cancel_grace=0.5)
    outcome_animators.register(made)
    return made


@pytest.mark.parametrize(("operation", "args", "kind", "exit_code", "sig", "error_type"),
                         SIMPLE, ids=[row[2] + "-" + row[0] for row in SIMPLE])
def test_each_kind_from_a_real_task(m: Any, operation: str, args: dict[str, Any], kind: str,
                                    exit_code: int | None, sig: str | None,
                                    error_type: str | None) -> None:
    task = wait_terminal(m, m.run_task({"operation": operation, "args": args}))
    check_simple(task, kind, exit_code, sig, error_type)


def test_canceled_kinds(m: Any, manager: Any) -> None:
    honoured = m.run_task({"operation": "COOPERATIVE"})
    stubborn = m.run_task({"operation": "STUBBORN"})
    started(m, honoured)
    started(m, stubborn)
    m.cancel_task(honoured)
    m.cancel_task(stubborn)
    task = wait_terminal(m, honoured)
    assert task["outcome"]["kind"] == "canceled-honoured", task
    assert task["outcome"]["exitCode"] == 0 and "usage" in task
    task = wait_terminal(m, stubborn)
    assert task["outcome"]["kind"] == "canceled-killed", task
    assert task["outcome"]["signal"] == "SIGKILL", task  # it ignored SIGTERM too

    one = manager(max_workers=1)
    outcome_animators.register(one)
    blocker = one.run_task({"operation": "STUBBORN"})
    queued = one.run_task({"operation": "RETURN"})
    one.cancel_task(queued)
    task = one.get_task(queued)
    assert task["state"] == "CANCELED" and task["outcome"] == {
        "kind": "canceled-queued", "message": "canceled while queued", "exitCode": None,
        "signal": None, "errorType": None}
    assert "usage" not in task  # it never ran
    started(one, blocker)
    waiting = one.run_task({"operation": "RETURN"})
    one.terminate()
    for task_id, kind in ((blocker, "canceled-terminate"), (waiting, "canceled-queued")):
        task = one.get_task(task_id)
        assert task["outcome"]["kind"] == kind, task


def test_lost_when_the_starter_dies(m: Any) -> None:
    import os

    task_id = m.run_task({"operation": "COOPERATIVE"})
    kill_starter(started(m, task_id), os.getpid())
    task = wait_terminal(m, task_id)
    assert task["outcome"]["kind"] == "lost", task
    # NOTE: its reaper died with the starter: how it exited is not known
    assert (task["outcome"]["exitCode"], task["outcome"]["signal"]) == (None, None), task


def test_usage_is_plausible(m: Any) -> None:
    burn = m.run_task({"operation": "BURN", "args": {"seconds": 0.3}})
    allocate = m.run_task({"operation": "ALLOCATE", "args": {"mib": 200}})
    task = wait_terminal(m, burn)
    usage = task["usage"]
    assert task["state"] == "SUCCEEDED", task
    assert usage["cpuUserSeconds"] + usage["cpuSystemSeconds"] >= 0.25, usage
    assert usage["wallSeconds"] >= 0.25, usage
    task = wait_terminal(m, allocate)
    assert task["state"] == "SUCCEEDED", task
    assert task["usage"]["maxRssBytes"] >= 200 << 20, task["usage"]


def test_a_running_task_has_no_outcome_yet(m: Any) -> None:
    task_id = m.run_task({"operation": "COOPERATIVE"})
    started(m, task_id)
    task = wait_state(m, task_id, "ACTIVE")
    assert "outcome" not in task and "usage" not in task
    m.cancel_task(task_id)
    wait_terminal(m, task_id)


# -- over REST -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    server = LiveServer("--animators", "outcome_animators:register", "--max-workers", "4",
                        cwd=ROOT / "tests").start()
    try:
        yield server
    finally:
        server.close()


def _terminal(live: LiveServer, task_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        task = live.get(f"{TASKS}/{task_id}").json()
        return task if task["state"] in ("SUCCEEDED", "FAILED", "CANCELED") else None

    return wait_for(done)  # type: ignore[no-any-return]


def _started(live: LiveServer, task_id: str) -> dict[str, Any]:
    return wait_for(lambda: ready_info(live.get(f"{TASKS}/{task_id}").json()))  # type: ignore[no-any-return]


def test_each_kind_over_rest(live: LiveServer) -> None:
    ids = []
    for operation, args, *_ in SIMPLE:
        answer = live.post(TASKS, json={"operation": operation, "args": args})
        assert answer.status_code == 201, answer.text
        ids.append(answer.json()["meta"]["id"])
    from openapi_schema_validator import OAS31Validator

    document = live.get("/api/v1/openapi.json").json()
    schema = OAS31Validator({"$ref": "#/components/schemas/Task",
                             "components": document["components"]})
    for task_id, (_, _, kind, exit_code, sig, error_type) in zip(ids, SIMPLE, strict=True):
        task = _terminal(live, task_id)
        check_simple(task, kind, exit_code, sig, error_type)
        schema.validate(task)
    with pytest.raises(Exception, match="is not one of"):
        schema.validate({**task, "outcome": {**task["outcome"], "kind": "made-up"}})
    samples = parse(live.get("/metrics").text)
    # a timeout is a kill the supervisor decided: counted, by its kind
    assert value(samples, "housekeeping_forced_kills_total", operation="TIMEOUT",
                 kind="timeout") == 1
    assert value(samples, "housekeeping_forced_kills_total", operation="PROTOCOL",
                 kind="protocol") == 1
    assert value(samples, "housekeeping_tasks_finished_total", operation="TIMEOUT",
                 state="FAILED", kind="timeout") == 1
    assert value(samples, "housekeeping_tasks_finished_total", operation="SEGFAULT",
                 state="FAILED", kind="crash") == 1
    # a crash was not killed by the supervisor: no forced kill
    assert ("housekeeping_forced_kills_total",
            (("kind", "crash"), ("operation", "SEGFAULT"))) not in samples
    assert value(samples, "housekeeping_task_cpu_seconds_count", operation="RETURN") == 1
    # housekeeping serve turns prometheus-client's "_created" series off (the README's list)
    assert not [name for name, _ in samples if name.endswith("_created")]


def test_canceled_and_lost_kinds_over_rest(live: LiveServer) -> None:
    """(``canceled-terminate`` is the library's test: a terminating server serves no more.)"""
    honoured = live.post(TASKS, json={"operation": "COOPERATIVE"}).json()["meta"]["id"]
    stubborn = live.post(TASKS, json={"operation": "STUBBORN"}).json()["meta"]["id"]
    lost = live.post(TASKS, json={"operation": "COOPERATIVE"}).json()["meta"]["id"]
    for task_id in (honoured, stubborn):
        _started(live, task_id)
        assert live.post(f"{TASKS}/{task_id}/cancel").status_code == 200
    assert _terminal(live, honoured)["outcome"]["kind"] == "canceled-honoured"
    assert _terminal(live, stubborn)["outcome"]["kind"] == "canceled-killed"
    assert live.proc is not None
    kill_starter(_started(live, lost), live.proc.pid)
    assert _terminal(live, lost)["outcome"]["kind"] == "lost"
    # queued: four STUBBORN tasks hold every slot, a fifth waits and is canceled
    blockers = [live.post(TASKS, json={"operation": "STUBBORN"}).json()["meta"]["id"]
                for _ in range(4)]
    queued = live.post(TASKS, json={"operation": "RETURN"}).json()["meta"]["id"]
    assert live.post(f"{TASKS}/{queued}/cancel").status_code == 200
    assert _terminal(live, queued)["outcome"]["kind"] == "canceled-queued"
    for task_id in blockers:
        _started(live, task_id)
        live.post(f"{TASKS}/{task_id}/cancel")
    for task_id in blockers:
        _terminal(live, task_id)

