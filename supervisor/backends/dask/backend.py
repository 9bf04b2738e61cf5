"""The Dask backend: run tasks on the workers of a Dask distributed cluster.

Each task becomes one Dask task whose body,
:func:`supervisor.backends.dask.worker.run_task_on_worker`, runs the animator
through a Manager of the worker's own (the local backend),
so a task gets on the worker what it gets here: a process of its own, its
``timeout`` and ``max_memory``, crash detection and a whole-tree kill.

Channels, Dask's own and one scheduler plugin (``distributed`` is imported only
by this subpackage; install it with ``pip install housekeeping-supervisor[dask]``):

* reports: the worker's ``log_event`` on one topic per supervisor, which the
  client subscribes to; ordered per task, the outcome last;
* claims and cancels: a scheduler plugin of this package
  (:mod:`supervisor.backends.dask.claims`) that a run asks, in one round trip,
  whether it may start (not canceled, not a second run), and that passes a
  cancel on to the worker that claimed the task; the worker side tells its
  task process, waits ``cancel_grace``, kills the tree and reports CANCELED;
* the outcome: the last report, and the Dask future's result (what counts
  when the report cannot come: a large result, a failed or lost run), which
  is then recorded only after every report sent before it;
* a lease: a ``distributed.Variable`` this supervisor renews every
  ``heartbeat`` seconds; a worker that sees no renewal for ``lease_timeout``
  seconds kills its task's tree (the supervisor died without terminating).

A monitor thread renews the lease, checks that the scheduler answers and that
the worker of every running task is still in the cluster, and once per
heartbeat releases the futures of the tasks done with and tells the plugin
which records it may forget (per task, these would share the client's
batched stream with the next submit).

:func:`local_cluster` (``DaskBackend.local``) starts a cluster on loopback that
opens no HTTP port (Dask's dashboard, ``/metrics``, ``/health``) unless a
dashboard address is given.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dask
import dask.system
import distributed
import distributed.worker_memory

from supervisor.backend import Backend, Host, Launch, Registration
from supervisor.backends.dask import claims
from supervisor.backends.dask.worker import run_task_on_worker
from supervisor.consts import CONSTS
from supervisor.outcome import Ending, Outcome, OutcomeKind, Usage
from supervisor.protocol import (
    Note,
    Progress,
    ProtocolError,
    StateChanged,
    check_result_json,
)
from supervisor.states import TaskState
from supervisor.tasklog import STREAMS
from supervisor.wire import PROGRESS_NAMES, parse_stamp

log = logging.getLogger("housekeeping.dask")

#: Log lines taken from one report (the worker sends at most LOG_BATCH_LINES).
_MAX_LOG_BATCH = 10_000
#: Cancels still to send (the scheduler did not answer): tasks canceled, and tasks
#: that ended here without their worker side's word; beyond it the oldest are dropped.
MAX_ORPHANS = 10_000
#: Keys sent per call to the scheduler (cancels, and the tasks it may forget).
_KEYS_PER_CALL = 1000
#: Tasks done with whose records the scheduler is still to forget; beyond it
#: the oldest are left there (the plugin bounds its records).
MAX_FORGET = 100_000
#: Why distributed cancels every future of a client that lost the scheduler.
_CONNECTION_LOST = "scheduler-connection-lost"


@dataclass
class _Remote:
    """The supervisor's view of one task on the cluster."""

    key: str
    future: Any = None
    worker: str | None = None
    lost_worker: str | None = None  #: a worker that died running it (rerun allowed)
    received: int = 0  #: reports received so far
    ending: Ending | None = None  #: known, waiting for reports still in flight
    expected: int = 0  #: reports the worker side sent in all
    canceled: bool = False
    rerun: bool = False  #: Dask may run it again if its worker dies (the animator opted in)
    confirmed: bool = False  #: the outcome came from the worker side
    worker_since: float = 0.0  #: when ``worker`` was learned (time.monotonic())
    timer: asyncio.TimerHandle | None = None


