"""What the kernel contains for a task: namespaces, a user of its own, resource limits.

A :class:`Sandbox` says how a task process is confined. The parts that must
exist before the process does (its PID and network namespaces) are made
before a warm process is forked, off the start path; what every confined task
needs (the environment cut, ``PR_SET_NO_NEW_PRIVS``, the empty capability
bounding set) is done once by the init of a namespace (``workers.confine``);
the rest (the rlimits, the user, no capabilities) is applied by the task
process itself, after it received its task and imported its animator,
before the animator's first line runs.

::

    starter ── unshare(NEWPID), fork ──▶ init (PID 1 of the namespace, reused)
                                          ├─ environment, no_new_privs, bounding set
                                          ├─ forwards SIGTERM, reaps orphans
                                          └─ fork per Spawn ──▶ warm task process
                                                       Start: rlimits, setgroups/
                                                       setgid/setuid, capset, run

When the task process exits, the init kills everything left in its
namespace, reaps it and reports the task process's exit to the starter; the
kernel guarantees that nothing of the namespace outlives its init.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import pwd
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from supervisor.errors import InvalidAnimator

log = logging.getLogger("housekeeping.sandbox")

DYNAMIC = "dynamic"  #: ``Sandbox(user=DYNAMIC)``: a uid of its own per running task
#: systemd's range for DynamicUser= (61184-65519), the default of ``Manager(uid_range=)``.
DEFAULT_UID_RANGE = (61184, 65519)

_PROBE = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.unshare(0x20000000) != 0:\n"  # CLONE_NEWPID
    "    sys.exit(1)\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os._exit(0 if os.getpid() == 1 else 2)\n"
    "sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
)


_NETWORK_PROBE = (
    "import ctypes, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "sys.exit(0 if libc.unshare(0x40000000) == 0 else 1)\n"  # CLONE_NEWNET
)


@functools.cache
def network_namespaces_permitted() -> bool:
    """Tell whether this process may make network namespaces (probed once, in a child),
    so that ``private_network`` is refused at registration rather than failing every
    fork of its warm processes."""
    return pid_namespaces_permitted() and _probe(_NETWORK_PROBE)


def _probe(code: str) -> bool:
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", code],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@functools.cache
def pid_namespaces_permitted() -> bool:
    """Tell whether this process may make PID namespaces (probed once, in a child).

    NOTE: root is not enough (a container may withhold CAP_SYS_ADMIN, or a
    seccomp filter refuse unshare), so the probe really makes one. User
    namespaces are not used: without root, tasks run without a namespace.
    """
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    return _probe(_PROBE)


@dataclass(frozen=True)
class Sandbox:
    """How the kernel confines each task process of an operation.

    Args:
        private_pids: run the task process in a PID namespace of its own,
            behind a tiny init that is PID 1 of it: the task cannot see or
            signal any process outside, and nothing of its tree outlives it.
            ``None``: on where the kernel permits it (root with
            ``CAP_SYS_ADMIN``), off otherwise (with a log line).
        private_network: a network namespace of its own with only loopback
            (up): no route to anything, this machine's services included.
        user: run the task process as this user (a name or a uid) with its
            primary group and no supplementary groups; ``"dynamic"`` gives each
            running task a uid of its own from ``Manager(uid_range=)``. Needs
            the supervisor to be root.
        max_processes: at most this many processes of the task's user at once,
            the task process included (RLIMIT_NPROC: counted per uid, so it
            needs a non-root ``user``; with a fixed user, its tasks share it).
        max_cpu_seconds: CPU time of the task process (RLIMIT_CPU, whole
            seconds, rounded up); over it the task ends FAILED.
        max_open_files: file descriptors of the task process (RLIMIT_NOFILE).
    """

    private_pids: bool | None = None
    private_network: bool = False
    user: str | int | None = None
    max_processes: int | None = None
    max_cpu_seconds: float | None = None
    max_open_files: int | None = None

    def __post_init__(self) -> None:
        if self.private_pids is not None and not isinstance(self.private_pids, bool):
            raise TypeError("private_pids must be True, False or None")
        if not isinstance(self.private_network, bool):
            raise TypeError("private_network must be True or False")
        user = self.user
        if user is not None and (isinstance(user, bool) or not isinstance(user, str | int)
                                 or user == "" or (isinstance(user, int) and user < 0)):
            raise ValueError("user must be a user name, a uid >= 0, 'dynamic' or None")
        for name in ("max_processes", "max_open_files"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None")
        cpu = self.max_cpu_seconds
        if cpu is not None and (isinstance(cpu, bool) or not isinstance(cpu, int | float)
                                or not math.isfinite(cpu) or cpu <= 0):
            raise ValueError("max_cpu_seconds must be a positive number or None")

    @property
    def namespaced(self) -> bool:
        """True when the task process needs an init of its own (a namespace)."""
        return bool(self.private_pids) or self.private_network

    @property
    def confined(self) -> bool:
        """True when anything of this sandbox is in effect (then no_new_privs is set)."""
        return (self.namespaced or self.user is not None or self.max_processes is not None
                or self.max_cpu_seconds is not None or self.max_open_files is not None)

    def effective(self) -> Sandbox:
        """This sandbox as it will be applied here; raises if the kernel refuses a part.

        Raises:
            InvalidAnimator: a setting cannot be had on this machine, naming why.
        """
        permitted = pid_namespaces_permitted()
        private_pids = self.private_pids
        if private_pids is None:
            private_pids = permitted
        elif private_pids and not permitted:
            raise InvalidAnimator(
                "private_pids=True: this process may not make PID namespaces "
                "(it needs root with CAP_SYS_ADMIN)")
        if self.private_network and not network_namespaces_permitted():
            raise InvalidAnimator(
                "private_network=True: this process may not make network namespaces "
                "(it needs root with CAP_SYS_ADMIN)")
        if self.user is not None:
            if os.geteuid() != 0:
                raise InvalidAnimator(
                    f"user={self.user!r}: the supervisor must run as root to change a "
                    "task's user")
            if self.user != DYNAMIC:
                resolve_user(self.user)  # raises for an unknown name
        if self.max_processes is not None and (
                self.user is None or (self.user != DYNAMIC and resolve_user(self.user)[0] == 0)):
            raise InvalidAnimator(
                "max_processes needs a non-root user= (RLIMIT_NPROC counts the processes "
                "of a uid, and root is not held to it)")
        return Sandbox(private_pids, self.private_network, self.user, self.max_processes,
                       self.max_cpu_seconds, self.max_open_files)

    def to_dict(self) -> dict[str, Any]:
        """The keyword form (``Sandbox(**sandbox.to_dict())`` gives it back)."""
        return {name: getattr(self, name) for name in _FIELDS}

    def to_wire(self) -> dict[str, Any]:
        """The REST form: ``{"privatePids", "privateNetwork", "user", ...}``."""
        return {_camel(name): getattr(self, name) for name in _FIELDS}

    def cpu_rlimit(self) -> int | None:
        """RLIMIT_CPU's soft limit: whole seconds, at least 1."""
        if self.max_cpu_seconds is None:
            return None
        return max(1, math.ceil(self.max_cpu_seconds))


