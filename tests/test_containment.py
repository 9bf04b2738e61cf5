"""Containment by the kernel: ``supervisor.Sandbox`` and what a task can no longer do.

Real task processes, as root (CI runs as root). Where this machine may not
make namespaces or change users, the tests that need it are skipped with the
reason shown. The animators that signal check first that they are sandboxed
(see ``containment_animators``).
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import containment_animators as ca
import psutil
import pytest
from conftest import TIMEOUT, message_texts, pids_gone, wait_for, wait_terminal

from supervisor import InvalidAnimator, Sandbox
from supervisor.sandbox import pid_namespaces_permitted

NAMESPACES = pid_namespaces_permitted()
needs_namespaces = pytest.mark.skipif(
    not NAMESPACES, reason="this process may not make PID namespaces (needs root with "
                           "CAP_SYS_ADMIN)")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing users needs root")
DYNAMIC = Sandbox(user="dynamic")


def run(m: Any, operation: str, **args: Any) -> dict[str, Any]:
    """Run one task to its end; return it."""
    return wait_terminal(m, m.run_task({"operation": operation, "args": args}))


def result_of(m: Any, operation: str, **args: Any) -> dict[str, Any]:
    task = run(m, operation, **args)
    assert task["state"] == "SUCCEEDED", message_texts(task)
    return task["result"]  # type: ignore[no-any-return]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may write (a task under ``user=`` cannot enter tmp_path)."""
    path = Path(tempfile.mkdtemp(prefix="housekeeping-containment-"))
    path.chmod(stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO | stat.S_ISVTX)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


# -- the PID namespace ------------------------------------------------------------------


@needs_namespaces
def test_the_default_puts_each_task_in_a_pid_namespace_of_its_own(manager: Any) -> None:
    m = manager()
    assert m.sandbox.private_pids is True and m.containment == "pid-namespace"
    m.register_animator("ID", ca.Identity())
    first, second = result_of(m, "ID"), result_of(m, "ID")
    for seen in (first, second):
        assert len(seen["nspid"]) == 2, seen
        assert seen["nspid"][0] == seen["host_pid"] and seen["pid"] == seen["nspid"][1]
        # NOTE: not PID 1: the init in front of it is (it keeps ordinary signals)
        assert seen["pid"] >= 2 and seen["ppid"] == 1, seen
        assert seen["no_new_privs"] == "1"
    assert first["host_pid"] != second["host_pid"]


def test_without_private_pids_the_task_shares_the_host_namespace(manager: Any) -> None:
    m = manager(sandbox=Sandbox(private_pids=False))
    assert m.containment == "subreaper"
    m.register_animator("ID", ca.Identity())
    seen = result_of(m, "ID")
    assert len(seen["nspid"]) == 1 and seen["pid"] == seen["host_pid"], seen
    assert seen["no_new_privs"] == "0"  # no sandbox at all: nothing changed


@needs_namespaces
def test_the_supervisor_cannot_be_signalled_from_a_pid_namespace(manager: Any) -> None:
    m = manager()
    m.register_animator("KILL", ca.KillSupervisor())
    seen = result_of(m, "KILL", pid=os.getpid())
    assert seen == {"error": "ProcessLookupError"}
    assert psutil.Process().is_running()


@needs_root
def test_the_supervisor_cannot_be_signalled_by_another_user(manager: Any) -> None:
    m = manager(sandbox=Sandbox(private_pids=False, user="dynamic"))
    m.register_animator("KILL", ca.KillSupervisor())
    seen = result_of(m, "KILL", pid=os.getpid())
    assert seen == {"error": "PermissionError"}


