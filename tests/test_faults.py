"""The fault matrix: every fault the supervisor handles, through the library and through REST.

Each row of ``FAULTS`` names a fault, how the test provokes it, and its
documented outcome: the terminal state and words of the message naming the
cause (or, for a faulty ``validate``, the refusal). The same rows run against
an embedded Manager and against a real ``python -m rest serve`` subprocess;
both are set up by ``fault_animators.register``, which also subscribes a
subscriber that raises on every event. After each row the supervisor must
still serve (a quick task succeeds; over REST, ``/healthz`` answers 200), and
nothing of the task's process tree may be alive once the task is terminal.

The supervisor itself killed (SIGKILL, SIGTERM) is tested at the end, for an
embedding process and for the server, each with faulty tasks running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import animators
import fault_animators
import psutil
import pytest
from conftest import (
    PRIVATE_PIDS_OFF,
    TERMINAL,
    TIMEOUT,
    EventLog,
    describe,
    is_alive,
    message_texts,
    wait_for,
    wait_terminal,
)
from rest_support import ROOT, LiveServer, SseClient, assert_error, serving

from rest.cli import RET_OK
from supervisor import InvalidAnimator, InvalidArguments
from supervisor.protocol import MAX_RESULT_BYTES

TESTS_DIR = Path(__file__).resolve().parent
TASKS = "/api/v1/tasks"
GiB = 1024**3
#: Cancel grace of both ways in (LiveServer passes ``--cancel-grace 1``).
CANCEL_GRACE = 1.0
#: How long descendants may outlive a SIGKILLed supervisor (the spec's bound).
AFTERLIFE = 2.0
#: Where a Garbage task also writes its ``ready`` info, so that the tree check
#: does not depend on the note it sends right before the garbage.
INFO = "{tmp}/info.json"


@dataclass(frozen=True)
class Fault:
    """One row of the matrix: a fault, how to provoke it, what must come of it."""

    name: str
    operation: str
    args: dict[str, Any] = field(default_factory=dict)
    #: run (just wait), cancel (once ready), kill-starter (once ready),
    #: refuse (validate raises), subscriber (a subscriber raises)
    action: str = "run"
    state: str = "FAILED"
    says: tuple[str, ...] = ()  #: words of the task's messages, or of the refusal
    refusal: type[Exception] = InvalidArguments  #: what run_task raises ("refuse")

    def args_in(self, tmp: Path) -> dict[str, Any]:
        """The row's args with ``{tmp}`` replaced by a directory of the test."""
        return {key: value.replace("{tmp}", str(tmp)) if isinstance(value, str) else value
                for key, value in self.args.items()}


