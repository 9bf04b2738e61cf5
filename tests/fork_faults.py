"""Injected fork failures in the starter: ``os.fork()`` raises EAGAIN on demand.

Real pid exhaustion is no way to test this (root ignores ``RLIMIT_NPROC``,
and it would starve the machine), so this module wraps ``os.fork`` when it is
imported with :data:`COUNTER_ENV` set. Registering :class:`Forked` makes the
starter import ("preload") this module, so the wrapper runs in the starter;
it fails a fork only where warm processes are forked: in the process that
imported the module, and in an init of a PID namespace (pid 1 there, a fork
of the starter) -- not in the task processes -- and never in the test
process, whose pid :data:`EXEMPT_ENV` holds. Each failed fork takes one from the counter
file named by :data:`COUNTER_ENV`; at 0, forks succeed again.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from supervisor import Animator

#: The environment variable naming the counter file (forks still to fail).
COUNTER_ENV = "HOUSEKEEPING_TEST_FORK_FAILURES"
#: The environment variable holding the pid of the test process (never faulted).
EXEMPT_ENV = "HOUSEKEEPING_TEST_FORK_EXEMPT"

_IMPORTED_BY = os.getpid()
#: Read at import: a sandbox cuts the environment of the processes forked later.
_COUNTER = os.environ.get(COUNTER_ENV)
_real_fork = os.fork


def take_failure(path: str) -> bool:
    """Take one failure from the counter file; False when it holds 0 (or nothing).

    NOTE: under a lock: the starter and several inits may fork at once.
    """
    import fcntl

    try:
        with open(path, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            left = int(f.read().strip() or 0)
            if left <= 0:
                return False
            f.seek(0)
            f.truncate()
            f.write(str(left - 1))
            return True
    except (OSError, ValueError):
        return False


def _fork() -> int:
    """``os.fork``, failing with EAGAIN while the counter says so (in the importer and
    in inits only)."""
    path = _COUNTER
    if path and os.getpid() in (_IMPORTED_BY, 1) and take_failure(path):
        raise OSError(errno.EAGAIN, f"{os.strerror(errno.EAGAIN)} (injected by fork_faults)")
    return _real_fork()


if os.environ.get(COUNTER_ENV) and os.environ.get(EXEMPT_ENV) != str(os.getpid()):
    os.fork = _fork


class Forked(Animator):
    """Return at once; the module it lives in is what counts (see the docstring)."""

    def execute(self, ops: Any) -> Any:
        return {"forked": True}
