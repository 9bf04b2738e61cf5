"""Hostile tasks: the task boundary is zero-trust, through the library and through REST.

A task's reports are claims and its exit is the truth. Each test here runs a
task that attacks the boundary on purpose (tests/hostile_animators.py, and
tests/fork_faults.py for a starter whose fork fails) and checks the fixed
behaviour: the terminal state and the words of its message, nothing of the
task's process tree alive once the task is terminal, and the supervisor still
serving within seconds (a quick task succeeds; over REST, ``/healthz`` 200).

1. a forked helper's report does not speak for its task, nor stop its timeout;
2. a raw final report does not end supervision: the process still has to
   exit (within the exit grace), and a cancel after it is not ignored;
3. a task that stops its starter: the starter is killed with its tree within
   the starter deadline, another takes over, ``terminate()`` stays quick;
4. a result that is no strict JSON (not JSON, 100,000 levels deep, NaN,
   3 MiB) is a protocol error, also when the bad frame is read only after
   the process exited; never a traceback on the loop nor a NaN served;
5. a bad frame after a good one in the same write: the good one counts;
6. a flood of 300,000 progress frames: the parent coalesces, the latest
   value shows, other tasks run;
7. a daemon that escaped both the task process and the starter dies with
   the server (``housekeeping serve`` is a child subreaper);
8. fork failures in the starter: retried with back-off, running tasks untouched.

Rows 9-11 (memory bounded by bytes, no I/O to a child under the lock,
counting without copying the table, a bounded queue by default) are in
tests/test_hostile_bounds.py.

Every deadline is bounded, so that a regression fails in seconds, not hangs.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import animators
import fork_faults
import hostile_animators
import psutil
import pytest
from conftest import (
    TERMINAL,
    TIMEOUT,
    describe,
    is_alive,
    message_texts,
    wait_for,
    wait_terminal,
)
from hostile_animators import FLOOD_LAST, MiB
from rest_support import LiveServer, serving

from rest.cli import RET_OK
from supervisor.consts import CONSTS
from supervisor.linux import PR_SET_CHILD_SUBREAPER, prctl
from supervisor.protocol import MAX_JSON_DEPTH, MAX_RESULT_BYTES

TESTS_DIR = Path(__file__).resolve().parent
TASKS = "/api/v1/tasks"
#: Room for a loaded machine on top of every documented bound.
SLACK = 4.0
#: The timeout HELPER_EXIT is registered with (hostile_animators.REGISTRY).
HELPER_TIMEOUT = 3
#: Bound of a stopped starter's life: a ping may go out up to one interval late.
STARTER_BOUND = CONSTS.starter_deadline + CONSTS.starter_ping_interval + SLACK
#: How long terminate() may take once a stopped starter was dealt with.
TERMINATE_BOUND = 10.0
#: Progress versions the parent may apply per second and task.
PROGRESS_RATE = 1 / CONSTS.progress_interval
FLOOD_FRAMES = 300_000


# -- helpers ---------------------------------------------------------------------------


def hostile_manager(manager: Any, **kwargs: Any) -> Any:
    """A Manager (from conftest's factory) with every hostile operation registered."""
    kwargs.setdefault("max_workers", 4)
    m = manager(**kwargs)
    hostile_animators.register(m)
    return m


def ready(m: Any, task_id: str) -> dict[str, Any]:
    """Wait for the task's ``ready`` message; return its payload (host pids)."""
    return wait_for(lambda: animators.ready_info(m.get_task(task_id)),  # type: ignore[no-any-return]
                    message=lambda: f"task is {m.get_task(task_id)}")


def watch(info: dict[str, Any]) -> list[psutil.Process]:
    """The task process, the children it announced, and everything below them now.

    psutil.Process objects know their process by pid and start time, so a
    reused pid does not count as the tree still alive.
    """
    procs: list[psutil.Process] = []
    for pid in [info["pid"], *info.get("children", [])]:
        try:
            proc = psutil.Process(pid)
            procs.append(proc)
            procs.extend(proc.children(recursive=True))
        except psutil.Error:
            continue
    return procs


def tree_left(watched: list[psutil.Process]) -> list[str]:
    """What of a watched tree is alive (a zombie has ended)."""
    return [describe(p) for p in watched if is_alive(p)]


def joined(task: dict[str, Any]) -> str:
    """The task's messages in one string, for ``in`` checks and failure output."""
    return "\n".join(message_texts(task))


def assert_ended(task: dict[str, Any], state: str, *words: str) -> None:
    """The task is ``state`` and its messages hold every one of ``words``."""
    text = joined(task)
    assert task["state"] == state, f"{task['state']}, not {state}:\n{text}"
    for fragment in words:
        assert fragment in text, f"{fragment!r} not in:\n{text}"
    if state != "SUCCEEDED":
        assert task.get("result") is None, task


def library_still_serves(m: Any) -> None:
    """A quick task succeeds after the attack."""
    tid = m.run_task({"operation": "QUICK", "args": {"after": "attack"}})
    task = wait_terminal(m, tid, timeout=SLACK * 2)
    assert task["state"] == "SUCCEEDED", joined(task)
    assert task["result"]["args"] == {"after": "attack"}


def starters(parent: int) -> list[psutil.Process]:
    """The live starter processes that are children of ``parent``."""
    found = []
    for proc in psutil.Process(parent).children():
        with contextlib.suppress(psutil.Error):
            if is_alive(proc) and "workers.starter" in " ".join(proc.cmdline()):
                found.append(proc)
    return found


def resume(proc: psutil.Process) -> None:
    """SIGCONT a process if it is still the one we know (cleanup after a failure)."""
    with contextlib.suppress(psutil.Error):
        if is_alive(proc):
            proc.resume()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not strict JSON")


def strict_json(text: str) -> Any:
    """Parse ``text`` as strict JSON: ``NaN``, ``Infinity`` and ``-Infinity`` fail."""
    return json.loads(text, parse_constant=_refuse_constant)


def loop_tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records that carry a traceback: an exception escaped somewhere on the loop."""
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records
            if r.exc_info or r.name == "asyncio"]


# -- 1. a forked helper does not speak for its task ------------------------------------------


def test_helper_exit_is_not_the_outcome(manager: Any) -> None:
    """A helper forked inside ``execute`` that ends with ``sys.exit(0)`` sends no
    report (the task pipe is closed in forked children), so the task's timeout
    still decides: FAILED "timed out after 3 s", tree gone."""
    m = hostile_manager(manager)
    tid = m.run_task({"operation": "HELPER_EXIT"})
    watched = watch(ready(m, tid))
    task = wait_terminal(m, tid, timeout=HELPER_TIMEOUT + SLACK)
    assert_ended(task, "FAILED", f"timed out after {HELPER_TIMEOUT} s")
    assert "SystemExit" not in joined(task), joined(task)
    assert not tree_left(watched), tree_left(watched)
    library_still_serves(m)


# -- 2. a raw final report does not end supervision ------------------------------------------


@pytest.mark.parametrize("cancel", [False, True], ids=["then-linger", "then-cancel"])
def test_raw_final_report_does_not_end_supervision(manager: Any, cancel: bool) -> None:
    """``Finished("SUCCEEDED")`` written raw, then the process (SIGTERM ignored) and a
    child linger: the report still decides the outcome, but the tree is killed
    ``exit_grace`` after it -- or sooner, after the cancel grace, when canceled."""
    grace = 0.1
    m = hostile_manager(manager, cancel_grace=grace)
    tid = m.run_task({"operation": "RAW_FINISHED"})
    info = ready(m, tid)  # the note came in the same write as the report
    since = time.monotonic()
    watched = watch(info)
    if cancel:
        m.cancel_task(tid)
    task = wait_terminal(m, tid, timeout=CONSTS.exit_grace + SLACK)
    elapsed = time.monotonic() - since
    killed_after = (f"killed after cancel grace period ({grace:g} s)" if cancel
                    else f"had not exited {CONSTS.exit_grace:g} s after it")
    assert_ended(task, "SUCCEEDED", "process tree killed after the final report", killed_after)
    assert task["result"] == {"raw": True}
    assert elapsed < CONSTS.exit_grace + SLACK, f"ended {elapsed:.2f} s after the report"
    assert not tree_left(watched), tree_left(watched)
    library_still_serves(m)


# -- 3. a task stops its starter --------------------------------------------------------------


def test_stopped_starter_is_replaced(manager: Any) -> None:
    """SIGSTOP on the starter: within the starter deadline it is killed with its
    tree, the task FAILED naming it, a new starter serves, terminate() is quick."""
    m = hostile_manager(manager)
    tid = m.run_task({"operation": "STOP_STARTER"})
    info = ready(m, tid)
    starter = psutil.Process(info["starter"])
    assert starter.ppid() == os.getpid(), describe(starter)
    watched = [starter, *watch(info)]
    try:
        task = wait_terminal(m, tid, timeout=STARTER_BOUND)
        assert_ended(task, "FAILED",
                     f"the starter process {starter.pid} did not answer for "
                     f"{CONSTS.starter_deadline:g} s (stopped or hung)",
                     "killed with every task process tree")
        assert not tree_left(watched), tree_left(watched)
        library_still_serves(m)
        now = starters(os.getpid())
        assert len(now) == 1 and now[0].pid != starter.pid, [describe(p) for p in now]
        since = time.monotonic()
        m.terminate()
        elapsed = time.monotonic() - since
        assert elapsed < TERMINATE_BOUND, f"terminate() took {elapsed:.1f} s"
    finally:
        resume(starter)


# -- 4. results that are no strict JSON -------------------------------------------------------

#: kind of bad result_json -> words of the protocol error it must cause.
BAD_RESULTS = {
    "not-json": ("result is not strict JSON",),
    "deep": (f"result nested more than {MAX_JSON_DEPTH} levels deep",),
    "nan": ("result is not strict JSON", "NaN is not a JSON number"),
    "huge": (f"result of {3 * MiB} characters (limit {MAX_RESULT_BYTES})",),
    "overflow": ("result is not strict JSON", "number 1e400 is out of range"),
    "escaped": ("once escaped", f"(limit {MAX_RESULT_BYTES})"),
    "fieldless": ("bad Finished: AttributeError",),
}


def result_ended(task: dict[str, Any], kind: str) -> None:
    """The task FAILED with the protocol error of ``kind``, and nothing else counted."""
    assert_ended(task, "FAILED", "protocol error", *BAD_RESULTS[kind])
    assert animators.ready_info(task) is not None, "the note before the frame was lost"


#: Valid Progress frames before the bad one when the task exits at once: with
#: the pipe's send buffer widened, the parent reads the bad frame only after
#: the process is gone (in the drain after its pidfd fired).
EXIT_PADDING = 20_000


@pytest.mark.parametrize("then", ["linger", "return", "exit"])
@pytest.mark.parametrize("kind", list(BAD_RESULTS))
def test_result_that_is_no_strict_json(manager: Any, caplog: pytest.LogCaptureFixture,
                                       tmp_path: Path, kind: str, then: str) -> None:
    """A raw ``Finished`` whose ``result_json`` is bad is a protocol error (FAILED),
    whether the process lingers, returns (its real report following) or exits at
    once, the bad frame read only after its exit; the loop logs no traceback and
    the manager keeps serving."""
    caplog.set_level(logging.WARNING)
    m = hostile_manager(manager)
    infofile = tmp_path / "info.json"
    args = {"kind": kind, "then": then, "infofile": str(infofile),
            "padding": EXIT_PADDING if then == "exit" else 0}
    tid = m.run_task({"operation": "RAW_RESULT", "args": args})
    info = wait_for(lambda: infofile.exists() and json.loads(infofile.read_text() or "null"))
    watched = watch(info)
    task = wait_terminal(m, tid, timeout=SLACK * 2)
    result_ended(task, kind)
    assert not tree_left(watched), tree_left(watched)
    library_still_serves(m)
    strict_json(json.dumps(m.list_tasks(), allow_nan=False))
    assert not loop_tracebacks(caplog), loop_tracebacks(caplog)


def test_a_result_with_line_breaks_is_kept_on_one_line(manager: Any, tmp_path: Path) -> None:
    """A raw result that is valid JSON with line breaks between its tokens: SUCCEEDED,
    and the JSON served (spliced into event-stream lines) has no line break."""
    m = hostile_manager(manager)
    events: list[Any] = []
    m.subscribe_changes(events.append)
    args = {"kind": "lines", "then": "return", "infofile": str(tmp_path / "info.json")}
    tid = m.run_task({"operation": "RAW_RESULT", "args": args})
    task = wait_terminal(m, tid, timeout=SLACK * 2)
    assert task["state"] == "SUCCEEDED" and task["result"] == {"a": 1, "event": "x"}, task
    document = m.get_snapshot(tid).json()
    assert b"\n" not in document and b"\r" not in document, document
    wait_for(lambda: events and events[-1].task.state == "SUCCEEDED")
    assert all(b"\n" not in event.json() for event in events)


# -- 5. a bad frame after a good one ------------------------------------------------------------


@pytest.mark.parametrize("stamp", ["nan", "huge"])
def test_nan_progress_after_a_note_in_one_write(manager: Any, tmp_path: Path,
                                                stamp: str) -> None:
    """A Note and a Progress stamped NaN (or 10**400) in one ``os.write``: FAILED
    "protocol error", the Note kept, the progress never applied."""
    m = hostile_manager(manager)
    infofile = tmp_path / "info.json"
    tid = m.run_task({"operation": "NAN_PROGRESS",
                      "args": {"infofile": str(infofile), "stamp": stamp}})
    info = wait_for(lambda: infofile.exists() and json.loads(infofile.read_text() or "null"))
    watched = watch(info)
    task = wait_terminal(m, tid, timeout=SLACK * 2)
    assert_ended(task, "FAILED", "protocol error", "timestamp", "is out of range")
    assert animators.ready_info(task) == info, f"the note was lost: {joined(task)}"
    assert task.get("progress") is None, task.get("progress")
    assert not tree_left(watched), tree_left(watched)
    library_still_serves(m)


# -- 6. a flood of progress frames -----------------------------------------------------------


@pytest.mark.parametrize("what", ["progress", "notes"])
def test_progress_flood_is_coalesced(manager: Any, what: str) -> None:
    """300,000 raw Progress (or Note) frames: the task's version grows by at most
    ``1 / progress_interval`` per second (plus a few other changes), the last
    value shows while the task runs, and another task runs meanwhile."""
    m = hostile_manager(manager)
    since = time.monotonic()
    tid = m.run_task({"operation": "FLOOD", "args": {"frames": FLOOD_FRAMES, "what": what}})
    watched = watch(ready(m, tid))
    library_still_serves(m)  # while the flood goes on (or just after it)

    def latest() -> dict[str, Any] | None:
        task = m.get_task(tid)
        shown = (task.get("progress") or {}).get("offsetBytes") == FLOOD_LAST
        return task if (shown or what == "notes") and "flooded" in joined(task) else None

    task = wait_for(latest, message=lambda: str(m.get_task(tid)["progress"]))
    elapsed = time.monotonic() - since
    assert task["state"] == "ACTIVE", joined(task)
    assert task["progress"]["percentComplete"] == 100, task["progress"]
    if what == "notes":  # the newest notes are kept, in order
        texts = message_texts(task)
        assert texts[-3:-1] == [f"note {FLOOD_FRAMES - 2}", f"note {FLOOD_FRAMES - 1}"], texts
    version = task["meta"]["version"]
    bound = PROGRESS_RATE * elapsed + 20
    assert version <= bound, f"version {version} after {elapsed:.1f} s (bound {bound:.0f})"
    flooded = json.loads(next(t for t in message_texts(task) if t.startswith("flooded "))[8:])
    assert flooded["frames"] == FLOOD_FRAMES, flooded
    m.cancel_task(tid)
    assert_ended(wait_terminal(m, tid, timeout=SLACK * 2), "CANCELED",
                 "the animator honoured the cancel")
    assert not tree_left(watched), tree_left(watched)


# -- 8. fork failures in the starter ---------------------------------------------------------


def test_fork_failures_in_the_starter_are_retried(
    manager: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The starter's fork() fails with EAGAIN three times (injected, see fork_faults)
    while task A runs: new tasks still succeed (retried with back-off), A is
    untouched (same starter, still ACTIVE) and cancels normally."""
    caplog.set_level(logging.WARNING, logger="housekeeping.supervisor")
    counter = tmp_path / "fork-failures"
    counter.write_text("0")
    monkeypatch.setenv(fork_faults.COUNTER_ENV, str(counter))
    monkeypatch.setenv(fork_faults.EXEMPT_ENV, str(os.getpid()))
    m = hostile_manager(manager)  # the starter inherits the environment above
    m.register_animator("FORKED", fork_faults.Forked())  # the starter imports fork_faults
    a = m.run_task({"operation": "PATIENT"})
    info = ready(m, a)
    starter = psutil.Process(info["ppid"])
    watched = watch(info)
    failures = 3
    counter.write_text(str(failures))
    # More tasks than warm processes: some wait for forks, which fail first.
    ids = [m.run_task({"operation": "FORKED"}) for _ in range(CONSTS.warm_processes + 2)]
    for tid in ids:
        task = wait_terminal(m, tid, timeout=TIMEOUT)
        assert task["state"] == "SUCCEEDED", joined(task)
        assert task["result"] == {"forked": True}
    wait_for(lambda: counter.read_text() == "0", timeout=SLACK * 2,
             message=lambda: f"{counter.read_text()} injected failures left")
    assert m.get_task(a)["state"] == "ACTIVE", joined(m.get_task(a))
    assert is_alive(starter) and starters(os.getpid()) == [starter], describe(starter)
    refused = [r.getMessage() for r in caplog.records
               if "could not fork a task process" in r.getMessage()]
    assert len(refused) == failures and all("injected" in r for r in refused), refused
    m.cancel_task(a)
    assert_ended(wait_terminal(m, a), "CANCELED")
    assert not tree_left(watched), tree_left(watched)
    library_still_serves(m)


# -- REST ---------------------------------------------------------------------------------------


def hostile_server(*extra: str) -> LiveServer:
    """A server with every hostile animator registered, default flags otherwise."""
    return LiveServer("--no-demo", "--animators", "hostile_animators:register", *extra,
                      cwd=TESTS_DIR)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with serving(hostile_server("--max-workers", "4")) as live:
        yield live


def rest_create(live: LiveServer, body: dict[str, Any]) -> str:
    answer = live.post(TASKS, json=body)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["meta"]["id"])