FAULTS = [
    Fault("segfault", "SEGV", says=("was killed by SIGSEGV",)),
    Fault("sigkill", "KILL", says=("was killed by SIGKILL",)),
    Fault("os-exit", "EXIT", says=("exited with code 3 without reporting a result",)),
    Fault("sys-exit", "SYSEXIT", says=("SystemExit: 2",)),
    Fault("exception", "RAISE", {"text": "in execute"}, says=("RuntimeError: boom in execute",)),
    Fault("async-exception", "ARAISE", says=("ValueError: async boom",)),
    Fault("unpicklable-result", "BADRESULT", {"kind": "lambda"},
          says=("result is not JSON-serializable", "function")),
    Fault("socket-result", "BADRESULT", {"kind": "socket"},
          says=("result is not JSON-serializable", "socket")),
    Fault("oversized-result", "BIGRESULT", {"size": 2 * MAX_RESULT_BYTES},
          says=("result too large", f"limit {MAX_RESULT_BYTES}")),
    Fault("memory-limit", "HOG", {"bytes": 2 * GiB},
          says=("memory limit exceeded", "MemoryError")),
    Fault("timeout", "TIMEOUT", says=("timed out after 1 s",)),
    Fault("sigterm-ignored-under-cancel", "STUBBORN", action="cancel", state="CANCELED",
          says=("killed after cancel grace period",)),
    Fault("double-forked-daemon", "DAEMON", {"mode": "return", "pidfile": "{tmp}/daemon.pid"},
          state="SUCCEEDED"),
    Fault("double-forked-daemon-under-cancel", "DAEMON",
          {"mode": "wait", "pidfile": "{tmp}/daemon.pid"}, action="cancel", state="CANCELED",
          says=("the animator honoured the cancel",)),
    Fault("grandchildren-of-a-crash", "FORKER", {"mode": "crash"},
          says=("exited with code 1 without reporting a result",)),
    Fault("pipe-closed", "CLOSEPIPE", says=("exited with code 0 without reporting a result",)),
    Fault("pipe-closed-then-hang", "CLOSEPIPE", {"linger": True}, action="cancel",
          state="CANCELED", says=("killed after cancel grace period",)),
    Fault("garbage-frame-length", "GARBAGE", {"kind": "length", "infofile": INFO},
          says=("protocol error", "bad frame length")),
    Fault("garbage-undecodable", "GARBAGE", {"kind": "undecodable", "infofile": INFO},
          says=("protocol error", "undecodable message")),
    Fault("garbage-code-in-pickle", "GARBAGE",
          {"kind": "pickle", "marker": "{tmp}/pwned", "infofile": INFO},
          says=("protocol error", "forbidden class")),
    Fault("garbage-final-state", "GARBAGE", {"kind": "bad-final", "at_once": True,
                                             "infofile": INFO},
          says=("bad final state 'ACTIVE'",)),
    Fault("starter-killed", "COOP", action="kill-starter",
          says=("the starter process died",)),
    Fault("validate-zero-division", "VALIDATE", {"kind": "zero"}, action="refuse",
          says=("division by zero",)),
    Fault("validate-key-error", "VALIDATE", {"kind": "key"}, action="refuse",
          says=("args.missing",)),
    Fault("validate-attribute-error", "VALIDATE", {"kind": "attribute"}, action="refuse",
          says=("'NoneType' object has no attribute 'upper'",)),
    Fault("validate-empty-message", "VALIDATE", {"kind": "empty"}, action="refuse",
          says=("RuntimeError",)),
    Fault("validate-invalid-animator", "REJECT", {"reject": "animator"}, action="refuse",
          says=("REJECT is not mine",), refusal=InvalidAnimator),
    Fault("subscriber-raises", "QUICK", action="subscriber", state="SUCCEEDED"),
]


def check_outcome(fault: Fault, task: dict[str, Any], tmp: Path) -> None:
    """The task ended as the row documents it, and did no harm on the way."""
    texts = message_texts(task)
    assert task["state"] == fault.state, f"{fault.name}: {task['state']}: {texts}"
    joined = "\n".join(texts)
    for words in fault.says:
        assert words in joined, f"{fault.name}: {words!r} not in {texts}"
    assert f"⇒ {fault.state}" in joined, texts
    if fault.state != "SUCCEEDED":
        assert task.get("result") is None, task
    if "marker" in fault.args:
        assert not Path(fault.args_in(tmp)["marker"]).exists(), "the pickle ran code"


def check_ended(fault: Fault, task: dict[str, Any], watched: list[psutil.Process],
                root: psutil.Process, tmp: Path) -> None:
    """Nothing of the task's tree is alive, the outcome is the documented one, and
    the task's ``ready`` message (sent before any fault) was kept."""
    if fault.action == "subscriber":
        check_outcome(fault, task, tmp)
        return
    info = animators.ready_info(task)
    kept = info is not None
    if info is None and "infofile" in fault.args:
        info = json.loads(Path(fault.args_in(tmp)["infofile"]).read_text())
    assert info is not None, f"no ready message: {message_texts(task)}"
    left = tree_left(info, watched, root)
    assert not left, f"alive after the task ended {task['state']}: {left}"
    check_outcome(fault, task, tmp)
    assert kept, ("a message the task sent before the fault (in the same write) was lost: "
                  f"{message_texts(task)}")


def tree_left(info: dict[str, Any], watched: list[psutil.Process],
              root: psutil.Process) -> list[str]:
    """What of a task's tree is alive: its process, the children it reported, the
    processes seen below it while it ran, and anything below ``root`` in its
    process group (a task process leads a group of its own)."""
    left = {p.pid: p for p in watched if is_alive(p)}
    for pid in [info["pid"], *info.get("children", [])]:
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        if is_alive(proc):
            left[pid] = proc
    try:
        below = root.children(recursive=True)
    except psutil.Error:
        below = []
    for proc in below:
        try:
            if os.getpgid(proc.pid) == info["pid"] and is_alive(proc):
                left[proc.pid] = proc
        except (ProcessLookupError, psutil.Error):
            pass
    return [describe(p) for p in left.values()]


