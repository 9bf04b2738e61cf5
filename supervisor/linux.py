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