class _Orphans:
    """Cancels still to send to the scheduler, oldest first (any thread).

    Tasks canceled while the scheduler did not answer, and tasks that ended
    here without word from their worker side, which may still run them (an
    outage, a lost report): once sent, the scheduler passes the cancel on to
    the worker, or keeps the key as canceled so that a late (re-)run refuses.
    Bounded: keys beyond ``limit`` drop the oldest (logged).
    """

    def __init__(self, limit: int = MAX_ORPHANS) -> None:
        self._lock = threading.Lock()
        self._pending: deque[str] = deque()
        self._limit = limit
        self.dropped = 0  #: dropped, oldest first

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def add(self, key: str) -> None:
        """A task's Dask key, to send the cancel of."""
        with self._lock:
            self._pending.append(key)
            self._trim()

    def take(self, count: int) -> list[str]:
        """Up to ``count`` pending ones, oldest first; :meth:`put_back` those not sent."""
        with self._lock:
            return [self._pending.popleft() for _ in range(min(count, len(self._pending)))]

    def put_back(self, keys: list[str]) -> None:
        """Pending again, before the others (the oldest, if they are too many)."""
        with self._lock:
            self._pending.extendleft(reversed(keys))
            self._trim()

    def _trim(self) -> None:
        excess = len(self._pending) - self._limit
        if excess > 0:
            for _ in range(excess):
                self._pending.popleft()
            self.dropped += excess
            log.warning("%d cancels of tasks on the Dask cluster could not be sent; "
                        "dropped the oldest %d (%d in all)",
                        len(self._pending) + excess, excess, self.dropped)


class _QuietScheduler(distributed.Scheduler):
    """A scheduler that opens an HTTP port only when given a dashboard address.

    NOTE: distributed's scheduler always serves HTTP (its dashboard, /metrics,
    /health), on 8787 when no address is given.
    """

    def start_http_server(self, routes: Any, dashboard_address: Any, default_port: int = 0,
                          ssl_options: Any = None) -> None:
        if dashboard_address is not None:
            super().start_http_server(routes, dashboard_address, default_port, ssl_options)


class _QuietWorker(distributed.Worker):
    """A worker that opens no HTTP port (distributed's opens one for /metrics and
    /health on a free port, and calls it its dashboard)."""

    def start_http_server(self, routes: Any, dashboard_address: Any, default_port: int = 0,
                          ssl_options: Any = None) -> None:
        if dashboard_address is not None:
            super().start_http_server(routes, dashboard_address, default_port, ssl_options)


def local_cluster(n_workers: int | None = None,
                  dashboard_address: str | None = None) -> distributed.SpecCluster:
    """A cluster on loopback like ``LocalCluster(threads_per_worker=1,
    processes=True, host="127.0.0.1")``: ``n_workers`` worker processes (default:
    one per CPU), one thread each, each watched by a nanny.

    It opens no port but Dask's own connections: the scheduler serves HTTP (Dask's
    dashboard, which needs bokeh, /metrics, /health) only at ``dashboard_address``
    (``"HOST:PORT"``), the workers never do.
    """
    count = n_workers or int(dask.system.CPU_COUNT)
    memory_limit = distributed.worker_memory.parse_memory_limit("auto", 1, count, logger=log)
    worker = {"cls": distributed.Nanny, "options": {
        "host": "127.0.0.1", "nthreads": 1, "memory_limit": memory_limit,
        "worker_class": _QuietWorker, "dashboard": False, "dashboard_address": None,
        "silence_logs": logging.WARNING,
    }}
    scheduler = {"cls": _QuietScheduler, "options": {
        "host": "127.0.0.1", "port": 0, "protocol": "tcp://",
        "dashboard": dashboard_address is not None, "dashboard_address": dashboard_address,
    }}
    # NOTE: without the proxy route (to workers' dashboards, which there are
    # none of) distributed does not log a hint to install jupyter-server-proxy.
    routes = [route for route in dask.config.get("distributed.scheduler.http.routes")
              if route != "distributed.http.proxy"]
    with dask.config.set({"distributed.scheduler.http.routes": routes}):
        cluster = distributed.SpecCluster(
            workers={index: worker for index in range(count)}, scheduler=scheduler,
            worker=worker, silence_logs=logging.WARNING,
        )
    return cluster


