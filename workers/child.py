"""The task process: waits warm for its task, runs the animator once, reports, exits.

A warm process is forked by the starter (``workers.starter``) before any task
needs it. It puts itself in a process group of its own and becomes a child
subreaper, so that every process the task starts -- even a daemon that
double-forks and calls ``setsid()`` -- stays below it where a tree kill finds
it. It then blocks on its pipe until the parent hands it a :class:`Start`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import resource
import signal
import sys
from collections.abc import Iterator
from typing import Any

from supervisor.linux import PR_SET_CHILD_SUBREAPER, host_pids, prctl
from supervisor.outcome import OutcomeKind
from supervisor.protocol import Finished, Ready, Start, decode, encode
from supervisor.states import TaskState
from workers.confine import confine
from workers.execution import execute, failure
from workers.ops import TaskOps
from workers.pipe import TaskPipe

EXIT_OK = 0  # the final report was sent
EXIT_NO_TASK = 0  # the parent closed the pipe before handing over a task
EXIT_BAD_START = 70  # the Start message could not be read


class Terminated(BaseException):
    """Raised in the task process when it receives SIGTERM."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated("terminated by SIGTERM")


def run_warm_process(fd: int, stdout: int, stderr: int) -> int:
    """Run one task process on pipe ``fd``, writing to ``stdout`` and ``stderr`` (the
    write ends of its output pipes); return its exit code."""
    _capture_output(stdout, stderr)
    # NOTE: nothing of the starter (or an init) may reach the task: every
    # descriptor but the pipe and the standard streams is closed.
    os.closerange(3, fd)
    os.closerange(fd + 1, 1 << 20)
    os.setpgid(0, 0)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # NOTE: the pipe came through SCM_RIGHTS without close-on-exec; a program
    # the task execs (os.posix_spawn, os.exec*) must not inherit it.
    os.set_inheritable(fd, False)
    conn = TaskPipe(fd)
    try:
        # NOTE: the host's view of the pid: in a PID namespace getpid() is 2.
        conn.send_bytes(encode(Ready(*host_pids())))
        _rehearse(conn)
        data = conn.recv_bytes()
    except (EOFError, OSError, Terminated):
        return EXIT_NO_TASK
    try:
        start = decode(data)
        if not isinstance(start, Start):
            return EXIT_BAD_START
        return run_task(start, conn)
    except Terminated:
        return EXIT_NO_TASK


class _Rehearsal:
    """A do-nothing animator, run once by :func:`_rehearse`."""

    def execute(self, ops: object) -> None:
        return None


#: A task as the parent sends it, with every field a real one has.
_REHEARSED_TASK = json.dumps({
    "meta": {"id": "T0", "objType": "Task", "version": 2, "timeCreated": "x",
             "timeModified": "x"},
    "operation": "OP", "objectId": "", "serviceStates": {}, "args": {"n": 1},
    "state": "ACTIVE", "cancelRequested": False, "messages": [], "progress": None,
    "result": None}).encode()


def _rehearse(conn: TaskPipe) -> None:
    """Walk the start path once with a stand-in task while the process waits warm.

    NOTE: after the fork every page the task's start first writes (an object's
    reference count is a write) is copied, a few hundred of them, on the
    start path. Touched here, between ``Ready`` and ``Start``, they are
    copied while nobody waits; the real start then finds them private.
    """
    with contextlib.suppress(Exception):
        start = decode(encode(Start(_REHEARSED_TASK, pickle.dumps(_Rehearsal()),
                                    tuple(sys.path), None, None)))
        assert isinstance(start, Start)
        TaskOps(json.loads(start.task_json), conn)
        animator = pickle.loads(start.animator)
        encode(execute(animator, None))