@needs_namespaces
@needs_root
def test_a_task_that_signals_all_it_can_see_harms_nobody(manager: Any) -> None:
    """SIGSTOP and SIGKILL to its parent and every pid in /proc, as a dynamic user in a
    PID namespace: the other task, the starter and the supervisor go on."""
    m = manager(max_workers=2, sandbox=Sandbox(user="dynamic"))
    m.register_animator("PATIENT", ca.Patient())
    m.register_animator("EVERYTHING", ca.KillEverything())
    patient = m.run_task({"operation": "PATIENT"})
    wait_for(lambda: any(t.startswith("ready ") for t in message_texts(m.get_task(patient))))
    starters = [p for p in psutil.Process().children()
                if "workers.starter" in " ".join(p.cmdline())]
    seen = result_of(m, "EVERYTHING")
    assert "refused" not in seen, seen
    assert seen.get("sent", 0) <= 4, seen  # at most its init and itself-adjacent: none harmed
    assert seen["targets"] > 10, seen
    for proc in [psutil.Process(), *starters]:
        assert proc.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE)
    assert m.get_task(patient)["state"] == "ACTIVE"
    m.cancel_task(patient)
    assert wait_terminal(m, patient)["state"] == "CANCELED"
    assert result_of(m, "EVERYTHING")["targets"] > 10  # the supervisor still serves


@needs_namespaces
def test_nothing_of_the_tree_survives_a_task_that_escaped_its_subreaper(
        manager: Any, tmp_path: Path) -> None:
    """Subreaper off, a setsid double-forked daemon, return: the daemon dies with the
    namespace, with the library's default subreaper=False."""
    m = manager()
    assert m.subreaper is False
    m.register_animator("ESCAPE", ca.EscapeAndExit())
    pidfile = tmp_path / "daemon.pid"
    seen = result_of(m, "ESCAPE", pidfile=str(pidfile))
    daemon = seen["daemon"]
    assert daemon == int(pidfile.read_text())
    wait_for(lambda: pids_gone(daemon), message=f"daemon {daemon} outlived its task")


@needs_namespaces
def test_an_init_that_does_not_report_does_not_hold_the_task(
        manager: Any, tmp_path: Path) -> None:
    """The init of a running task is SIGSTOPped (from outside: a task cannot), so the
    namespace is never reported empty: 2 s after the task process exited the
    supervisor SIGKILLs the init, the kernel kills the namespace, the task ends."""
    m = manager()
    m.register_animator("GATE", ca.ReportInitThenWait())
    gate = tmp_path / "gate"
    task_id = m.run_task({"operation": "GATE", "args": {"gate": str(gate)}})
    ready = wait_for(lambda: next((t for t in message_texts(m.get_task(task_id))
                                   if t.startswith("ready ")), None))
    init = psutil.Process(int(ready.split()[1]))
    with open(f"/proc/{init.pid}/status") as f:
        assert next(line for line in f if line.startswith("NSpid:")).split()[-1] == "1"
    init.send_signal(signal.SIGSTOP)
    try:
        gate.touch()
        task = wait_terminal(m, task_id)
        assert task["state"] == "SUCCEEDED", message_texts(task)
        wait_for(lambda: pids_gone(init.pid))
    finally:
        if pids_gone(init.pid) is False:
            init.send_signal(signal.SIGCONT)
    assert run(m, "GATE", gate=str(gate))["state"] == "SUCCEEDED"  # a fresh init


@needs_namespaces
@needs_root
def test_a_root_task_in_a_sandbox_has_no_capabilities(manager: Any) -> None:
    """Without user=, a sandboxed task stays uid 0 but loses every capability: it cannot
    read the supervisor's memory or environment, enter its network namespace, or
    ptrace its init."""
    m = manager(sandbox=Sandbox(private_network=True))
    m.register_animator("ROOT", ca.RootProbe())
    seen = result_of(m, "ROOT", pid=os.getpid())
    assert seen == {"euid": 0, "cap_eff": "0000000000000000", "cap_bnd": "0000000000000000",
                    "mem": "PermissionError", "netns": "PermissionError",
                    "environ": "PermissionError", "ptrace_init": "EPERM"}


@pytest.mark.parametrize("private_pids", [True, False] if NAMESPACES else [False])
def test_a_task_process_holds_no_descriptor_of_the_supervisor(
        manager: Any, private_pids: bool) -> None:
    """Only its pipe and the standard streams: nothing of the starter (its epoll
    instance, its sockets) or of an init reaches the task."""
    m = manager(sandbox=Sandbox(private_pids=private_pids))
    m.register_animator("FDS", ca.Descriptors())
    seen = result_of(m, "FDS")
    assert set(seen["fds"]) == {"0", "1", "2", str(seen["pipe"])}, seen