def rest_task(live: LiveServer, task_id: str) -> dict[str, Any]:
    answer = live.get(f"{TASKS}/{task_id}")
    assert answer.status_code == 200, answer.text
    return dict(strict_json(answer.text))


def rest_terminal(live: LiveServer, task_id: str, timeout: float) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def done() -> bool:
        last.update(rest_task(live, task_id))
        return last["state"] in TERMINAL

    wait_for(done, timeout=timeout, message=lambda: f"task is {last}\n{live.log()[-3000:]}")
    return last


def rest_still_serves(live: LiveServer) -> None:
    """The server runs, /healthz answers 200 and a quick task succeeds."""
    assert live.proc is not None and live.proc.poll() is None, live.log()
    health = live.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    task_id = rest_create(live, {"operation": "QUICK", "args": {"after": "attack"}})
    task = rest_terminal(live, task_id, timeout=SLACK * 2)
    assert task["state"] == "SUCCEEDED", joined(task)


@pytest.mark.slow
def test_rest_stopped_starter_is_replaced(server: LiveServer) -> None:
    """Row 3 through a real server: the task FAILED naming its starter, which is gone."""
    assert server.proc is not None
    tid = rest_create(server, {"operation": "STOP_STARTER"})
    info = wait_for(lambda: animators.ready_info(rest_task(server, tid)))
    starter = psutil.Process(info["starter"])
    assert starter.ppid() == server.proc.pid, describe(starter)
    watched = [starter, *watch(info)]
    try:
        task = rest_terminal(server, tid, timeout=STARTER_BOUND)
        assert_ended(task, "FAILED", f"the starter process {starter.pid} did not answer for "
                     f"{CONSTS.starter_deadline:g} s (stopped or hung)")
        assert not tree_left(watched), tree_left(watched)
        rest_still_serves(server)
        now = starters(server.proc.pid)
        assert len(now) == 1 and now[0].pid != starter.pid, [describe(p) for p in now]
    finally:
        resume(starter)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(BAD_RESULTS))
