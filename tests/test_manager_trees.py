"""Descendants of task processes never outlive their task, nor a SIGKILLed supervisor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import animators
import psutil
import pytest
from conftest import TIMEOUT, describe, is_alive, message_texts, wait_for, wait_terminal

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent


def tree_of(m: Any, tid: str) -> list[psutil.Process]:
    """Wait for the task's ready message; return its process and the ones it started."""
    info = wait_for(lambda: animators.ready_info(m.get_task(tid)),
                    message=lambda: f"task is {m.get_task(tid)}")
    procs = [psutil.Process(pid) for pid in [info["pid"], *info["children"]]]
    assert all(is_alive(p) for p in procs), [describe(p) for p in procs]
    return procs


def assert_all_gone(procs: list[psutil.Process]) -> None:
    """None of ``procs`` is alive (checked right when the task is terminal)."""
    alive = [describe(p) for p in procs if is_alive(p)]
    assert not alive, alive


@pytest.mark.parametrize("mode", ["wait", "return", "crash"])
def test_grandchildren_gone_when_the_task_ends(manager, tmp_path, mode):
    m = manager(cancel_grace=5)
    m.register_animator("FORK", animators.Forker())
    gate = tmp_path / "gate"
    tid = m.run_task({"operation": "FORK", "args": {"mode": mode, "gate": str(gate)}})
    procs = tree_of(m, tid)
    if mode == "wait":
        m.cancel_task(tid)
    gate.touch()
    task = wait_terminal(m, tid)
    expected = {"wait": "CANCELED", "return": "SUCCEEDED", "crash": "FAILED"}[mode]
    assert task["state"] == expected, message_texts(task)
    assert_all_gone(procs)


@pytest.mark.parametrize("mode", ["wait", "return"])
def test_double_forked_daemon_gone_when_the_task_ends(manager, tmp_path, mode):
    m = manager(cancel_grace=5)
    m.register_animator("DAEMON", animators.Daemon())
    pidfile = tmp_path / "daemon.pid"
    gate = tmp_path / "gate"
    tid = m.run_task({"operation": "DAEMON",
                      "args": {"mode": mode, "pidfile": str(pidfile), "gate": str(gate)}})
    procs = tree_of(m, tid)
    if mode == "wait":
        m.cancel_task(tid)
    gate.touch()
    task = wait_terminal(m, tid)
    assert task["state"] == ("CANCELED" if mode == "wait" else "SUCCEEDED"), message_texts(task)
    assert_all_gone(procs)


def test_sigterm_ignoring_tree_gone_after_the_grace(manager):
    m = manager(cancel_grace=0.3)
    m.register_animator("STUBBORN", animators.Stubborn())
    m.register_animator("FORK", animators.Forker())
    stubborn = m.run_task({"operation": "STUBBORN"})
    forker = m.run_task({"operation": "FORK", "args": {"mode": "wait"}})
    procs = tree_of(m, forker)
    wait_for(lambda: animators.ready_info(m.get_task(stubborn)))
    stubborn_pid = animators.ready_info(m.get_task(stubborn))["pid"]
    procs.append(psutil.Process(stubborn_pid))
    m.cancel_task(stubborn)
    m.cancel_task(forker)
    for tid in (stubborn, forker):
        assert wait_terminal(m, tid)["state"] == "CANCELED"
    assert_all_gone(procs)


SUPERVISOR_SCRIPT = """
import json, sys, time
sys.path[:0] = [{tests!r}, {root!r}]
import animators
import psutil
from supervisor import Manager

m = Manager(cancel_grace=0.5, max_workers=4)
m.register_animator("FORK", animators.Forker())
m.register_animator("DAEMON", animators.Daemon())
m.register_animator("STUBBORN", animators.Stubborn())
ids = [
    m.run_task({{"operation": "FORK", "args": {{"mode": "wait"}}}}),
    m.run_task({{"operation": "DAEMON", "args": {{"mode": "wait", "pidfile": {pidfile!r}}}}}),
    m.run_task({{"operation": "STUBBORN"}}),
]
deadline = time.monotonic() + 30
pids = []
for tid in ids:
    while animators.ready_info(m.get_task(tid)) is None:
        assert time.monotonic() < deadline, m.get_task(tid)
        time.sleep(0.01)
    info = animators.ready_info(m.get_task(tid))
    pids += [info["pid"], *info.get("children", [])]
pids += [p.pid for p in psutil.Process().children(recursive=True)]
print(json.dumps(sorted(set(pids))), flush=True)
time.sleep(3600)
"""


