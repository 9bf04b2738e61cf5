"""Shared fixtures: a Manager factory, a polling helper, and a leak check.

Tests import the helpers directly (``from conftest import TIMEOUT, wait_for``);
pytest puts this directory on ``sys.path``, which is also how the task
processes find ``animators``.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

# NOTE: task processes must line-buffer print() by themselves: a PYTHONUNBUFFERED of
# the developer's shell would hide it (under pytest a starter's stdout is a file).
os.environ.pop("PYTHONUNBUFFERED", None)

#: One generous bound, only there to turn a deadlock into a failure.
TIMEOUT = 30.0

#: How long the leak check retries before it calls a process leaked.
LEAK_GRACE = 5.0

#: ``HOUSEKEEPING_TEST_PRIVATE_PIDS=off`` runs the tests' managers and servers without
#: PID namespaces (tox runs the fault matrix and the hostile tests both ways).
PRIVATE_PIDS_OFF = os.environ.get("HOUSEKEEPING_TEST_PRIVATE_PIDS") == "off"


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = TIMEOUT,
    interval: float = 0.01,
    message: str | Callable[[], str] = "",
) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises:
        AssertionError: the predicate stayed falsy for ``timeout`` seconds; the
            message names the predicate and its last value, and every thread's
            traceback is dumped to stderr to help find a deadlock.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    dump_threads()
    extra = message() if callable(message) else message
    name = getattr(predicate, "__qualname__", repr(predicate))
    raise AssertionError(
        f"timed out after {timeout:.1f} s waiting for {name}; last value {value!r}"
        + (f"; {extra}" if extra else "")
    )


def dump_threads() -> None:
    """Write every thread's traceback to stderr (to the real one if it is captured)."""
    try:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError):  # no usable fileno() under capture
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)


TERMINAL = frozenset({"CANCELED", "FAILED", "SUCCEEDED"})


def message_texts(task: dict[str, Any]) -> list[str]:
    """The texts of a task's messages, oldest first."""
    return [entry["message"] for entry in task.get("messages") or []]