def test_rest_result_that_is_no_strict_json(server: LiveServer, tmp_path: Path,
                                            kind: str) -> None:
    """Row 4 through a real server: FAILED "protocol error", the task list stays
    strict JSON, and the server logged no traceback."""
    logged = len(server.log())
    infofile = tmp_path / "info.json"
    tid = rest_create(server, {"operation": "RAW_RESULT",
                               "args": {"kind": kind, "infofile": str(infofile)}})
    info = wait_for(lambda: infofile.exists() and json.loads(infofile.read_text() or "null"))
    watched = watch(info)
    task = rest_terminal(server, tid, timeout=SLACK * 2)
    result_ended(task, kind)
    assert not tree_left(watched), tree_left(watched)
    listing = server.get(TASKS)
    assert listing.status_code == 200, listing.text
    assert tid in [t["meta"]["id"] for t in strict_json(listing.text)]
    rest_still_serves(server)
    assert "Traceback" not in server.log()[logged:], server.log()[logged:]


# -- 7. a daemon that escaped both subreapers -----------------------------------------------

PR_GET_CHILD_SUBREAPER = 37


@contextlib.contextmanager
def catching_escapees() -> Iterator[None]:
    """Make the test process a child subreaper for the duration.

    If the server fails to catch an escaped daemon, the daemon is re-parented
    here rather than to the machine's init, where this test kills it.
    """
    was = ctypes.c_int(0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_GET_CHILD_SUBREAPER)")
    ours = {p.pid for p in psutil.Process().children()}
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        yield
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, was.value)
        for proc in psutil.Process().children():  # adopted orphans that already ended
            with contextlib.suppress(psutil.Error, ChildProcessError):
                if proc.pid not in ours and proc.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(proc.pid, os.WNOHANG)