def watch_tree(info: dict[str, Any]) -> list[psutil.Process]:
    """The task process and everything below it now (empty if it already ended)."""
    try:
        proc = psutil.Process(info["pid"])
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_starter(info: dict[str, Any], supervisor_pid: int) -> None:
    """SIGKILL the starter of a task process (checking it is the supervisor's child)."""
    starter = psutil.Process(info["ppid"])
    assert starter.ppid() == supervisor_pid, describe(starter)
    starter.send_signal(signal.SIGKILL)


# -- the library ---------------------------------------------------------------------


def library_still_serves(m: Any) -> None:
    """A quick task succeeds after the fault."""
    tid = m.run_task({"operation": "QUICK", "args": {"after": "fault"}})
    task = wait_terminal(m, tid)
    assert task["state"] == "SUCCEEDED", message_texts(task)
    assert task["result"]["args"] == {"after": "fault"}


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
def test_library(manager: Any, tmp_path: Path, fault: Fault) -> None:
    m = manager(max_workers=4, cancel_grace=CANCEL_GRACE)
    fault_animators.register(m)
    fault_animators.RAISED.clear()
    log = EventLog()
    m.subscribe(log)
    create = {"operation": fault.operation, "args": fault.args_in(tmp_path)}
    if fault.action == "refuse":
        with pytest.raises(fault.refusal) as caught:
            m.run_task(create)
        for words in fault.says:
            assert words in str(caught.value), caught.value
        if fault.refusal is InvalidArguments:
            assert caught.value.__cause__ is not None  # the original stays attached
        assert m.list_tasks() == []
        library_still_serves(m)
        return
    tid = m.run_task(create)
    watched: list[psutil.Process] = []
    if fault.action in ("cancel", "kill-starter"):
        info = wait_for(lambda: animators.ready_info(m.get_task(tid)),
                        message=lambda: f"task is {m.get_task(tid)}")
        watched = watch_tree(info)
        if fault.action == "cancel":
            m.cancel_task(tid)
            assert m.get_task(tid)["cancelRequested"] is True
        else:
            kill_starter(info, os.getpid())
    task = wait_terminal(m, tid)
    check_ended(fault, task, watched, psutil.Process(), tmp_path)
    if fault.action == "subscriber":
        # The raising subscriber saw every event, in order, and so did the next one.
        wait_for(lambda: log.of(tid) and log.of(tid)[-1]["task"]["state"] in TERMINAL)
        def raised() -> list[dict[str, Any]]:
            return [e for e in fault_animators.RAISED
                    if e["task"] and e["task"]["meta"]["id"] == tid]

        wait_for(lambda: len(raised()) == len(log.of(tid)),
                 message=lambda: f"{len(raised())} != {len(log.of(tid))}")
        assert [e["method"] for e in raised()] == [e["method"] for e in log.of(tid)]
        versions = [e["task"]["meta"]["version"] for e in raised()]
        assert versions == list(range(1, len(versions) + 1)), versions
        assert raised()[0]["method"] == "POST"
    library_still_serves(m)


# -- REST ------------------------------------------------------------------------------


def fault_server(*extra: str) -> LiveServer:
    """A server with every fault animator registered (and a raising subscriber)."""
    return LiveServer("--no-demo", "--animators", "fault_animators:register",
                      "--max-workers", "4", *extra, cwd=TESTS_DIR)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with serving(fault_server()) as live:
        yield live


