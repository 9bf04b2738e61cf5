"""The work of the benchmarks, importable by every child process.

Animators for housekeeping and plain functions for its peers do the same
thing, so that what is measured is the cost of isolating, starting, stopping
and hearing from a process, not the work. Keep this module light: task
processes and forkserver children import it.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from supervisor.animator import Animator
from supervisor.states import TaskState

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from workers.ops import TaskOps

#: Upper bound of every wait in a benchmark child: nothing outlives a run by much.
CHILD_LIFETIME = 60.0
#: How often the cooperative animators look at ``is_canceled()``.
POLL = 0.01
#: Environment variable read by :func:`register_filled` (tasks to pre-fill).
FILL_ENV = "HOUSEKEEPING_BENCH_FILL"
#: The first (and only) message of :class:`Announce`.
ANNOUNCED = "started"


def _args(ops: TaskOps) -> dict[str, Any]:
    return ops.task.get("args") or {}


def _linger() -> None:
    """End a descendant: sleep (bounded), then exit without cleanup."""
    time.sleep(CHILD_LIFETIME)
    os._exit(0)


def host_pid() -> int:
    """This process's pid as the host sees it (``NSpid:``; in a PID namespace of its own
    ``os.getpid()`` is the pid inside it)."""
    from supervisor.linux import host_pids

    return host_pids()[0]


def spawn_descendants() -> list[int]:
    """Fork 3 sleeping descendants: two children and a grandchild below the second.

    Each writes its own host pid to a pipe, so the pids are the host's also
    when the caller is in a PID namespace.
    """
    read, write = os.pipe()
    for with_grandchild in (False, True):
        if os.fork() == 0:
            os.close(read)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if with_grandchild and os.fork() == 0:
                os.write(write, f"{host_pid()} ".encode())
                os.close(write)
                _linger()
            os.write(write, f"{host_pid()} ".encode())
            os.close(write)
            _linger()
    os.close(write)
    text = b""
    while len(text.split()) < 3:
        chunk = os.read(read, 64)
        if not chunk:
            break
        text += chunk
    os.close(read)
    return [int(pid) for pid in text.split()]


# -- housekeeping animators ---------------------------------------------------------


class Noop(Animator):
    """Return ``None`` at once (operation ``NOOP``)."""

    def execute(self, ops: TaskOps) -> Any:
        """Do nothing."""
        return None


class Started(Animator):
    """Return when ``execute`` began (CLOCK_MONOTONIC, comparable across processes)."""

    def execute(self, ops: TaskOps) -> Any:
        """Return the time at once."""
        return time.monotonic()


class Announce(Animator):
    """Send the message :data:`ANNOUNCED` at once; return when ``execute`` began."""

    def execute(self, ops: TaskOps) -> Any:
        """Report, then return the start time (CLOCK_MONOTONIC)."""
        began = time.monotonic()
        ops.message(ANNOUNCED)
        return began


class Cooperative(Animator):
    """Say "running <pid>", then poll ``is_canceled()`` every 10 ms until canceled."""

    def execute(self, ops: TaskOps) -> Any:
        """Wait for the cancel and honour it."""
        ops.message(f"running {host_pid()}")
        deadline = time.monotonic() + CHILD_LIFETIME
        while time.monotonic() < deadline:
            if ops.is_canceled():
                ops.set_state(TaskState.CANCELED)
            time.sleep(POLL)
        return "not canceled"


class Ticking(Animator):
    """Like :class:`Cooperative`, reporting progress on every poll (args are ignored)."""

    def execute(self, ops: TaskOps) -> Any:
        """Report progress every 10 ms until canceled."""
        ops.message(f"running {host_pid()}")
        deadline = time.monotonic() + CHILD_LIFETIME
        tick = 0
        while time.monotonic() < deadline:
            if ops.is_canceled():
                ops.set_state(TaskState.CANCELED)
            tick += 1
            ops.set_progress(percent_complete=tick % 100, transferred_bytes=tick)
            time.sleep(POLL)
        return "not canceled"


class Stubborn(Animator):
    """Ignore SIGTERM and every cancel; say "running" and sleep until killed."""

    def execute(self, ops: TaskOps) -> Any:
        """Sleep through everything but SIGKILL."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ops.message("running")
        time.sleep(CHILD_LIFETIME)
        return "not killed"