_FIELDS = ("private_pids", "private_network", "user", "max_processes", "max_cpu_seconds",
           "max_open_files")


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.capitalize() for part in rest)


def resolve_user(user: str | int) -> tuple[int, int]:
    """The (uid, primary gid) of a user name or uid; a uid unknown here keeps gid = uid.

    Raises:
        InvalidAnimator: no user of that name exists.
    """
    if isinstance(user, int):
        try:
            return user, pwd.getpwuid(user).pw_gid
        except KeyError:
            return user, user
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise InvalidAnimator(f"user={user!r}: no such user on this machine") from None
    return entry.pw_uid, entry.pw_gid


def containment(sandbox: Sandbox) -> str:
    """How task trees are held: ``"pid-namespace"`` or ``"subreaper"``."""
    return "pid-namespace" if sandbox.private_pids else "subreaper"


#: Where each uid of ``user="dynamic"`` is locked while a task holds it (flock), so
#: that supervisors on one machine (or one after another) never share a uid.
UID_LOCK_DIR = "/run/housekeeping/dynamic-uid"


class UidPool:
    """The uids of ``Sandbox(user="dynamic")``: one per running task, reused last.

    A uid goes back to the pool only when its task's tree is gone; the one
    returned longest ago is handed out next, so that what a task left behind
    (files in /tmp, IPC objects) meets a later task of the same uid as late
    as possible. Each uid in use is also locked (``flock`` on a file of
    :data:`UID_LOCK_DIR`): another supervisor's pool skips it, and the lock
    goes with the process that held it. The pool starts at a random place in
    the range, so that one run's first task does not take the uid of the last
    run's first task.
    """

    def __init__(self, first: int, last: int, lock_dir: str = UID_LOCK_DIR) -> None:
        import secrets
        from collections import deque

        self._free = deque(range(first, last + 1))
        self._free.rotate(-secrets.randbelow(len(self._free)))
        self._taken: dict[int, int | None] = {}  # uid -> its lock file descriptor
        self._lock_dir = lock_dir
        self._locking: bool | None = None  # decided at the first take

    def take(self) -> int | None:
        """A free uid, or None when every uid of the range is in use (here or elsewhere)."""
        for _ in range(len(self._free)):
            uid = self._free.popleft()
            locked, fd = self._lock(uid)
            if locked and not _uid_runs(uid):
                self._taken[uid] = fd
                return uid
            if fd is not None:
                os.close(fd)
            # NOTE: another supervisor's task holds it, or a process of it still runs
            # (say, one that escaped when a starter died): never two tasks on one uid.
            self._free.append(uid)
        return None

    def give_back(self, uid: int) -> None:
        """Return a uid whose task's tree is gone."""
        if uid in self._taken:
            fd = self._taken.pop(uid)
            if fd is not None:
                os.close(fd)  # NOTE: unlocks it
            self._free.append(uid)

    def _lock(self, uid: int) -> tuple[bool, int | None]:
        import fcntl

        if self._locking is None:
            try:
                os.makedirs(self._lock_dir, mode=0o700, exist_ok=True)
                self._locking = True
            except OSError as exc:
                log.warning("dynamic uids are not locked across supervisors (%s: %s)",
                            self._lock_dir, exc)
                self._locking = False
        if not self._locking:
            return True, None
        try:
            fd = os.open(os.path.join(self._lock_dir, str(uid)),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:  # NOTE: out of descriptors, say: this uid is not had now
            log.warning("cannot lock dynamic uid %d: %s", uid, exc)
            return False, None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False, None
        return True, fd


def _uid_runs(uid: int) -> bool:
    """True if a process of ``uid`` is alive (the owner of ``/proc/PID`` is its euid)."""
    try:
        with os.scandir("/proc") as entries:
            for entry in entries:
                if entry.name.isdigit():
                    try:
                        if entry.stat().st_uid == uid:
                            return True
                    except OSError:
                        continue  # NOTE: it just exited
    except OSError:
        return False
    return False


def check_uid_range(uid_range: Any) -> tuple[int, int]:
    """Validate ``Manager(uid_range=)``."""
    try:
        first, last = uid_range
    except (TypeError, ValueError):
        raise ValueError("uid_range must be a pair (first, last) of uids") from None
    for value in (first, last):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**31 - 1:
            raise ValueError("uid_range must hold uids from 1 to 2**31 - 2")
    if first > last:
        raise ValueError("uid_range: first must not be above last")
    return first, last