def test_supervisor_sigkilled_leaves_nothing_behind(tmp_path):
    script = tmp_path / "supervise.py"
    script.write_text(textwrap.dedent(SUPERVISOR_SCRIPT.format(
        tests=str(TESTS_DIR), root=str(ROOT), pidfile=str(tmp_path / "daemon.pid"),
    )))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    procs: list[psutil.Process] = []
    try:
        line = proc.stdout.readline()
        assert line, f"the supervisor script ended early with {proc.wait(TIMEOUT)}"
        pids = json.loads(line)
        procs += [psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)]
        assert len(procs) >= 6, pids  # 3 task processes, 3 descendants, the starter
        proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(TIMEOUT)

        def gone(p: psutil.Process) -> bool:
            # A zombie waiting for init is over; one that is ours would be a leak.
            if not is_alive(p):
                try:
                    return p.ppid() != os.getpid()
                except psutil.NoSuchProcess:
                    return True
            return False

        wait_for(lambda: all(gone(p) for p in procs), timeout=10,
                 message=lambda: str([describe(p) for p in procs if not gone(p)]))
        elapsed = time.monotonic() - killed_at
        assert elapsed < 2.0, f"descendants lived {elapsed:.2f} s after the supervisor died"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        # Leave no daemon behind even when the test fails.
        for p in procs:
            if is_alive(p):
                try:
                    p.kill()
                except psutil.Error:
                    pass


SUBREAPER_SCRIPT = """
import json, os, signal, sys, time
sys.path[:0] = [{tests!r}, {root!r}]
import animators
import psutil
from conftest import is_alive
from supervisor import Manager

m = Manager(cancel_grace=0.5, subreaper=True)
m.register_animator("DAEMON", animators.Daemon())
tid = m.run_task({{"operation": "DAEMON", "args": {{"mode": "wait", "pidfile": {pidfile!r}}}}})
deadline = time.monotonic() + 30
while animators.ready_info(m.get_task(tid)) is None:
    assert time.monotonic() < deadline, m.get_task(tid)
    time.sleep(0.01)
info = animators.ready_info(m.get_task(tid))
daemon = psutil.Process(info["children"][0])
print(json.dumps({{"daemon": daemon.pid}}), flush=True)
# The task process, then the starter, both killed from outside.
os.kill(info["pid"], signal.SIGKILL)
os.kill(info["ppid"], signal.SIGKILL)
deadline = time.monotonic() + 10
while is_alive(daemon) and time.monotonic() < deadline:
    time.sleep(0.01)
while m.get_task(tid)["state"] not in ("CANCELED", "FAILED", "SUCCEEDED"):
    assert time.monotonic() < deadline + 20, m.get_task(tid)
    time.sleep(0.01)
print(json.dumps({{"daemon_alive": is_alive(daemon), "state": m.get_task(tid)["state"]}}),
      flush=True)
m.terminate()
"""


def test_subreaper_catches_a_daemon_whose_task_and_starter_were_killed(tmp_path):
    # Manager(subreaper=True) changes its host process, so it runs in a process of its own.
    script = tmp_path / "subreaper.py"
    script.write_text(textwrap.dedent(SUBREAPER_SCRIPT.format(
        tests=str(TESTS_DIR), root=str(ROOT), pidfile=str(tmp_path / "daemon.pid"),
    )))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    daemon = None
    try:
        first = proc.stdout.readline()
        assert first, f"the script ended early with {proc.wait(TIMEOUT)}"
        daemon = psutil.Process(json.loads(first)["daemon"])
        second = proc.stdout.readline()
        assert second, f"the script ended early with {proc.wait(TIMEOUT)}"
        outcome = json.loads(second)
        assert outcome == {"daemon_alive": False, "state": "FAILED"}
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        if daemon is not None and is_alive(daemon):
            daemon.kill()
