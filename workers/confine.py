"""The task process confines itself: the per-task part of its ``Sandbox``.

Applied after the task process received its :class:`~supervisor.protocol.Start`
and imported its animator, before the animator's first line runs: the
rlimits, ``PR_SET_NO_NEW_PRIVS``, the environment cut to an allowlist, the
capability bounding set, the user (groups, gid, uid), and last every
capability of a task that stays root. The namespaces were made before the
process was (``workers.starter``, ``workers.pid1``).
"""

from __future__ import annotations

import encodings.idna  # noqa: F401 (see NOTE below)
import os
import resource

from supervisor.linux import PR_SET_NO_NEW_PRIVS, clear_capabilities, drop_capabilities, prctl
from supervisor.protocol import Start

# NOTE: a task running as another user (Sandbox.user) may not be able to read
# the interpreter's own library (it may live under a private home), so what
# the stdlib imports lazily on common paths is imported here, in the starter:
# encodings.idna by socket.getaddrinfo (else "LookupError: unknown encoding").

#: What a sandboxed task keeps of the supervisor's environment (its secrets stay
#: behind): these names, every ``LC_*``, and every ``HOUSEKEEPING_TASK_*``.
KEPT_ENVIRONMENT = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "HOME",
                              "PYTHONHASHSEED", "PYTHONIOENCODING", "PYTHONUNBUFFERED"})
TASK_ENVIRONMENT_PREFIX = "HOUSEKEEPING_TASK_"


_prepared = False  #: the part common to every confined task is done (inherited by forks)


def prepare() -> None:
    """The part of confinement that is the same for every confined task: the
    environment cut to the allowlist, ``PR_SET_NO_NEW_PRIVS``, the capability
    bounding set emptied (the process keeps its capabilities for now).

    An init calls it once for all the task processes it forks, off their
    start path; a task process without an init calls it at its start.
    """
    global _prepared
    for name in list(os.environ):
        if not (name in KEPT_ENVIRONMENT or name.startswith(("LC_", TASK_ENVIRONMENT_PREFIX))):
            del os.environ[name]
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    if os.geteuid() == 0:
        drop_capabilities()
    _prepared = True


class SandboxError(Exception):
    """The sandbox could not be applied; the animator does not run."""


def confine(start: Start) -> None:
    """Apply the task's sandbox: the rlimits, :func:`prepare` unless an init did it,
    the user (groups, gid, uid), then no capabilities for a task that stays root."""
    try:
        if start.max_open_files is not None:
            limit = start.max_open_files
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        if start.max_cpu_seconds is not None:
            # NOTE: SIGXCPU at the soft limit, SIGKILL a second later if it is caught.
            cpu = start.max_cpu_seconds
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        if start.max_processes is not None:
            limit = start.max_processes
            resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
        privileged = os.geteuid() == 0
        if start.no_new_privs and not _prepared:
            prepare()
        if start.uid is not None:
            os.environ["HOME"] = "/"  # NOTE: the supervisor's home is not the task's
            gid = start.gid if start.gid is not None else start.uid
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(start.uid, start.uid, start.uid)
        if start.no_new_privs and privileged:
            # NOTE: a task that stays root keeps root's files, not root's powers.
            clear_capabilities()
    except OSError as exc:
        raise SandboxError(f"the sandbox could not be applied: {exc}") from exc
