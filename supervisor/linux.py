"""The few Linux process controls the supervisor needs: prctl(2), namespaces, /proc."""

from __future__ import annotations

import ctypes
import functools
import os
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
M_MMAP_THRESHOLD = -3  #: mallopt(3)


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


def _check(result: int) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def unshare(flags: int) -> None:
    """Call unshare(2) (``os.unshare`` arrives in Python 3.12)."""
    _check(_libc().unshare(flags))


def setns(fd: int, nstype: int) -> None:
    """Call setns(2) (``os.setns`` arrives in Python 3.12)."""
    _check(_libc().setns(fd, nstype))


@functools.cache
def _last_capability() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def drop_capabilities() -> None:
    """Empty the capability bounding set: no exec can give a capability back.

    NOTE: dropping it needs CAP_SETPCAP, so it comes before a setuid; the
    process keeps the capabilities it has until :func:`clear_capabilities`.
    """
    prctl_ = _libc().prctl
    for cap in range(_last_capability() + 1):
        if prctl_(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            _check(-1)


def clear_capabilities() -> None:
    """capset(2) to nothing: root without capabilities cannot ptrace, read other
    processes' memory, enter namespaces or raise limits."""
    _check(_libc().capset(_CAP_HEADER, _CAP_DATA))


def warm_up() -> None:
    """Resolve what a task process calls on its start path, ahead of the fork (in the
    starter): a ctypes lookup and a /proc read cost more than the calls."""
    if sys.platform.startswith("linux"):
        libc = _libc()
        _ = libc.prctl, libc.capset, libc.unshare, libc.setns
        _last_capability()


#: capset(2) arguments: version 3, this process; two {effective, permitted, inheritable}
_CAP_HEADER = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
_CAP_DATA = (ctypes.c_uint32 * 6)()


def loopback_up() -> None:
    """Bring ``lo`` up in this (new) network namespace: SIOCSIFFLAGS with IFF_UP."""
    import fcntl
    import socket
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def host_pids() -> tuple[int, int]:
    """This process's pid as the supervisor sees it, even inside a PID namespace, and
    the host pid of its init when it is in one (else 0).

    ``/proc`` is the host's (namespaces do not remount it), so ``NSpid:`` of
    ``/proc/self/status`` lists the pid from the outermost namespace inwards,
    and ``PPid:`` is the parent's host pid.
    """
    # NOTE: bytes and two finds, not a parse of every line: it runs in every
    # task process before it is ready, where each object touched costs.
    try:
        with open("/proc/self/status", "rb") as f:
            status = f.read()
        nspid = _field(status, b"\nNSpid:").split()
        ppid = int(_field(status, b"\nPPid:"))
        return int(nspid[0]), (ppid if len(nspid) > 1 else 0)
    except (OSError, ValueError, IndexError):
        return os.getpid(), 0


def _field(status: bytes, key: bytes) -> bytes:
    """The value of ``key`` (``b"\\nName:"``) in a ``/proc/<pid>/status`` text."""
    start = status.index(key) + len(key)
    end = status.find(b"\n", start)
    return status[start:] if end < 0 else status[start:end]


def return_large_blocks(threshold: int = 256 * 1024) -> bool:
    """Have glibc's malloc map blocks of ``threshold`` bytes or more on their own,
    so that they go back to the system when freed; True if it took.

    NOTE: by default the threshold grows to the largest block freed (up to
    32 MiB), and every thread has an arena of its own: a server parsing 1 MiB
    bodies on its request threads then keeps each thread's peak of freed
    memory resident (measured: RSS 2.5× the JSON of the tasks it holds,
    1.05× with a fixed threshold). A process-wide setting: ``housekeeping
    serve`` makes it, the library does not. A no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, threshold))


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