def prepare_output() -> None:
    """Make, once and ahead of the forks (in the starter), the objects every task
    process's output needs: line-buffered streams on fds 1 and 2 and the
    handler of ``logging``'s last resort.

    NOTE: made per task process they cost a few hundred page copies after each
    fork (a fifth of its start-up); made here they are shared until written.
    """
    global _PREPARED
    if _PREPARED is None:
        handler = logging.StreamHandler(_line_buffered(2))
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        _PREPARED = (_line_buffered(1), handler.stream, handler)
        # NOTE: here too: setLevel clears every logger's cache (the starter's own
        # records still stop at the default last resort, which wants WARNING)
        logging.getLogger().setLevel(logging.INFO)


_PREPARED: tuple[io.TextIOWrapper, io.TextIOWrapper, logging.StreamHandler[Any]] | None = None


def _capture_output(stdout: int, stderr: int) -> None:
    """Make the output pipes fd 1 and 2 (inherited by all the task starts), line-buffer
    ``print``, and send ``logging`` records of INFO and above to stderr unless the
    animator configures logging itself (``lastResort`` serves only then)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()  # NOTE: what the starter buffered is not the task's
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    prepare_output()
    assert _PREPARED is not None
    # NOTE: new streams, not reconfigure(): a stream made over a regular file (the
    # starter's stdout may be one) took itself for seekable, and reconfigure() then
    # fails with ESPIPE on the pipe, leaving print() block-buffered.
    sys.stdout, sys.stderr, logging.lastResort = _PREPARED


def _line_buffered(fd: int) -> io.TextIOWrapper:
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8",
                            errors="backslashreplace", line_buffering=True)


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def run_task(start: Start, conn: TaskPipe) -> int:
    """Prepare the process for ``start``, run the animator, send the final report."""
    ops = TaskOps(json.loads(start.task_json), conn)
    os.register_at_fork(after_in_child=ops.detach)
    try:
        final = _execute(start, ops)
    except Terminated as exc:
        final = Finished(TaskState.FAILED.value, reason=str(exc), error_type="Terminated",
                         kind=OutcomeKind.CRASH.value)
    _flush_output()  # NOTE: the process ends with os._exit, which flushes nothing
    ops.send_final(final)
    with contextlib.suppress(OSError):  # an animator may have closed it
        conn.close()
    return EXIT_OK


#: True while animator code is imported for tasks (in the starter, or in a task
#: process before its animator runs): a Manager made at import time there (the
#: main script's unguarded top-level code, say) would start a starter that
#: imports the same code again, without end. ``Manager`` refuses meanwhile, as
#: multiprocessing does in its children.
importing_for_tasks = False


@contextlib.contextmanager
def imports_for_tasks() -> Iterator[None]:
    """Mark animator imports (see :data:`importing_for_tasks`)."""
    global importing_for_tasks
    importing_for_tasks = True
    try:
        yield
    finally:
        importing_for_tasks = False


def import_main(path: str) -> None:
    """Import the supervisor's main script as ``__mp_main__`` (what an animator
    defined in ``__main__`` is unpickled from), unless this process has it: the
    starter imports it once, and the processes it forks inherit it."""
    from multiprocessing.spawn import import_main_path

    import_main_path(path)


def _prepare(start: Start) -> Any:
    """Apply sys.path, the memory limit and the main module; unpickle the animator."""
    sys.path[:] = list(start.sys_path)
    with imports_for_tasks():
        if start.main_path:
            import_main(start.main_path)
        if start.max_memory:
            resource.setrlimit(resource.RLIMIT_AS, (start.max_memory, start.max_memory))
        animator = pickle.loads(start.animator)
    confine(start)  # NOTE: after the imports: the new user may not read them
    return animator


def _execute(start: Start, ops: TaskOps) -> Finished:
    """Prepare the process for ``start`` and run ``execute`` (see :mod:`workers.execution`)."""
    try:
        animator = _prepare(start)
    except BaseException as exc:  # NOTE: an animator that cannot even load failed
        return failure(exc)
    return execute(animator, ops, passing=(Terminated,))
