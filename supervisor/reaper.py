"""Signal and reap whole process trees with psutil, descendants first."""

from __future__ import annotations

import contextlib
import logging
import os
import signal

import psutil

from supervisor.linux import descendants_of

log = logging.getLogger("housekeeping.reaper")


def tree_of(pid: int) -> list[psutil.Process]:
    """The process ``pid`` and every descendant, deepest last; [] if it is gone.

    NOTE: walks /proc/<pid>/task/<pid>/children instead of psutil's
    ``children(recursive=True)``, which reads every process on the machine
    (milliseconds on the loop thread, against microseconds).
    """
    procs = []
    for member in (pid, *descendants_of(pid)):
        try:
            procs.append(psutil.Process(member))
        except psutil.Error:
            if member == pid:
                return []
    return procs


def signal_tree(pid: int, sig: int, pidfd: int | None = None) -> int:
    """Send ``sig`` to the descendants of ``pid`` (deepest first), then to ``pid``.

    ``pidfd`` addresses the root safely even if its pid was reused meanwhile.
    Returns how many processes were signalled.
    """
    procs = tree_of(pid)
    count = 0
    for proc in reversed(procs[1:]):
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
            count += 1
    try:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(pid, sig)
        count += 1
    except (ProcessLookupError, PermissionError, OSError):
        pass
    return count


def kill_tree(pid: int, timeout: float = 2.0) -> list[int]:
    """SIGKILL ``pid`` and its descendants and wait (reaping our own children).

    Returns the pids still alive after ``timeout`` (should be none).
    """
    procs = tree_of(pid)
    for proc in reversed(procs):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    alive = [p for p in alive if not _is_zombie(p)]
    if alive:
        log.error("processes survived SIGKILL: %s", [p.pid for p in alive])
    return [p.pid for p in alive]


def _is_zombie(proc: psutil.Process) -> bool:
    """A zombie is dead: it only waits for its parent (maybe init) to reap it."""
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return True


def kill_adopted(exclude: set[int]) -> list[int]:
    """Kill and reap children of this process that came from elsewhere.

    Used only with ``Manager(subreaper=True)``: once this process is a child
    subreaper, a daemon that escaped a dead task process and a dead starter is
    re-parented here. Such a process lives in a session other than ours (a
    daemon calls ``setsid()``); children the host started itself normally
    share our session and are left alone.
    """
    me = psutil.Process()
    own_session = os.getsid(0)
    killed: list[int] = []
    for child in me.children():
        if child.pid in exclude:
            continue
        try:
            if os.getsid(child.pid) == own_session:
                continue
        except OSError:
            continue
        killed.append(child.pid)
        kill_tree(child.pid)
    return killed
