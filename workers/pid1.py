"""PID 1 of a task's PID namespace: a tiny init in front of one task process at a time.

The kernel treats the first process of a PID namespace as its init: it
ignores every signal it has no handler for, even a SIGKILL it sends itself,
and when it exits the kernel kills everything left in the namespace. So the
task process is never PID 1 itself (it keeps ordinary signal semantics: a task
that kills or segfaults itself dies of it), and this init, as bubblewrap,
tini and dumb-init do:

* on each ``Spawn`` from the starter (its pipe end, stdout and stderr passed
  with SCM_RIGHTS),
  forks one warm task process, and forwards SIGTERM to it;
* reaps every orphan re-parented to it (a task's daemons land here);
* when the task process exits, kills everything else in the namespace
  (``kill(-1, SIGKILL)``), reaps it, and only then reports the task
  process's exit code (``Exited``) to the starter: the namespace is empty;
* dies with the starter (``PR_SET_PDEATHSIG`` SIGKILL, which the kernel
  delivers to an init from outside), and its namespace with it.

One init serves one task after another, so that no namespace is made or
torn down on the path of a task (measured: a namespace and an init forked per
task cost a quarter of the isolated throughput). An init forked before the
starter imported animator modules is retired after its task: its task
processes would import them at every task.
"""

from __future__ import annotations

import os
import signal
import socket

from supervisor.linux import CLONE_NEWNET, PR_SET_PDEATHSIG, loopback_up, prctl, unshare
from supervisor.protocol import Exited, ProtocolError, Spawn, SpawnFailed, decode, encode
from workers import confine
from workers.child import run_warm_process


def run_init(ctl: socket.socket, private_network: bool) -> int:
    """Be PID 1 of this namespace, forking a task process per Spawn; return at EOF."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if private_network:
        unshare(CLONE_NEWNET)
        loopback_up()
    # NOTE: a namespace is a sandbox: what every confined task needs is done
    # here, once, and inherited (the init keeps its capabilities: it kills
    # the processes of other users in its namespace).
    confine.prepare()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    current: list[int] = []  # the task process now, if any

    def forward(signum: int, frame: object) -> None:
        for pid in current:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(ctl, 1 << 12, 3)
        except OSError:
            return 0
        if not data:
            return 0  # the starter is gone
        try:
            request = decode(data)
        except ProtocolError:
            request = None
        if not isinstance(request, Spawn) or len(fds) != 3:
            _close(fds)
            continue
        try:
            task = os.fork()
        except OSError as exc:
            # NOTE: as in the starter: reported, and the manager backs off.
            _close(fds)
            ctl.send(encode(SpawnFailed(request.token, f"{type(exc).__name__}: {exc}")))
            continue
        code, usage = _run_one(task, fds, ctl, current)
        ctl.send(encode(Exited(0, code, request.token, usage)))


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _run_one(task: int, fds: list[int], ctl: socket.socket, current: list[int],
             ) -> tuple[int, tuple[float, float, int]]:
    """Run the warm task process just forked on ``fds`` (its pipe, its stdout and
    stderr; ``task`` is 0 in it); empty the namespace after it.

    Returns:
        Its exit code, and the usage of every process reaped here meanwhile
        (the task and the descendants it left: CPU summed, peak RSS the largest).
    """
    if task == 0:
        code = 70
        try:
            ctl.close()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = run_warm_process(*fds)
        finally:
            os._exit(code)
    _close(fds)
    current.append(task)
    status: int | None = None
    user = system = 0.0
    peak = 0
    while True:
        try:
            pid, wait_status, rusage = os.wait4(-1, 0)
        except ChildProcessError:
            break  # the namespace is empty but for this init
        user += rusage.ru_utime
        system += rusage.ru_stime
        peak = max(peak, rusage.ru_maxrss * 1024)  # NOTE: Linux counts KiB
        if pid == task:
            status = wait_status
            current.clear()
        if status is not None:
            # NOTE: again after every reap: a process forking while the first
            # kill went round must not be left behind.
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert status is not None
    return os.waitstatus_to_exitcode(status), (user, system, peak)