class Tree(Animator):
    """Start 3 descendants (4 processes in all), say "running", ignore the cancel."""

    def execute(self, ops: TaskOps) -> Any:
        """Sleep, with descendants, until the tree is killed."""
        pids = spawn_descendants()
        ops.message("running " + " ".join(map(str, pids)))
        time.sleep(CHILD_LIFETIME)
        return "not killed"


class Flood(Animator):
    """Call ``set_progress`` ``args.n`` times in a hot loop, then linger.

    The last call reports ``transferred_bytes=n``; lingering ``args.linger``
    seconds lets that last value reach the parent the way a value left pending
    by a loop that went quiet does, not with the final report.
    """

    def execute(self, ops: TaskOps) -> Any:
        """Flood, then return the loop's wall and CPU time and when it ended."""
        n = int(_args(ops)["n"])
        wall, cpu = time.monotonic(), time.process_time()
        for i in range(1, n + 1):
            ops.set_progress(percent_complete=i * 100 // n, transferred_bytes=i)
        last = time.monotonic()
        wall, cpu = last - wall, time.process_time() - cpu
        time.sleep(float(_args(ops).get("linger", 0.5)))
        return {"wall": wall, "cpu": cpu, "last_call": last}


def register(manager: Any) -> None:
    """Register the benchmark animators (``--animators benchmarks.animators:register``)."""
    manager.register_animator("NOOP", Noop())
    manager.register_animator("STARTED", Started())
    manager.register_animator("ANNOUNCE", Announce())
    manager.register_animator("HOLD", Cooperative())
    manager.register_animator("TICK", Ticking())
    manager.register_animator("STUBBORN", Stubborn())
    manager.register_animator("TREE", Tree())
    manager.register_animator("FLOOD", Flood())


def register_filled(manager: Any) -> None:
    """Register, then put ``$HOUSEKEEPING_BENCH_FILL`` finished tasks in the table."""
    from benchmarks.recording import fill_table


    register(manager)
    fill_table(manager, int(os.environ.get(FILL_ENV, "0")))


# -- plain functions for the peers ------------------------------------------------


def noop() -> None:
    """Return at once: a pool job."""


def started() -> float:
    """Return when the job started (CLOCK_MONOTONIC, comparable across processes)."""
    return time.monotonic()


def report(conn: Connection) -> None:
    """Send one message up the pipe and end: a bare process's whole task."""
    conn.send_bytes(b"started")
    conn.close()


def _announce(path: str, pids: list[int]) -> None:
    """Write ``pids`` to ``path`` atomically: the parent polls for the file."""
    with open(path + ".tmp", "w", encoding="ascii") as out:
        out.write(" ".join(map(str, pids)))
    os.replace(path + ".tmp", path)


def sleep_job(path: str) -> str:
    """Announce this process, then sleep: a running job to cancel."""
    _announce(path, [host_pid()])
    time.sleep(CHILD_LIFETIME)
    return "not canceled"


def tree_job(path: str) -> str:
    """Start 3 descendants, announce all 4 pids, then sleep."""
    _announce(path, [host_pid(), *spawn_descendants()])
    time.sleep(CHILD_LIFETIME)
    return "not canceled"


def tree_process(conn: Connection) -> None:
    """A bare process: own process group, 3 descendants, pids up the pipe, sleep."""
    os.setpgid(0, 0)
    conn.send([host_pid(), *spawn_descendants()])
    conn.close()
    time.sleep(CHILD_LIFETIME)


def flood_pipe(conn: Connection, n: int) -> None:
    """Send every one of ``n`` progress values up a pipe: the naive way."""
    wall, cpu = time.monotonic(), time.process_time()
    for i in range(1, n + 1):
        conn.send((i * 100 // n, i))
    last = time.monotonic()
    conn.send(("done", last - wall, time.process_time() - cpu, last))
    conn.close()


def flood_nothing(conn: Connection, n: int) -> None:
    """The same loop reporting nothing: the floor of the child's time."""
    def set_progress(*, percent_complete: int, transferred_bytes: int) -> None:
        pass

    wall, cpu = time.monotonic(), time.process_time()
    for i in range(1, n + 1):
        set_progress(percent_complete=i * 100 // n, transferred_bytes=i)
    last = time.monotonic()
    conn.send(("done", last - wall, time.process_time() - cpu, last))
    conn.close()


# -- task output -----------------------------------------------------------------

#: Every line the output benchmark writes, its "\n" included.
OUTPUT_LINE_BYTES = 100
#: Bytes per ``os.write()`` of the chunked case.
OUTPUT_CHUNK_BYTES = 64 * 1024


def output_period() -> bytes:
    """Numbered 100-byte lines, as many as fill a whole number of 64 KiB chunks
    (16,384 lines: every chunk starts where the last ended, every line is whole)."""
    count = math.lcm(OUTPUT_LINE_BYTES, OUTPUT_CHUNK_BYTES) // OUTPUT_LINE_BYTES
    body = b"x" * (OUTPUT_LINE_BYTES - 10)
    return b"".join(b"%08d %s\n" % (i, body) for i in range(count))


def write_output(fd: int, mib: int, per_line: bool, seconds: float) -> dict[str, float]:
    """Write ``mib`` MiB of 100-byte lines to ``fd`` (or stop after ``seconds``), in
    64 KiB ``os.write()`` chunks or one ``print()`` per line (then ``fd`` must be
    ``sys.stdout``'s, line-buffered); return when the writing began and ended
    (CLOCK_MONOTONIC), how long it took by ``time.perf_counter()``, and the bytes."""
    period = output_period()
    total = mib * 2**20
    written = 0
    if per_line:
        texts = [line.decode() for line in period.split(b"\n")[:-1]]
        left = total // OUTPUT_LINE_BYTES
        began, start = time.monotonic(), time.perf_counter()
        deadline = start + seconds
        while left and time.perf_counter() < deadline:
            index = written // OUTPUT_LINE_BYTES % len(texts)
            count = min(1024, left)  # NOTE: 16,384 texts: a batch never wraps
            for text in texts[index:index + count]:
                print(text)
            written += count * OUTPUT_LINE_BYTES
            left -= count
        sys.stdout.flush()
    else:
        view = memoryview(period)
        began, start = time.monotonic(), time.perf_counter()
        deadline = start + seconds
        while written < total and time.perf_counter() < deadline:
            offset = written % len(view)
            size = min(OUTPUT_CHUNK_BYTES, total - written, len(view) - offset)
            written += os.write(fd, view[offset:offset + size])
    elapsed = time.perf_counter() - start
    return {"began": began, "ended": time.monotonic(), "seconds": elapsed,
            "bytes": written}


class Output(Animator):
    """Write ``args.mib`` MiB of 100-byte lines to stdout, for at most ``args.seconds``
    (``args.per_line``: by ``print()``, else in 64 KiB ``os.write()`` chunks); return
    :func:`write_output`'s figures."""

    def execute(self, ops: TaskOps) -> Any:
        """Write, timing only the writing."""
        args = _args(ops)
        return write_output(1, int(args.get("mib", 1)), bool(args.get("per_line", False)),
                            float(args.get("seconds", CHILD_LIFETIME)))


def output_process(conn: Connection, fd: int, mib: int, per_line: bool,
                   seconds: float) -> None:
    """A bare process: make ``fd`` its stdout, write as :class:`Output` does, send the
    figures up ``conn``."""
    sys.stdout.flush()
    os.dup2(fd, 1)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    conn.send(write_output(1, mib, per_line, seconds))
    conn.close()
