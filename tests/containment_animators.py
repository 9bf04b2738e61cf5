"""Animators that probe the kernel's containment from inside a task process.

Each returns what it saw, so the test decides; the two that send signals
(:class:`KillSupervisor`, :class:`KillEverything`) first check, inside, that
they really are sandboxed -- in a PID namespace of their own (``NSpid:`` has
two entries) and, for the second, not root -- and return without a signal
otherwise, so that a broken sandbox fails the test instead of harming the
machine. Every fork loop is bounded. Pids are the host's (``NSpid:``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import time
from typing import Any

import animators
from animators import host_pid, in_pid_namespace

from supervisor import Animator, TaskState
from supervisor.linux import PR_SET_CHILD_SUBREAPER, prctl

#: Bound of every fork loop here.
MAX_FORKS = 64
#: Bound of the open-files loop.
MAX_OPENS = 4096


def _args(ops: Any) -> dict[str, Any]:
    return ops.task.get("args") or {}


def _nspid() -> list[int]:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(field) for field in line.split()[1:]]
    raise RuntimeError("no NSpid line")


class Identity(Animator):
    """Report the task process's pids, user, groups and network interfaces."""

    def execute(self, ops: Any) -> Any:
        return {
            "nspid": _nspid(), "pid": os.getpid(), "ppid": os.getppid(),
            "host_pid": host_pid(), "uid": os.getuid(), "euid": os.geteuid(),
            "gid": os.getgid(), "groups": os.getgroups(),
            "interfaces": sorted(name for _, name in socket.if_nameindex()),
            "no_new_privs": _status_field("NoNewPrivs"),
        }


def _status_field(name: str) -> str:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split()[1]
    return ""


class Connect(Animator):
    """Connect to ``args.port`` on 127.0.0.1 and say what happened."""

    def execute(self, ops: Any) -> Any:
        try:
            with socket.create_connection(("127.0.0.1", _args(ops)["port"]), timeout=5) as sock:
                return {"connected": True, "greeting": sock.recv(64).decode()}
        except OSError as exc:
            return {"connected": False, "error": type(exc).__name__, "errno": exc.errno}


class ForkUntilRefused(Animator):
    """Fork sleepers until fork() fails (at most :data:`MAX_FORKS`); report how far it got."""

    def execute(self, ops: Any) -> Any:
        children: list[int] = []
        error = None
        try:
            for _ in range(MAX_FORKS):
                pid = os.fork()
                if pid == 0:
                    time.sleep(60)
                    os._exit(0)
                children.append(pid)
        except OSError as exc:
            error = type(exc).__name__
        finally:
            for pid in children:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        return {"forked": len(children), "error": error}


class OpenUntilRefused(Animator):
    """Open /dev/null until refused (at most :data:`MAX_OPENS`); report the highest fd."""

    def execute(self, ops: Any) -> Any:
        fds: list[int] = []
        error = None
        try:
            for _ in range(MAX_OPENS):
                fds.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            error = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        finally:
            highest = max(fds, default=-1)
            for fd in fds:
                os.close(fd)
        return {"highest": highest, "error": error}


class BurnCpu(Animator):
    """Spin on the CPU for up to ``args.seconds`` of wall time."""

    def execute(self, ops: Any) -> Any:
        deadline = time.monotonic() + _args(ops).get("seconds", 30)
        spins = 0
        while time.monotonic() < deadline:
            spins += 1
        return {"spins": spins}


class KillSupervisor(Animator):
    """SIGKILL ``args.pid`` (the supervisor) -- only from inside a PID namespace of its own
    or as a user other than root; report the error the kernel gave."""

    def execute(self, ops: Any) -> Any:
        if not in_pid_namespace() and os.geteuid() == 0:
            return {"refused": "not sandboxed: no signal sent"}
        try:
            os.kill(_args(ops)["pid"], signal.SIGKILL)
        except OSError as exc:
            return {"error": type(exc).__name__}
        return {"error": None}


