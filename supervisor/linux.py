"""The few Linux process controls the supervisor needs, through prctl(2)."""

from __future__ import annotations

import ctypes
import functools
import os
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def prctl(option: int, value: int) -> None:
    """Call prctl(2); a no-op where there is none (macOS runs without these guards)."""
    if not sys.platform.startswith("linux"):
        return
    libc = _libc()
    if libc.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def children_of(pid: int) -> list[int]:
    """The direct children of ``pid``, read from /proc (cheap, no psutil).

    Children belong to the thread that forked them, so every thread's
    ``children`` file is read, not only the main thread's.
    """
    found: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return found


def descendants_of(pid: int) -> list[int]:
    """Every descendant of ``pid``, deepest last."""
    found: list[int] = []
    frontier = children_of(pid)
    while frontier:
        found.extend(frontier)
        frontier = [c for p in frontier for c in children_of(p)]
    return found