def wait_state(m: Any, task_id: str, *states: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """Poll ``m.get_task`` until the task is in one of ``states``; return the task."""
    last: dict[str, Any] = {}

    def reached() -> bool:
        last.update(m.get_task(task_id))
        return last["state"] in states

    wait_for(reached, timeout=timeout, message=lambda: f"task is {last}")
    return last


def wait_terminal(m: Any, task_id: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """Poll until the task reached a terminal state; return the task."""
    return wait_state(m, task_id, *TERMINAL, timeout=timeout)


class EventLog:
    """A subscriber that records every event with the wall time it arrived."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self.arrivals: list[float] = []

    def __call__(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(event)
            self.arrivals.append(time.time())

    def snapshot(self) -> list[dict[str, Any]]:
        """The events so far."""
        with self.lock:
            return list(self.events)

    def of(self, task_id: str) -> list[dict[str, Any]]:
        """The events of one task, in arrival order."""
        return [
            e for e in self.snapshot()
            if isinstance(e.get("task"), dict) and e["task"]["meta"]["id"] == task_id
        ]

    def has(self, task_id: str, method: str) -> bool:
        """Tell whether an event with ``method`` arrived for the task."""
        return any(e["method"] == method for e in self.of(task_id))

    def states(self, task_id: str) -> list[str]:
        """The task's successive distinct states, as the events show them."""
        seen: list[str] = []
        for event in self.of(task_id):
            state = event["task"]["state"]
            if not seen or seen[-1] != state:
                seen.append(state)
        return seen


# -- processes -----------------------------------------------------------------


def _key(proc: psutil.Process) -> tuple[int, float]:
    """Identify a process across pid reuse."""
    try:
        return (proc.pid, proc.create_time())
    except psutil.Error:
        return (proc.pid, 0.0)


def descendants() -> dict[tuple[int, float], psutil.Process]:
    """Every process below the test process, zombies included."""
    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return {}
    return {_key(p): p for p in procs}


def describe(proc: psutil.Process) -> str:
    """One line about a process, for failure messages."""
    try:
        with proc.oneshot():
            return (
                f"pid={proc.pid} ppid={proc.ppid()} status={proc.status()} "
                f"cmdline={' '.join(proc.cmdline())[:200]!r}"
            )
    except psutil.Error as exc:
        return f"pid={proc.pid} ({type(exc).__name__})"


def is_alive(proc: psutil.Process) -> bool:
    """Tell whether ``proc`` (the very process, not a reuse of its pid) still runs.

    A zombie is not alive: it has ended and only waits to be reaped.
    """
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def pids_gone(*pids: int) -> bool:
    """True once none of ``pids`` runs (a zombie has ended; a vanished pid is gone)."""
    for pid in pids:
        try:
            if is_alive(psutil.Process(pid)):
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def free_port() -> int:
    """A loopback TCP port that nothing listens on (at the time of asking)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(m: Any, task_id: str) -> dict[str, Any]:
    """Wait for a test animator's ``ready`` message; return its payload (pid, children...)."""
    import animators

    return wait_for(lambda: animators.ready_info(m.get_task(task_id)))  # type: ignore[no-any-return]


def _new_processes(
    before: dict[tuple[int, float], psutil.Process],
) -> list[psutil.Process]:
    """Processes below us that were not there before the test.

    Subtrees of processes that already existed (say, a module-scoped server
    fixture's manager forking a fresh warm process) belong to their owner, not
    to this test, so they are left out.
    """
    me = os.getpid()
    old_pids = {pid for pid, _ in before}
    new = []
    for key, proc in descendants().items():
        if key in before:
            continue
        try:
            ancestors = [p.pid for p in proc.parents()]
        except psutil.Error:
            continue
        owner_chain = ancestors[: ancestors.index(me)] if me in ancestors else ancestors
        if any(pid in old_pids or pid in SHARED_PROCESSES for pid in owner_chain):
            continue
        if proc.pid in SHARED_PROCESSES:
            continue
        new.append(proc)
    return new


def kill_processes(procs: list[psutil.Process]) -> None:
    """SIGKILL ``procs`` and reap the ones that are our children."""
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


@pytest.fixture(autouse=True)
def no_leaked_children() -> Iterator[None]:
    """Fail a test that leaves a process behind, and clean up after it."""
    before = descendants()
    yield
    deadline = time.monotonic() + LEAK_GRACE
    while True:
        leaked = _new_processes(before)
        if not leaked or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if leaked:
        lines = [describe(p) for p in leaked]
        kill_processes(leaked)
        pytest.fail(
            f"{len(leaked)} process(es) left behind after {LEAK_GRACE:.0f} s:\n  "
            + "\n  ".join(lines),
            pytrace=False,
        )


# -- managers ------------------------------------------------------------------


@pytest.fixture
def manager() -> Iterator[Callable[..., Any]]:
    """Yield a factory of Managers; every manager made is terminated afterwards.

    Defaults suit tests: a short ``cancel_grace`` and a long ``purge_delay``,
    both overridable by keyword.
    """
    from supervisor import Manager

    made: list[Manager] = []

    def make(**kwargs: Any) -> Manager:
        kwargs.setdefault("cancel_grace", 0.5)
        kwargs.setdefault("purge_delay", 60.0)
        if PRIVATE_PIDS_OFF and kwargs.get("backend") is None:
            from supervisor import Sandbox

            kwargs.setdefault("sandbox", Sandbox(private_pids=False))
        instance = Manager(**kwargs)
        made.append(instance)
        return instance

    yield make
    errors = []
    for instance in reversed(made):
        try:
            instance.terminate()
        except Exception as exc:  # terminate every one, then report
            errors.append(exc)
    if errors:
        raise errors[0]


# -- Dask ------------------------------------------------------------------------

#: Pids whose whole subtree belongs to a shared fixture, not to a test (a Dask cluster).
SHARED_PROCESSES: set[int] = set()


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[str]:
    """The address of a LocalCluster on loopback: 2 worker processes, one thread each.

    The cluster lives in a process of its own (tests/dask_cluster.py), so its
    workers, and the task processes they start, are one subtree that the leak
    check leaves to this fixture, and a test can kill a worker like any process.
    """
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    # NOTE: the scheduler and the workers import supervisor.backends.dask.worker (by reference
    # in every task) and the workers import the test animators.
    path = os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, os.path.join(here, "dask_cluster.py")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": path.rstrip(os.pathsep)},
    )
    SHARED_PROCESSES.add(proc.pid)
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().decode().strip()
        assert address.startswith("tcp://"), f"the Dask cluster did not start: {address!r}"
        yield address
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the cluster closes itself
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            kill_processes([psutil.Process(proc.pid),
                            *psutil.Process(proc.pid).children(recursive=True)])
        SHARED_PROCESSES.discard(proc.pid)


@pytest.fixture(params=["local", "dask"])
def backend_manager(
    request: pytest.FixtureRequest, manager: Callable[..., Any]
) -> Callable[..., Any]:
    """A Manager factory for the local backend and for the Dask backend (one test each)."""
    if request.param == "local":
        return manager
    from supervisor.backends.dask import DaskBackend

    address = request.getfixturevalue("dask_cluster")

    def make(**kwargs: Any) -> Any:
        kwargs.setdefault("max_workers", 2)
        return manager(backend=DaskBackend(address), **kwargs)

    return make