@needs_namespaces
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV, signal.SIGTERM])
def test_a_task_that_signals_itself_dies_of_it(manager: Any, sig: int) -> None:
    m = manager()
    m.register_animator("SELF", ca.KillSelf())
    task = run(m, "SELF", signal=int(sig))
    assert task["state"] == "FAILED"
    texts = " ".join(message_texts(task))
    if sig == signal.SIGTERM:  # the task's own handler turns it into a report
        assert "terminated by SIGTERM" in texts, texts
    else:
        assert f"was killed by {signal.Signals(sig).name}" in texts, texts


# -- users --------------------------------------------------------------------------------


@needs_root
def test_dynamic_users_give_each_running_task_a_uid_of_its_own(manager: Any) -> None:
    m = manager(max_workers=2, sandbox=DYNAMIC, uid_range=(62000, 62001))
    m.register_animator("PATIENT", ca.Patient())
    m.register_animator("ID", ca.Identity())
    patient = m.run_task({"operation": "PATIENT"})
    wait_for(lambda: any(t.startswith("ready ") for t in message_texts(m.get_task(patient))))
    pid = int(next(t for t in message_texts(m.get_task(patient)) if t.startswith("ready "))[6:])
    held = psutil.Process(pid).uids().real
    seen = result_of(m, "ID")
    assert {held, seen["uid"]} == {62000, 62001}
    assert seen["uid"] == seen["euid"] == seen["gid"] and seen["groups"] == [], seen
    # NOTE: with the range used up, the next task waits for a uid to come back
    waiting = m.run_task({"operation": "ID"})
    m.cancel_task(patient)
    assert wait_terminal(m, patient)["state"] == "CANCELED"
    assert wait_terminal(m, waiting)["result"]["uid"] in {62000, 62001}


@needs_root
def test_a_named_user_runs_the_task(manager: Any) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    m = manager(sandbox=Sandbox(user="nobody"))
    m.register_animator("ID", ca.Identity())
    seen = result_of(m, "ID")
    assert (seen["uid"], seen["gid"], seen["groups"]) == (nobody.pw_uid, nobody.pw_gid, [])


@needs_root
def test_max_processes_refuses_the_process_after_the_limit(manager: Any) -> None:
    m = manager(sandbox=Sandbox(user="dynamic", max_processes=5))
    m.register_animator("FORK", ca.ForkUntilRefused())
    seen = result_of(m, "FORK")
    # the task process itself is one of the five
    assert seen == {"forked": 4, "error": "BlockingIOError"}


def test_a_sandbox_the_machine_cannot_give_is_refused_at_registration(manager: Any) -> None:
    m = manager()
    with pytest.raises(InvalidAnimator, match="max_processes needs a non-root user"):
        m.register_animator("FORK", ca.ForkUntilRefused(), sandbox=Sandbox(max_processes=5))
    with pytest.raises(InvalidAnimator, match="no such user"):
        m.register_animator("ID", ca.Identity(), sandbox=Sandbox(user="no-such-user-here"))
    if os.geteuid() != 0:
        with pytest.raises(InvalidAnimator, match="must run as root"):
            m.register_animator("ID", ca.Identity(), sandbox=DYNAMIC)
    assert m.registered_operations() == []
    for bad in ({"max_cpu_seconds": float("nan")}, {"max_open_files": 0}, {"user": -1},
                {"user": True}):
        with pytest.raises((ValueError, TypeError)):
            Sandbox(**bad)


# -- network, CPU, files ---------------------------------------------------------------


@needs_namespaces
def test_a_private_network_has_only_loopback_and_reaches_nothing(manager: Any) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        accepted = threading.Thread(target=_greet, args=(listener,), daemon=True)
        accepted.start()
        m = manager()
        m.register_animator("CONNECT", ca.Connect())
        m.register_animator("PRIVATE", ca.Connect(), sandbox=Sandbox(private_network=True))
        m.register_animator("ID", ca.Identity(), sandbox=Sandbox(private_network=True))
        # the control: without a private network the task reaches the listener
        assert result_of(m, "CONNECT", port=port) == {"connected": True, "greeting": "hello"}
        seen = result_of(m, "PRIVATE", port=port)
        assert seen["connected"] is False and seen["error"] == "ConnectionRefusedError", seen
        assert result_of(m, "ID")["interfaces"] == ["lo"]