def rest_create(live: LiveServer, body: dict[str, Any]) -> dict[str, Any]:
    answer = live.post(TASKS, json=body)
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def rest_task(live: LiveServer, task_id: str) -> dict[str, Any]:
    answer = live.get(f"{TASKS}/{task_id}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def rest_terminal(live: LiveServer, task_id: str) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def done() -> bool:
        last.update(rest_task(live, task_id))
        return last["state"] in TERMINAL

    wait_for(done, message=lambda: f"task is {last}\n{live.log()[-3000:]}")
    return last


def rest_still_serves(live: LiveServer) -> None:
    """The server process runs, /healthz answers 200 and a quick task succeeds."""
    assert live.proc is not None and live.proc.poll() is None, live.log()
    health = live.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    task_id = rest_create(live, {"operation": "QUICK", "args": {"after": "fault"}})["meta"]["id"]
    task = rest_terminal(live, task_id)
    assert task["state"] == "SUCCEEDED", message_texts(task)
    assert task["result"]["args"] == {"after": "fault"}


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
def test_rest(server: LiveServer, tmp_path: Path, fault: Fault) -> None:
    rest_row(server, tmp_path, fault)


def rest_row(server: LiveServer, tmp_path: Path, fault: Fault,
             kill: Callable[[dict[str, Any], int], None] = kill_starter) -> None:
    """Provoke ``fault`` on ``server`` and check what came of it (``kill``: how the
    starter of a task process is killed, given its ``ready`` info and the server's pid)."""
    assert server.proc is not None
    body = {"operation": fault.operation, "args": fault.args_in(tmp_path)}
    if fault.action == "refuse":
        before = len(server.get(TASKS).json())
        answer = server.post(TASKS, json=body)
        assert_error(answer.status_code, answer.json(), 400, *fault.says)
        assert len(server.get(TASKS).json()) == before
        rest_still_serves(server)
        return
    stream = None
    if fault.action == "subscriber":
        stream = SseClient(server.api(f"/api/v1/task-events?operation={fault.operation}"))
        assert stream.status == 200
    try:
        task_id = rest_create(server, body)["meta"]["id"]
        watched: list[psutil.Process] = []
        if fault.action in ("cancel", "kill-starter"):
            info = wait_for(lambda: animators.ready_info(rest_task(server, task_id)))
            watched = watch_tree(info)
            if fault.action == "cancel":
                answer = server.post(f"{TASKS}/{task_id}/cancel")
                assert answer.status_code == 200 and answer.json()["cancelRequested"] is True
            else:
                kill(info, server.proc.pid)
        task = rest_terminal(server, task_id)
        check_ended(fault, task, watched, psutil.Process(server.proc.pid), tmp_path)
        if stream is not None:
            # The raising subscriber in the server does not keep events from the stream.
            events = []
            for message in stream.messages():
                if "event" in message and message["data"]["task"]["meta"]["id"] == task_id:
                    events.append(message["data"])
                    if message["data"]["task"]["state"] in TERMINAL:
                        break
            versions = [e["task"]["meta"]["version"] for e in events]
            assert versions == list(range(1, len(versions) + 1)), versions
            assert events[0]["method"] == "POST" and events[-1]["task"]["state"] == "SUCCEEDED"
            # ... and the raising subscriber was called for each of them, in vain.
            for event in events:
                wait_for(lambda event=event: fault_animators.boom(event) in server.log(),
                         message=lambda: server.log()[-3000:])
    finally:
        if stream is not None:
            stream.close()
    rest_still_serves(server)


# -- the supervisor killed ---------------------------------------------------------------

#: Faulty tasks running when the supervisor is killed: each reports ``ready``.
RUNNING = [
    {"operation": "STUBBORN"},
    {"operation": "DAEMON", "args": {"mode": "wait", "pidfile": "{tmp}/daemon.pid"}},
    {"operation": "FORKER", "args": {"mode": "wait"}},
    {"operation": "COOP"},
]

EMBEDDING_SCRIPT = """
import json, sys, time
sys.path[:0] = [{tests!r}, {root!r}]
import animators, fault_animators, psutil
from supervisor import Manager, Sandbox

m = Manager(cancel_grace={grace!r}, max_workers=4,
            sandbox=Sandbox(private_pids=False) if {pids_off!r} else None)
fault_animators.register(m)
ids = [m.run_task(create) for create in json.loads({running!r})]
deadline = time.monotonic() + 30
for tid in ids:
    while animators.ready_info(m.get_task(tid)) is None:
        assert time.monotonic() < deadline, m.get_task(tid)
        time.sleep(0.01)
print(json.dumps([animators.ready_info(m.get_task(tid)) for tid in ids]), flush=True)
time.sleep(3600)
"""


def running_tasks(tmp: Path) -> list[dict[str, Any]]:
    return [json.loads(json.dumps(create).replace("{tmp}", str(tmp))) for create in RUNNING]


def gone(proc: psutil.Process) -> bool:
    """Ended; a zombie counts only if it waits for init, not for us (that would be a leak)."""
    if is_alive(proc):
        return False
    try:
        return proc.ppid() != os.getpid()
    except psutil.NoSuchProcess:
        return True


def snapshot(root: int, infos: list[dict[str, Any]]) -> list[psutil.Process]:
    """``root``, everything below it, and every pid the tasks reported."""
    procs = {root: psutil.Process(root)}
    for proc in procs[root].children(recursive=True):
        procs[proc.pid] = proc
    for info in infos:
        for pid in [info["pid"], *info.get("children", [])]:
            if pid not in procs and psutil.pid_exists(pid):
                procs[pid] = psutil.Process(pid)
    return list(procs.values())


def kill_all(procs: list[psutil.Process]) -> None:
    """Cleanup after a failure: SIGKILL whatever is still alive."""
    for proc in procs:
        if is_alive(proc):
            try:
                proc.kill()
            except psutil.Error:
                pass
    psutil.wait_procs(procs, timeout=5)


def assert_gone_within(procs: list[psutil.Process], since: float, bound: float) -> None:
    wait_for(lambda: all(gone(p) for p in procs), timeout=bound + 5,
             message=lambda: str([describe(p) for p in procs if not gone(p)]))
    elapsed = time.monotonic() - since
    assert elapsed < bound, f"processes lived {elapsed:.2f} s after the signal (bound {bound} s)"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_embedding_process_killed_leaves_nothing(tmp_path: Path, sig: int) -> None:
    """The host process dies of ``sig`` without calling terminate(): the starter cleans up."""
    script = tmp_path / "embed.py"
    script.write_text(textwrap.dedent(EMBEDDING_SCRIPT.format(
        tests=str(TESTS_DIR), root=str(ROOT), grace=CANCEL_GRACE,
        running=json.dumps(running_tasks(tmp_path)), pids_off=PRIVATE_PIDS_OFF,
    )))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    procs: list[psutil.Process] = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"the embedding script ended early with {proc.wait(TIMEOUT)}"
        procs = snapshot(proc.pid, json.loads(line))
        assert len(procs) >= 1 + 1 + 2 * len(RUNNING), [describe(p) for p in procs]
        proc.send_signal(sig)
        since = time.monotonic()
        assert proc.wait(TIMEOUT) == -sig
        assert_gone_within(procs, since, AFTERLIFE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        kill_all(procs)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_server_killed_leaves_nothing(tmp_path: Path, sig: int) -> None:
    """SIGKILL: its tree is gone within 2 s. SIGTERM: exit 0, nothing left when it exits."""
    live = fault_server()
    procs: list[psutil.Process] = []
    try:
        live.start()
        assert live.proc is not None
        ids = [rest_create(live, create)["meta"]["id"] for create in running_tasks(tmp_path)]
        infos = [wait_for(lambda tid=tid: animators.ready_info(rest_task(live, tid)))
                 for tid in ids]
        procs = snapshot(live.proc.pid, infos)
        assert len(procs) >= 1 + 1 + 2 * len(RUNNING), [describe(p) for p in procs]
        live.proc.send_signal(sig)
        since = time.monotonic()
        code = live.proc.wait(TIMEOUT)
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
            assert_gone_within(procs, since, AFTERLIFE)
        else:
            elapsed = time.monotonic() - since
            assert code == RET_OK, live.log()
            assert elapsed < CANCEL_GRACE + 2.0, f"took {elapsed:.2f} s\n{live.log()}"
            left = [describe(p) for p in procs if not gone(p)]
            assert not left, f"alive after the server exited: {left}"
    finally:
        kill_all(procs)
        live.close()


def test_the_matrix_runs_with_the_containment_asked_for(manager: Any) -> None:
    """The matrix runs twice in tox: in PID namespaces (the default as root) and
    without (HOUSEKEEPING_TEST_PRIVATE_PIDS=off); this says which one ran."""
    from supervisor.sandbox import pid_namespaces_permitted

    m = manager()
    expected = ("pid-namespace" if pid_namespaces_permitted() and not PRIVATE_PIDS_OFF
                else "subreaper")
    assert m.containment == expected