def kill_escapee(pidfile: Path, since: float) -> None:
    """Cleanup after a failure: SIGKILL the daemon if it still runs (checked to be ours:
    started during the test, a fork of a starter) and reap it if it is our child."""
    with contextlib.suppress(OSError, ValueError, psutil.Error):
        proc = psutil.Process(int(pidfile.read_text()))
        if (is_alive(proc) and proc.create_time() >= since - 1
                and "workers.starter" in " ".join(proc.cmdline())):
            proc.kill()
            psutil.wait_procs([proc], timeout=5)


def _ready_or_ended(live: LiveServer, task_id: str) -> dict[str, Any] | None:
    """The task's ready info (with its ``state``), or the task once it ended."""
    task = rest_task(live, task_id)
    if task["state"] in TERMINAL:
        return task
    info = animators.ready_info(task)
    return None if info is None else {**info, "state": task["state"]}


#: Tries of the escape scenario before the test gives up on it (see the NOTE in it).
ESCAPE_ATTEMPTS = 5


@pytest.mark.slow
def test_rest_daemon_that_escaped_the_starter_dies_with_the_server(tmp_path: Path) -> None:
    """The task turns its own subreaper off, leaves a setsid double-forked daemon
    (re-parented to the starter), and SIGKILLs the starter: the daemon goes up
    to the server, a child subreaper by default, and is gone once it stopped."""
    pidfile = tmp_path / "daemon.pid"
    since = time.time()
    live = hostile_server()
    with catching_escapees():
        try:
            live.start()
            # NOTE: the starter kills an orphan like this daemon whenever one of its
            # own children exits, as warm processes replaced after the server's
            # registrations do in its first moments: then the daemon is gone
            # before it can escape any further, and the task is tried again.
            rest_still_serves(live)  # NOTE: past those first moments, most often
            for attempt in range(ESCAPE_ATTEMPTS):
                gate = tmp_path / f"gate-{attempt}"
                tid = rest_create(live, {"operation": "ESCAPE",
                                         "args": {"pidfile": str(pidfile), "gate": str(gate)}})
                info = wait_for(lambda: _ready_or_ended(live, tid),  # noqa: B023
                                timeout=TIMEOUT * 2)  # NOTE: the daemon's pid file waits 30 s
                if info["state"] not in TERMINAL:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        daemon = psutil.Process(info["children"][0])
                        if is_alive(daemon):
                            break
                    assert live.post(f"{TASKS}/{tid}/cancel").status_code == 200
                    assert rest_terminal(live, tid, timeout=SLACK * 2)["state"] == "CANCELED"
                pidfile.unlink(missing_ok=True)
            else:
                raise AssertionError(f"the starter killed the daemon {ESCAPE_ATTEMPTS} "
                                     f"times in a row:\n{live.log()}")
            assert os.getsid(daemon.pid) != os.getsid(info["pid"]), "no session of its own"
            assert daemon.ppid() == info["starter"], describe(daemon)  # escaped its task
            gate.touch()  # now the task kills its starter
            task = rest_terminal(live, tid, timeout=SLACK * 2)
            assert_ended(task, "FAILED", "the starter process died")
            rest_still_serves(live)
            assert live.stop() == RET_OK, live.log()
            assert not is_alive(daemon), f"alive after the server stopped: {describe(daemon)}"
        finally:
            kill_escapee(pidfile, since)
            live.close()