def _greet(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.sendall(b"hello")


@pytest.mark.parametrize("private_pids", [True, False] if NAMESPACES else [False])
def test_the_cpu_limit_fails_the_task(manager: Any, private_pids: bool) -> None:
    m = manager(sandbox=Sandbox(private_pids=private_pids, max_cpu_seconds=1))
    m.register_animator("BURN", ca.BurnCpu())
    task = run(m, "BURN", seconds=TIMEOUT)
    assert task["state"] == "FAILED"
    assert "CPU time limit exceeded (1 s)" in message_texts(task), message_texts(task)


def test_max_open_files_bounds_the_descriptors(manager: Any) -> None:
    m = manager(sandbox=Sandbox(max_open_files=64))
    m.register_animator("OPEN", ca.OpenUntilRefused())
    seen = result_of(m, "OPEN")
    assert seen["error"] == "EMFILE" and seen["highest"] == 63, seen


# -- where it is shown ------------------------------------------------------------------


@needs_root
def test_operations_show_the_sandbox_in_effect(manager: Any) -> None:
    m = manager(sandbox=Sandbox(max_open_files=100))
    m.register_animator("A", ca.Identity())
    m.register_animator("B", ca.Identity(), timeout=5, max_memory=1 << 30,
                        sandbox=Sandbox(private_pids=False, user="dynamic", max_processes=8,
                                        max_cpu_seconds=2.5))
    a, b = m.operations()
    assert a == {"operation": "A", "timeout": None, "maxMemory": None, "sandbox": {
        "privatePids": NAMESPACES, "privateNetwork": False, "user": None,
        "maxProcesses": None, "maxCpuSeconds": None, "maxOpenFiles": 100}}
    assert b == {"operation": "B", "timeout": 5, "maxMemory": 1 << 30, "sandbox": {
        "privatePids": False, "privateNetwork": False, "user": "dynamic",
        "maxProcesses": 8, "maxCpuSeconds": 2.5, "maxOpenFiles": None}}


@needs_root
@pytest.mark.parametrize("private_pids", [True, False] if NAMESPACES else [False])
def test_a_dynamic_users_daemon_dies_with_its_tree(
        manager: Any, shared_dir: Path, private_pids: bool) -> None:
    """Under user="dynamic" (it can write only where anyone may), a daemon left behind
    is killed before the uid goes back to the pool; the next task gets it again."""
    m = manager(max_workers=1, sandbox=Sandbox(private_pids=private_pids, user="dynamic"),
                uid_range=(62010, 62010))
    m.register_animator("ESCAPE", ca.EscapeAndExit())
    m.register_animator("ID", ca.Identity())
    seen = result_of(m, "ESCAPE", pidfile=str(shared_dir / "daemon.pid"))
    wait_for(lambda: pids_gone(seen["daemon"]))
    assert result_of(m, "ID")["uid"] == 62010


@pytest.mark.parametrize("sandbox", [Sandbox(private_pids=False, max_open_files=1024),
                                     Sandbox(private_pids=False, user="dynamic")],
                         ids=["rlimit", "dynamic"])
def test_a_sandboxed_task_keeps_only_an_allowlist_of_the_environment(
        manager: Any, monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox) -> None:
    if sandbox.user is not None and os.geteuid() != 0:
        pytest.skip("changing users needs root")
    monkeypatch.setenv("CONTAINMENT_SECRET", "s3cret")
    monkeypatch.setenv("HOUSEKEEPING_TASK_MODE", "fast")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    m = manager(sandbox=sandbox)  # NOTE: the starter takes the environment at its start
    m.register_animator("ENV", ca.Environment())
    m.register_animator("BARE", ca.Environment(), sandbox=Sandbox(private_pids=False))
    seen = result_of(m, "ENV")
    assert "CONTAINMENT_SECRET" not in seen["names"]
    assert {"HOUSEKEEPING_TASK_MODE", "LC_ALL", "PATH"} <= set(seen["names"]), seen
    assert seen["home"] == ("/" if sandbox.user else os.environ.get("HOME"))
    # with no sandbox at all, nothing changes
    assert "CONTAINMENT_SECRET" in result_of(m, "BARE")["names"]


@needs_root
def test_two_supervisors_never_share_a_dynamic_uid(manager: Any) -> None:
    """Each uid in use is locked on the machine: with a range of one uid, a second
    manager's task waits while the first manager's task holds it."""
    import time

    first = manager(sandbox=DYNAMIC, uid_range=(62030, 62030))
    second = manager(sandbox=DYNAMIC, uid_range=(62030, 62030))
    first.register_animator("PATIENT", ca.Patient())
    second.register_animator("ID", ca.Identity())
    patient = first.run_task({"operation": "PATIENT"})
    wait_for(lambda: any(t.startswith("ready ") for t in message_texts(first.get_task(patient))))
    waiting = second.run_task({"operation": "ID"})
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # NOTE: it must not start while the uid is held
        assert second.get_task(waiting)["state"] == "NEW"
    first.cancel_task(patient)
    wait_terminal(first, patient)
    again = second.run_task({"operation": "ID"})  # NOTE: a change that makes it dispatch
    assert wait_terminal(second, waiting)["result"]["uid"] == 62030
    assert wait_terminal(second, again)["result"]["uid"] == 62030


# -- review fixes: the init, the uid pool, the start path ----------------------------------


@needs_namespaces
def test_a_task_that_ends_while_the_starter_imports_keeps_its_exit_code(
        manager: Any, shared_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The init reports at once, but the starter reads it only after a Preload of
    seconds: the init is not taken for hung (it used to be SIGKILLed after 2 s, and
    the task's exit code 3 could be lost to the init's -9)."""
    m = manager(sandbox=Sandbox(private_pids=True))
    m.register_animator("EXIT3", ca.ExitThreeWhenTold())
    gate = shared_dir / "gate"
    task_id = m.run_task({"operation": "EXIT3", "args": {"gate": str(gate)}})
    wait_for(lambda: "ready" in message_texts(m.get_task(task_id)))
    import slow_import  # NOTE: imported here first (seconds), then by the starter

    m.register_animator("SLOW", slow_import.Imported())  # NOTE: returns; the starter imports
    gate.touch()
    task = wait_terminal(m, task_id)
    assert not [r for r in caplog.records if "did not report" in r.getMessage()]
    assert task["state"] == "FAILED"
    assert any("with code 3" in text for text in message_texts(task)), message_texts(task)


@needs_root
def test_a_dynamic_uid_with_a_live_process_is_not_handed_out(tmp_path: Path) -> None:
    from supervisor.sandbox import UidPool

    uid = 65000
    pid = os.fork()
    if pid == 0:  # NOTE: a process of that uid, as an escaped orphan would be
        try:
            os.setresuid(uid, uid, uid)
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        wait_for(lambda: os.stat(f"/proc/{pid}").st_uid == uid)
        pool = UidPool(uid, uid, lock_dir=str(tmp_path))
        assert pool.take() is None
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert pool.take() == uid
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_a_uid_lock_that_cannot_be_opened_means_not_free(tmp_path: Path) -> None:
    from supervisor.sandbox import UidPool

    (tmp_path / "65001").mkdir()  # NOTE: the lock file cannot be opened read-write
    pool = UidPool(65001, 65001, lock_dir=str(tmp_path))
    assert pool.take() is None


@needs_root
def test_a_user_gone_since_registration_fails_the_task_and_leaks_no_process(
        manager: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import supervisor.backends.local.backend

    m = manager(max_workers=1)
    m.register_animator("QUICK", ca.animators.Quick(), sandbox=Sandbox(user="nobody"))
    backend = m._backend
    wait_for(lambda: len(backend._warm) >= 1)
    warm = len(backend._warm) + len(backend._spawning)

    def gone(user: object) -> tuple[int, int]:
        raise KeyError(f"no such user: {user!r}")

    monkeypatch.setattr(supervisor.backends.local.backend, "resolve_user", gone)
    task = wait_terminal(m, m.run_task({"operation": "QUICK"}))
    assert task["state"] == "FAILED" and "no such user" in " ".join(message_texts(task))
    # the warm process it did not take is still there, not lost from sight
    assert len(backend._warm) + len(backend._spawning) == warm
