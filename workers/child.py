"""The task process: waits warm for its task, runs the animator once, reports, exits.

A warm process is forked by the starter (``workers.starter``) before any task
needs it. It puts itself in a process group of its own and becomes a child
subreaper, so that every process the task starts -- even a daemon that
double-forks and calls ``setsid()`` -- stays below it where a tree kill finds
it. It then blocks on its pipe until the parent hands it a :class:`Start`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import json
import logging
import os
import pickle
import resource
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

import uvloop  # imported here, in the starter, so that forks inherit it

from supervisor.linux import PR_SET_CHILD_SUBREAPER, host_pids, prctl
from supervisor.protocol import (
    MAX_JSON_DEPTH,
    MAX_RESULT_BYTES,
    Finished,
    Ready,
    Start,
    decode,
    encode,
    json_depth,
)
from supervisor.states import TaskState
from workers.confine import confine
from workers.ops import TaskEnded, TaskOps

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
    conn = Connection(fd)
    try:
        # NOTE: the host's view of the pid: in a PID namespace getpid() is 2.
        conn.send_bytes(encode(Ready(*host_pids())))
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


def _capture_output(stdout: int, stderr: int) -> None:
    """Make the output pipes fd 1 and 2 (inherited by all the task starts), line-buffer
    ``print``, and send ``logging`` records of INFO and above to stderr unless the
    animator configures logging itself (``lastResort`` serves only then)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()  # NOTE: what the starter buffered is not the task's
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    # NOTE: new streams, not reconfigure(): a stream made over a regular file (the
    # starter's stdout may be one) took itself for seekable, and reconfigure() then
    # fails with ESPIPE on the pipe, leaving print() block-buffered.
    sys.stdout = _line_buffered(1)
    sys.stderr = _line_buffered(2)
    handler = logging.StreamHandler()  # NOTE: on sys.stderr, now fd 2
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.lastResort = handler
    logging.getLogger().setLevel(logging.INFO)


def _line_buffered(fd: int) -> io.TextIOWrapper:
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8",
                            errors="backslashreplace", line_buffering=True)


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def run_task(start: Start, conn: Connection) -> int:
    """Prepare the process for ``start``, run the animator, send the final report."""
    ops = TaskOps(json.loads(start.task_json), conn)
    os.register_at_fork(after_in_child=ops.detach)
    try:
        final = _execute(start, ops)
    except Terminated as exc:
        final = Finished(TaskState.FAILED.value, reason=str(exc), error_type="Terminated")
    _flush_output()  # NOTE: the process ends with os._exit, which flushes nothing
    ops.send_final(final)
    with contextlib.suppress(OSError):  # an animator may have closed it
        conn.close()
    return EXIT_OK


def _prepare(start: Start) -> Any:
    """Apply sys.path, the memory limit and the main module; unpickle the animator."""
    sys.path[:] = list(start.sys_path)
    if start.main_path:
        from multiprocessing.spawn import import_main_path

        import_main_path(start.main_path)
    if start.max_memory:
        resource.setrlimit(resource.RLIMIT_AS, (start.max_memory, start.max_memory))
    animator = pickle.loads(start.animator)
    confine(start)  # NOTE: after the imports: the new user may not read them
    return animator


def _execute(start: Start, ops: TaskOps) -> Finished:
    """Run ``execute`` and turn whatever happens into the final report."""
    try:
        animator = _prepare(start)
        if inspect.iscoroutinefunction(animator.execute):
            result = _run_async(animator, ops)
        else:
            result = animator.execute(ops)
    except TaskEnded as ended:
        reason = None
        if ended.state is TaskState.FAILED:
            reason = "the animator set the state FAILED"
        elif ended.state is TaskState.CANCELED:
            reason = "the animator honoured the cancel"
        return Finished(ended.state.value, reason=reason)
    except _CanceledAtAwait:
        return Finished(TaskState.CANCELED.value, reason="canceled at an await point")
    except Terminated:
        raise
    except BaseException as exc:  # every failure becomes a report, SystemExit too
        return Finished(
            TaskState.FAILED.value,
            reason=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(exc)),
            error_type=type(exc).__name__,
        )
    return _encode_result(result)


def _encode_result(result: Any) -> Finished:
    """Check that the result is JSON of at most 1 MiB; else the task FAILED."""
    try:
        text = json.dumps(result, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        return Finished(
            TaskState.FAILED.value,
            reason=f"result is not JSON-serializable: {type(exc).__name__}: {exc}",
            error_type="ResultError",
        )
    if len(text) > MAX_RESULT_BYTES:
        return Finished(
            TaskState.FAILED.value,
            reason=f"result too large: {len(text)} bytes of JSON (limit {MAX_RESULT_BYTES})",
            error_type="ResultError",
        )
    # NOTE: the parent refuses deeper results as a protocol error; say it here first.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and json_depth(result) > MAX_JSON_DEPTH:
        return Finished(
            TaskState.FAILED.value,
            reason=f"result nested more than {MAX_JSON_DEPTH} levels deep",
            error_type="ResultError",
        )
    return Finished(TaskState.SUCCEEDED.value, result_json=text)


class _CanceledAtAwait(Exception):
    """The asyncio task of ``execute`` was canceled because the task was."""


def _run_async(animator: Any, ops: TaskOps) -> Any:
    """Run an ``async def execute`` on uvloop; a cancel cancels its asyncio task."""
    async def main() -> Any:
        loop = asyncio.get_running_loop()
        inner = asyncio.ensure_future(animator.execute(ops))
        ops.set_cancel_hook(inner.cancel)
        fileno = ops.pipe_fileno()

        def on_readable() -> None:
            ops.receive()
            if ops.parent_gone:
                loop.remove_reader(fileno)

        loop.add_reader(fileno, on_readable)
        try:
            return await inner
        except asyncio.CancelledError:
            if ops.is_canceled():
                raise _CanceledAtAwait() from None
            raise
        finally:
            loop.remove_reader(fileno)
            ops.set_cancel_hook(None)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())