class KillEverything(Animator):
    """SIGKILL and SIGSTOP the parent and every pid listed in /proc, when sandboxed.

    It refuses (returns without a signal) unless it is in a PID namespace of
    its own and not root. Pids in /proc are the host's; the kernel reads the
    numbers in the task's own namespace, where almost none exist.
    """

    def execute(self, ops: Any) -> Any:
        if not in_pid_namespace() or os.geteuid() == 0:
            return {"refused": f"not sandboxed (NSpid {_nspid()}, euid {os.geteuid()})"}
        me = os.getpid()
        targets = {os.getppid()} | {int(name) for name in os.listdir("/proc") if name.isdigit()}
        outcome: dict[str, int] = {}
        for pid in sorted(targets - {me}):
            for sig in (signal.SIGSTOP, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                    key = "sent"
                except ProcessLookupError:
                    key = "ESRCH"
                except PermissionError:
                    key = "EPERM"
                outcome[key] = outcome.get(key, 0) + 1
        return {"targets": len(targets), **outcome}


class EscapeAndExit(Animator):
    """Turn the subreaper off, leave a setsid double-forked daemon, and return."""

    def execute(self, ops: Any) -> Any:
        prctl(PR_SET_CHILD_SUBREAPER, 0)
        daemon = animators._double_fork_daemon(_args(ops)["pidfile"], 60.0)
        return {"daemon": daemon}


class KillSelf(Animator):
    """``os.kill(os.getpid(), args.signal)``: a task keeps ordinary signal semantics."""

    def execute(self, ops: Any) -> Any:
        os.kill(os.getpid(), _args(ops)["signal"])
        time.sleep(5)
        ops.set_state(TaskState.FAILED)  # not reached: the signal ends it


class Patient(Animator):
    """Say ``ready`` with the host pid, then wait (bounded) for a cancel."""

    def execute(self, ops: Any) -> Any:
        ops.message(f"ready {host_pid()}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if ops.is_canceled():
                ops.set_state(TaskState.CANCELED)
            time.sleep(0.01)
        return "nobody canceled"


#: ptrace(2) requests (linux/ptrace.h).
PTRACE_SEIZE = 0x4206


class Descriptors(Animator):
    """Report the task process's open descriptors and where they lead."""

    def execute(self, ops: Any) -> Any:
        found = {}
        for name in os.listdir("/proc/self/fd"):
            try:
                found[name] = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                pass  # NOTE: the listing's own descriptor, closed by now
        return {"fds": found, "pipe": ops.pipe_fileno()}


class RootProbe(Animator):
    """As root in a sandbox: try what only capabilities allow (reads and probes only).

    ``args.pid`` is the supervisor's: read its memory, open its network
    namespace, ptrace-seize the namespace's init.
    """

    def execute(self, ops: Any) -> Any:
        if not in_pid_namespace():  # NOTE: pid 1 below must be its own init
            return {"refused": "not in a PID namespace of its own"}
        supervisor = _args(ops)["pid"]
        seen: dict[str, Any] = {"euid": os.geteuid(), "cap_eff": _status_field("CapEff"),
                                "cap_bnd": _status_field("CapBnd")}
        for name, path in (("mem", f"/proc/{supervisor}/mem"),
                           ("netns", f"/proc/{supervisor}/ns/net"),
                           ("environ", f"/proc/{supervisor}/environ")):
            try:
                with open(path, "rb") as f:
                    f.read(1)
                seen[name] = "read"
            except OSError as exc:
                seen[name] = type(exc).__name__
        libc = ctypes.CDLL(None, use_errno=True)
        traced = libc.ptrace(PTRACE_SEIZE, 1, 0, 0) == 0
        seen["ptrace_init"] = "attached" if traced else errno.errorcode[ctypes.get_errno()]
        return seen


class ReportInitThenWait(Animator):
    """Say ``ready <init host pid>``, wait for the file ``args.gate`` (bounded), return."""

    def execute(self, ops: Any) -> Any:
        with open("/proc/self/status") as f:
            ppid = next(line for line in f if line.startswith("PPid:")).split()[1]
        ops.message(f"ready {ppid}")
        deadline = time.monotonic() + 30
        while not os.path.exists(_args(ops)["gate"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        return "done"


class Environment(Animator):
    """Report the names of the task process's environment variables."""

    def execute(self, ops: Any) -> Any:
        return {"names": sorted(os.environ), "home": os.environ.get("HOME")}


class ExitThreeWhenTold(Animator):
    """Say ``ready``, wait for the file ``args.gate`` (bounded), leave with code 3 and
    no report."""

    def execute(self, ops: Any) -> Any:
        ops.message("ready")
        deadline = time.monotonic() + 30
        while not os.path.exists(_args(ops)["gate"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        os._exit(3)