class DaskBackend(Backend):
    """Run every task on a Dask cluster, each in a process of its own on a worker.

    Args:
        address: the scheduler's address, e.g. ``"tcp://10.0.0.5:8786"``, or a
            ``distributed.LocalCluster`` (or any cluster object with an address).
        heartbeat: seconds between renewals of the lease and checks of the cluster.
        lease_timeout: seconds without a renewal after which workers kill this
            supervisor's task trees.
        unreachable_after: seconds without an answer from the scheduler after
            which running tasks fail and new ones are refused.
        connect_timeout: seconds to wait for the scheduler when connecting.

    Raises:
        OSError: the scheduler cannot be reached.
    """

    #: NOTE: a task handed to Dask waits in its queue, then on a worker: it is
    #: NEW until its task process runs there (its first report says so).
    starts_running = False

    def __init__(
        self,
        address: Any,
        *,
        heartbeat: float = 1.0,
        lease_timeout: float = 6.0,
        unreachable_after: float = 3.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self._cluster: Any = None
        if not isinstance(address, str):
            self._cluster = address
            address = address.scheduler_address
        self.address: str = address
        self.heartbeat = heartbeat
        self.lease_timeout = lease_timeout
        self.unreachable_after = unreachable_after
        self._connect_timeout = connect_timeout
        self._owns_cluster = False
        self._id = uuid.uuid4().hex[:12]
        self._topic = f"housekeeping-{self._id}"
        self._lease_name = f"housekeeping-lease-{self._id}"
        self._tasks: dict[str, _Remote] = {}
        self._unavailable: str | None = None
        self._submit_failed = False  #: until the scheduler answers again
        self._orphans = _Orphans()  #: cancels sent once the scheduler answers
        #: tasks done with: their futures, released by the monitor (all at once),
        #: and the keys whose records the scheduler may forget (None: it may not)
        self._done: deque[tuple[str | None, Any]] = deque()
        #: keys released, then (a round later) forgotten by the scheduler
        self._released: deque[str] = deque(maxlen=MAX_FORGET)
        self._forget: deque[str] = deque(maxlen=MAX_FORGET)
        self._stopping = threading.Event()
        self._close_lock = threading.Lock()
        self._closed = False
        #: guards the client and the lease, which the monitor replaces when the
        #: client gives up reconnecting, and whether it may still do so.
        self._link_lock = threading.Lock()
        self._linked = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # NOTE: one thread for calls to the scheduler made on the loop's
        # behalf (cancel, clean-up): they keep their order and never block it.
        self._calls = concurrent.futures.ThreadPoolExecutor(1, "housekeeping-dask-call")
        self._monitor: threading.Thread | None = None
        self._scheduler_id: str | None = None
        self._client = self._connect()
        self._lease = distributed.Variable(self._lease_name, client=self._client)
        self._lease_count = 0
        self._lease.set(self._lease_count)

    @classmethod
    def local(cls, n_workers: int | None = None, *, dashboard_address: str | None = None,
              **options: Any) -> DaskBackend:
        """Start a cluster on loopback (:func:`local_cluster`: worker processes, one
        thread each, Dask's dashboard only at ``dashboard_address``) and run tasks
        on it; the cluster stops with the manager."""
        cluster = local_cluster(n_workers, dashboard_address)
        if dashboard_address is not None:
            log.info("the Dask dashboard is at %s", cluster.dashboard_link)
        try:
            backend = cls(cluster, **options)
        except BaseException:
            cluster.close()
            raise
        backend._owns_cluster = True
        return backend

    def _connect(self) -> distributed.Client:
        client = distributed.Client(
            self.address, set_as_default=False, timeout=self._connect_timeout
        )
        try:
            claims.register(client)
            #: the scheduler that has the plugin and the subscription (see the monitor)
            self._scheduler_id = client.scheduler_info().get("id")
        except BaseException:
            client.close()
            raise
        client.subscribe_topic(self._topic, self._on_event)
        return client

    # -- Backend --------------------------------------------------------------

    async def open(self, host: Host) -> None:
        self._host = host
        self._loop = asyncio.get_running_loop()
        self._monitor = threading.Thread(
            target=self._watch_cluster, name="housekeeping-dask-monitor", daemon=True
        )
        self._monitor.start()

    def _current(self) -> distributed.Client:
        """The client (the monitor may replace it at any time)."""
        with self._link_lock:
            return self._client

    def default_max_workers(self) -> int | None:
        """The cluster's worker threads when the manager starts."""
        workers = self._current().scheduler_info()["workers"].values()
        return sum(int(worker.get("nthreads", 1)) for worker in workers) or None

    def unavailable(self) -> str | None:
        return self._unavailable

    def can_start(self, registration: Registration) -> bool:
        return self._unavailable is None and not self._submit_failed

    def start(self, launch: Launch) -> bool:
        registration = launch.registration
        key = f"housekeeping-{self._id}-{launch.task_id}"
        remote = _Remote(key, rerun=bool(getattr(registration.animator,
                                                 "rerun_on_worker_loss", False)))
        task = launch.task
        create = {name: task[name] for name in
                  ("operation", "objectId", "serviceStates", "args") if name in task}
        spec = {
            "task_id": launch.task_id,
            "key": key,
            "create": create,
            "operation": task["operation"],
            "animator": registration.pickled,
            "timeout": registration.timeout,
            "max_memory": registration.max_memory,
            # NOTE: as asked for: the worker's machine decides what it can apply
            "sandbox": (registration.requested_sandbox or registration.sandbox).to_dict(),
            "cancel_grace": self.host.cancel_grace,
            "topic": self._topic,
            "lease": self._lease_name,
            "lease_timeout": self.lease_timeout,
            "rerun": remote.rerun,
        }
        try:
            remote.future = self._current().submit(
                run_task_on_worker, spec, key=key, pure=False, retries=0
            )
        except Exception as exc:  # the client is closed: the scheduler is gone
            log.error("task %s: cannot submit to the Dask scheduler: %s", launch.task_id, exc)
            # NOTE: no more starts until the monitor hears from the scheduler
            # again (or gives up on it and fails the queue).
            self._submit_failed = True
            return False
        self._tasks[launch.task_id] = remote
        self._idle.clear()
        remote.future.add_done_callback(lambda future: self._on_done(launch.task_id, future))
        log.info("task %s submitted to the Dask cluster at %s", launch.task_id, self.address)
        return True

    def cancel(self, task_id: str) -> None:
        remote = self._tasks.get(task_id)
        if remote is None or remote.canceled:
            return
        remote.canceled = True
        future = remote.future
        self._call(lambda: self._send_cancel(remote.key, future))

    def _send_cancel(self, key: str, future: Any) -> None:
        """Cancel a task through the scheduler (off the loop): on the worker that
        claimed it, or, not claimed yet, before it runs and in Dask's queue."""
        try:
            answer = self._cancel_keys(self._current(), [key])
        except Exception as exc:
            log.debug("cannot send the cancel of %s yet: %s", key, exc)
            self._orphans.add(key)  # sent again once the scheduler answers
            return
        if answer.get(key) == "queued" and future is not None:
            # NOTE: no worker claimed it: take it off Dask's queue (a run that
            # starts meanwhile refuses); it ends CANCELED from NEW
            future.cancel()

    def _cancel_keys(self, client: distributed.Client, keys: list[str]) -> dict[str, str]:
        scheduler = client.scheduler
        assert scheduler is not None
        answer = claims.ask(lambda: client.sync(
            scheduler.housekeeping_cancel, keys=keys, callback_timeout=self.heartbeat * 2),
            client)
        if not isinstance(answer, dict):
            raise RuntimeError("the scheduler does not keep housekeeping's task claims")
        return answer

    def kill(self, task_id: str, reason: str) -> None:
        """Tell the worker side to end the task (as :meth:`cancel`).

        NOTE: the worker side has one channel for this (the cancel): it kills
        the tree after this supervisor's cancel grace, or at once when this
        supervisor's lease expires. The outcome is the worker's.
        """
        log.info("task %s: kill asked (%s); the Dask worker ends it as a cancel",
                 task_id, reason)
        self.cancel(task_id)

    async def shutdown(self) -> None:
        """Cancel every remote task, wait for the workers to end them; stop."""
        try:
            for task_id in list(self._tasks):
                self.cancel(task_id)
            if self._tasks:
                try:
                    await asyncio.wait_for(
                        self._idle.wait(), self.host.cancel_grace + CONSTS.dask_shutdown_slack
                    )
                except TimeoutError:
                    pass
            for task_id, remote in list(self._tasks.items()):
                # NOTE: unconfirmed (say, the worker is unreachable): the
                # worker side kills the tree once the lease expires.
                remote.ending = Ending(Outcome(
                    OutcomeKind.CANCELED_TERMINATE,
                    f"the manager is terminating; the Dask worker did not confirm the end, "
                    f"its tree is killed when the lease expires ({self.lease_timeout:g} s)"))
                self._finish(task_id)
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self._close)

    def kill_everything(self) -> None:
        self._stopping.set()
        self._close()

    # -- reports and outcomes (loop thread) -----------------------------------

    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        """A report from a worker (on the client's thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_report, event[1])

    def _on_report(self, message: dict[str, Any]) -> None:
        task_id = message.get("t")
        remote = self._tasks.get(task_id) if isinstance(task_id, str) else None
        if remote is None or task_id is None:
            return
        remote.received += 1
        if "run" in message:  # the first report of a run, from this worker
            remote.received = 1
            remote.worker = str(message["run"])
            remote.worker_since = time.monotonic()
        if "end" in message:
            # NOTE: the last report of the run: every earlier one came before it
            self._on_end(task_id, remote, message["end"])
            return
        reports: list[Progress | StateChanged | Note] = [
            Note(str(text)) for text in message.get("notes", ())]
        if "state" in message:
            reports.append(StateChanged(str(message["state"])))
        if "progress" in message:
            reports.append(_progress(message["progress"]))
        self._take_log(task_id, message.get("log"))
        for report in reports:
            error = self.host.task_message(task_id, report)
            if error is not None:
                log.error("task %s: bad report from the Dask worker: %s", task_id, error)
        if remote.ending is not None and remote.received >= remote.expected:
            self._finish(task_id)

    def _take_log(self, task_id: str, lines: Any) -> None:
        """Hand a batch of the worker's log lines (``[[stream, time, text], ...]``) to
        the host, consecutive lines of one stream and time together."""
        if not isinstance(lines, list | tuple):  # NOTE: msgpack may hand back tuples
            return
        run: list[str] = []
        key: tuple[str, str] | None = None
        for line in lines[:_MAX_LOG_BATCH]:
            if not (isinstance(line, list | tuple) and len(line) == 3
                    and line[0] in STREAMS and all(isinstance(x, str) for x in line)):
                continue
            if (line[0], line[1]) != key:
                self._log_run(task_id, key, run)
                key, run = (line[0], line[1]), []
            run.append(line[2])
        self._log_run(task_id, key, run)

    def _log_run(self, task_id: str, key: tuple[str, str] | None, texts: list[str]) -> None:
        if key is None or not texts:
            return
        when = parse_stamp(key[1])
        self.host.task_output_lines(task_id, key[0], texts,
                                    time.time() if when is None else when)

    def _on_end(self, task_id: str, remote: _Remote, payload: Any) -> None:
        """The worker side's outcome, as its last report (the future's result may
        have come first: then this is the report it waited for)."""
        if remote.ending is None and not isinstance(payload, dict):
            remote.ending = Ending(Outcome(
                OutcomeKind.PROTOCOL, "protocol error: a bad outcome from the Dask worker"))
        elif remote.ending is None:
            remote.worker = str(payload.get("worker") or remote.worker)
            remote.confirmed = True
            remote.ending = _ending(payload)
        self._finish(task_id)

    def _on_done(self, task_id: str, future: Any) -> None:
        """The Dask future is done (on Dask's callback thread): fetch the outcome."""
        remote = self._tasks.get(task_id)
        if remote is None or remote.ending is not None:
            return  # NOTE: done with already (its last report): no fetch from the worker
        try:
            payload: Any = future.result()
            error: BaseException | None = None
        except BaseException as exc:  # every failure becomes an outcome
            payload, error = None, exc
        # NOTE: why distributed canceled it, as it said when it did: the client's
        # status, read any later, may be "running" again (a reconnect takes ms).
        canceled = _cancel_reason(error)
        if self._loop is not None and not self._loop.is_closed():
            self._soon(self._on_outcome, task_id, payload, error, canceled)

    def _on_outcome(self, task_id: str, payload: Any, error: BaseException | None,
                    canceled: str | None) -> None:
        """Classify the end of a task's future (``canceled``: why Dask canceled it)."""
        remote = self._tasks.get(task_id)
        if remote is None or remote.ending is not None:
            return
        if canceled == _CONNECTION_LOST:
            # NOTE: the client cancels every future when it loses the scheduler.
            self._set_unavailable(f"the Dask scheduler at {self.address} is unreachable "
                                  f"(the connection was lost)")
            return
        if canceled is not None and remote.canceled:
            remote.ending = Ending(Outcome(
                OutcomeKind.CANCELED_QUEUED, "canceled before it started on a Dask worker"))
        elif canceled is not None:
            why = "" if canceled in ("", "unknown") else f" ({canceled})"
            remote.ending = Ending(Outcome(
                OutcomeKind.LOST, f"the Dask cluster canceled the task{why}"))
        elif error is not None or not isinstance(payload, dict):
            remote.ending = Ending(self._failure(remote, error))
        elif payload.get("retry"):
            remote.ending = Ending(self._worker_lost(remote))
        else:
            remote.worker = payload.get("worker") or remote.worker
            remote.confirmed = True
            remote.ending = _ending(payload)
        remote.expected = int(payload.get("sent", 0)) if isinstance(payload, dict) else 0
        if remote.received >= remote.expected:
            self._finish(task_id)
        else:
            # NOTE: reports travel on another channel; wait for them, not forever.
            assert self._loop is not None
            remote.timer = self._loop.call_later(CONSTS.dask_reports_wait, self._reports_late,
                                                 task_id)

    def _reports_late(self, task_id: str) -> None:
        remote = self._tasks.get(task_id)
        if remote is not None:
            log.warning("task %s: %d of %d reports arrived within %g s; recording its "
                        "outcome without the rest", task_id, remote.received, remote.expected,
                        CONSTS.dask_reports_wait)
            self._finish(task_id)

    def _failure(self, remote: _Remote, error: BaseException | None) -> Outcome:
        if isinstance(error, distributed.KilledWorker):
            return self._worker_lost(remote)
        where = f" on Dask worker {remote.worker}" if remote.worker else ""
        return Outcome(OutcomeKind.LOST, f"the Dask task failed{where}: {error!r}"[:4096])

    def _worker_lost(self, remote: _Remote) -> Outcome:
        worker = remote.worker or remote.lost_worker or "(unknown)"
        return Outcome(OutcomeKind.LOST,
                       f"the Dask worker {worker} running the task died or was removed")

    def _finish(self, task_id: str) -> None:
        remote = self._tasks.pop(task_id, None)
        if remote is None:
            return
        if remote.timer is not None:
            remote.timer.cancel()
        if not self._tasks:
            self._idle.set()
        ending = remote.ending or Ending(Outcome(OutcomeKind.LOST, "no outcome from the cluster"))
        # NOTE: its future is released by the monitor, with the others of its
        # round: a release message per task would hold back the next submit
        # (they share the client's stream, which sends at most every 10 ms).
        self._done.append((remote.key if remote.confirmed else None, remote.future))
        if not remote.confirmed:
            # NOTE: the worker side may still run the task (an outage, a lost
            # report): tell it to stop. The scheduler keeps the key canceled, so
            # that a late (re-)run of the task does not run it.
            if remote.future is not None and not remote.future.done():
                self._call(remote.future.cancel)
            self._orphans.add(remote.key)
        self.host.task_finished(task_id, ending)
        self.host.task_output_closed(task_id)  # NOTE: its lines came before its outcome

    def _set_unavailable(self, reason: str | None) -> None:
        """The scheduler went away (fail running tasks, refuse new) or came back."""
        if reason is None and self._submit_failed:
            self._submit_failed = False
            if self._unavailable is None:
                self.host.backend_changed()
                return
        if reason == self._unavailable:
            return
        self._unavailable = reason
        if reason is None:
            log.warning("the Dask scheduler at %s answers again", self.address)
        else:
            log.error("%s; failing %d running tasks", reason, len(self._tasks))
            for task_id, remote in list(self._tasks.items()):
                remote.ending = remote.ending or Ending(Outcome(OutcomeKind.LOST, reason))
                self._finish(task_id)
        self.host.backend_changed()

    def _workers_gone(self, workers: set[str], asked: float) -> None:
        """Fail the tasks whose worker left the cluster (as of ``asked``)."""
        for task_id, remote in list(self._tasks.items()):
            if remote.worker is not None and remote.worker not in workers \
                    and remote.ending is None and remote.worker_since < asked:
                if remote.rerun:
                    self.host.task_message(task_id, Note(
                        f"the Dask worker {remote.worker} running the task died or was "
                        f"removed; Dask runs the task again (rerun_on_worker_loss)"))
                    remote.lost_worker, remote.worker = remote.worker, None
                    remote.received = 0  # the next run counts its own reports
                    continue
                remote.ending = Ending(self._worker_lost(remote))
                self._finish(task_id)

    def _call(self, call: Callable[[], Any]) -> None:
        """Make a call to the scheduler off the loop, in order, ignoring failures."""
        def run() -> None:
            try:
                call()
            except Exception as exc:
                log.debug("a call to the Dask scheduler failed: %s", exc)

        try:
            self._calls.submit(run)
        except RuntimeError:
            pass  # shut down

    # -- the monitor thread ----------------------------------------------------

    def _watch_cluster(self) -> None:
        """Renew the lease; notice a lost scheduler and lost workers."""
        assert self._loop is not None
        last_answer = time.monotonic()
        scheduler_id = self._scheduler_id
        while not self._stopping.wait(self.heartbeat):
            asked = time.monotonic()
            self._release_done()
            try:
                with self._link_lock:
                    client, lease = self._client, self._lease
                if client.status in ("closed", "closing"):
                    # NOTE: the client gave up reconnecting; keep trying anew.
                    replaced = self._replace_client()
                    if replaced is None:
                        return  # closing
                    client, lease = replaced
                    scheduler_id = self._scheduler_id
                self._lease_count += 1
                lease.set(self._lease_count, callback_timeout=self.heartbeat * 2)
                scheduler = client.scheduler
                assert scheduler is not None
                identity = client.sync(
                    scheduler.identity, n_workers=-1, callback_timeout=self.heartbeat * 2,
                )
                if identity.get("id") != scheduler_id:
                    # NOTE: a client reconnected to a restarted scheduler does
                    # not renew its topic subscriptions; the new one has none,
                    # nor the plugin that keeps the task claims.
                    claims.register(client)
                    client.subscribe_topic(self._topic, self._on_event)
                scheduler_id = identity.get("id")
                self._send_orphans(client)
                self._send_forget(client)
                # NOTE: forgotten at the next round, once the scheduler has let
                # the keys go: a key still wanted is computed again if its
                # worker dies, and that run must still find the claim.
                self._forget.extend(self._released)
                self._released.clear()
            except Exception as exc:  # any failure is "no answer"
                if time.monotonic() - last_answer > self.unreachable_after:
                    reason = (f"the Dask scheduler at {self.address} is unreachable "
                              f"({type(exc).__name__}: {exc})".replace(" ()", ""))
                    self._soon(self._set_unavailable, reason)
                continue
            last_answer = time.monotonic()
            self._soon(self._set_unavailable, None)
            self._soon(self._workers_gone, set(identity.get("workers", {})), asked)

    def _replace_client(self) -> tuple[distributed.Client, distributed.Variable] | None:
        """A new client and lease in place of the closed ones (None: closing)."""
        client = self._connect()
        lease = distributed.Variable(self._lease_name, client=client)
        with self._link_lock:
            if self._linked:
                self._client, self._lease = client, lease
                return client, lease
        client.close()  # NOTE: _close() has taken the old one to close; not this one
        return None

    def _send_orphans(self, client: distributed.Client) -> None:
        """Send the cancels still pending (a batch at a time)."""
        keys = self._orphans.take(_KEYS_PER_CALL)
        if not keys:
            return
        try:
            self._cancel_keys(client, keys)
        except Exception:
            self._orphans.put_back(keys)  # again at the next answer
            raise

    def _release_done(self) -> None:
        """Release the futures of the tasks done with since the last round."""
        done = [self._done.popleft() for _ in range(len(self._done))]
        self._released.extend(key for key, _ in done if key is not None)
        del done  # NOTE: the last references: distributed releases each future now

    def _send_forget(self, client: distributed.Client) -> None:
        """Tell the scheduler which tasks' records it may forget (in batches)."""
        scheduler = client.scheduler
        assert scheduler is not None
        while self._forget:
            keys = [self._forget.popleft()
                    for _ in range(min(_KEYS_PER_CALL, len(self._forget)))]
            try:
                client.sync(scheduler.housekeeping_forget, keys=keys,
                            callback_timeout=self.heartbeat * 2)
            except Exception:
                self._forget.extendleft(reversed(keys))  # again at the next answer
                raise

    def _soon(self, function: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(function, *args)
        except RuntimeError:
            pass  # the loop is closed

    def _close(self) -> None:
        """Stop the monitor and the lease, close the client (and an owned cluster); once."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._stopping.set()
            if self._monitor is not None and self._monitor is not threading.current_thread():
                self._monitor.join(timeout=self.heartbeat * 2 + 1)
            # NOTE: let the queued calls to the scheduler finish, for a while: with
            # the scheduler gone each would wait for a connection.
            try:
                self._calls.submit(lambda: None).result(timeout=CONSTS.dask_close_step_timeout)
            except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError,
                    RuntimeError):
                log.warning("closing: calls to the Dask scheduler still pending; dropped")
            self._calls.shutdown(wait=False, cancel_futures=True)
            with self._link_lock:  # NOTE: the monitor may outlive its join
                self._linked = False
                client, lease = self._client, self._lease
            try:
                lease.delete()
                client.unsubscribe_topic(self._topic)
            except Exception:
                pass
            try:
                client.close(timeout=CONSTS.dask_close_step_timeout)
            except Exception as exc:
                log.debug("closing the Dask client: %s", exc)
            if self._owns_cluster and self._cluster is not None:
                try:
                    self._cluster.close(timeout=CONSTS.dask_close_step_timeout * 2)
                except Exception as exc:
                    log.warning("closing the local Dask cluster: %s", exc)


def _cancel_reason(error: BaseException | None) -> str | None:
    """Why distributed canceled a future ("" when it did not say); None: not canceled."""
    if not isinstance(error, distributed.client.FutureCancelledError | asyncio.CancelledError):
        return None
    return str(getattr(error, "reason", "") or "")


def _progress(wire: Any) -> Progress:
    """The progress of a wire task as a report (wire names back to keywords)."""
    values = {PROGRESS_NAMES[name]: value for name, value in dict(wire).items()
              if name in PROGRESS_NAMES}
    return Progress(values, parse_stamp(wire.get("timestamp")) or 0.0)


def _ending(payload: dict[str, Any]) -> Ending:
    """The worker side's account of a task's end, checked as strictly as a local
    task's report (the host trusts what a backend hands it)."""
    try:
        outcome = Outcome.from_wire(payload["outcome"])
        wire_usage = payload.get("usage")
        usage = None if wire_usage is None else Usage.from_wire(wire_usage)
        notes = tuple(str(text)[:4096] for text in payload.get("notes") or ())[:16]
        result = payload.get("result_json")
        if outcome.state is TaskState.SUCCEEDED and result is not None:
            result = check_result_json(result)
        else:
            result = None
    except (KeyError, TypeError, ValueError, ProtocolError) as exc:
        return Ending(Outcome(OutcomeKind.PROTOCOL,
                              f"protocol error: a bad outcome from the Dask worker: {exc}"[:300]))
    return Ending(outcome, result, usage, notes)
