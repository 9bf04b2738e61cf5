"""The worker side of the Dask backend: one task, run by a Manager of the worker's own.

:func:`run_task_on_worker` is the body of the Dask task the supervisor
submits. It hands the task to a :class:`~supervisor.Manager` with the local
backend that lives in the Dask worker process (one per process, started at
the first task, shared by every supervisor), so the task runs exactly as it
would on the supervisor's machine: a process of its own running the same
``workers`` child code, with its ``timeout``, ``max_memory``, crash detection
and whole-tree kill. The local Manager keeps task processes forked ahead of
need, so a task does not wait for a fork. Each task's ``cancel_grace`` is its
own supervisor's, kept by the Dask thread that waits for the task.

::

    supervisor                 scheduler                  Dask worker process
    ──────────                 ─────────                  ───────────────────
    submit(spec) ─────────────▶ task ───────────────────▶ run_task_on_worker
                                claims ◀── claim ──────── (one round trip: run?)
    housekeeping_cancel ──────▶ claims ── cancel ───────▶ _on_cancel ── the task's thread
    Variable(lease).set(n) ───▶ lease ◀── get ─────────── a thread per lease (lost → kill)
    subscribe_topic ◀───────── log_event ◀────────────── forwarder ◀── local events
                                                           (log lines batched; the outcome last)
    future.result() ◀───────── outcome ◀──────────────── return {"outcome", "usage", ...}

Before it runs the animator, the run claims its task on the scheduler
(:mod:`supervisor.backends.dask.claims`): a task canceled while queued, or run
a second time after its worker died, does not start. Reports are the local
task's change events, already coalesced by the child (one per
``progress_interval``), turned into progress / state / note messages and sent
with the worker's ``log_event``, which keeps their order; the outcome is the
last of them (and the future's result). The task's tree is killed at once,
without a cancel grace, when the lease expires or the worker leaves the
cluster: the supervisor has given up on it by then.
"""

from __future__ import annotations

import atexit
import json
import logging
import pickle
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from supervisor.backends.dask import claims
from supervisor.backends.dask.claims import WORKER_CANCEL
from supervisor.consts import CONSTS
from supervisor.errors import TaskNotFound
from supervisor.manager import Manager
from supervisor.outcome import Outcome, OutcomeKind
from supervisor.sandbox import Sandbox
from supervisor.states import TaskState, is_terminal

log = logging.getLogger("housekeeping.remote")

#: Worker states in which its tasks are killed at once (it left the cluster).
_WORKER_GONE = frozenset({"closing", "closed", "failed"})
#: Log lines are sent in batches of at most this much text and this many lines
#: (and at most ``CONSTS.dask_log_batch_delay`` after a batch's first line).
LOG_BATCH_BYTES = 64 * 1024
LOG_BATCH_LINES = 1000
#: Tasks one worker process's Manager runs at once; Dask's threads are the real bound.
_LOCAL_SLOTS = 256
#: The worker process's Manager's own cancel grace: a ceiling. A canceled task is
#: killed after its supervisor's grace (at most this) by the thread that waits
#: for its cancel.
GRACE_CEILING = 24 * 3600.0
#: The largest result sent with the outcome as the last report; a larger one
#: comes with the Dask future's result only (the scheduler keeps a topic's
#: last 1,000 events).
END_REPORT_BYTES = LOG_BATCH_BYTES
#: Local ids never used again (their old events may still come) kept at most;
#: beyond it the oldest may be used again.
MAX_RETIRED = 10_000


class _Forwarder:
    """Turns one local task's change events into ordered messages for the supervisor."""

    def __init__(self, task_id: str, send: Callable[[dict[str, Any]], None],
                 wake: threading.Event, address: str) -> None:
        self.task_id = task_id
        self._send = send
        self._address = address
        self.sent = 0
        self.final: dict[str, Any] | None = None
        self.done = threading.Event()
        self._wake = wake  #: set with ``done``: the thread that waits for the task looks
        self._lock = threading.Lock()
        self._sending = threading.Lock()
        self.log = _LogBatcher(self.send)
        self._version = 0
        self._messages: list[dict[str, str]] = []
        self._state = TaskState.NEW.value
        self._progress: dict[str, Any] | None = None

    def send(self, message: dict[str, Any]) -> None:
        with self._sending:  # NOTE: events and log lines come on threads of their own
            if self.sent == 0:
                # NOTE: the first report of a run names its worker ("run", not
                # "worker": the scheduler adds "worker" to every event)
                message = {"run": self._address, **message}
            self._send({"t": self.task_id, "n": self.sent, **message})
            self.sent += 1

    def lost(self, reason: str) -> None:
        """End without the task's last events (they were dropped on this worker)."""
        with self._lock:
            if not self.done.is_set():
                self.final = _ended(Outcome(OutcomeKind.LOST, reason))
                self._end()

    def _end(self) -> None:
        self.done.set()
        self._wake.set()

    def on_event(self, event: dict[str, Any]) -> None:
        with self._lock:  # a resubscription may deliver from a second thread
            self._on_event(event)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("method") not in ("POST", "PATCH") or self.done.is_set():
            return
        wire = event["task"]
        if wire["meta"]["version"] <= self._version:
            return  # seen already (a resubscription replays)
        self._version = wire["meta"]["version"]
        notes = _new_messages(self._messages, wire["messages"])
        self._messages = wire["messages"]
        state = wire["state"]
        texts = [note["message"] for note in notes]
        # NOTE: lines the supervisor's own records write again, on its side: the
        # transition's line and the outcome's message (each exactly as written here)
        written_again: set[object] = set()
        changed = state != self._state
        if changed:
            written_again.add(f"State change {self._state} ⇒ {state}")
            self._state = state
        outcome = wire.get("outcome")
        if is_terminal(state) and isinstance(outcome, dict):
            written_again.add(outcome.get("message"))
        texts = [text for text in texts if text not in written_again]
        if is_terminal(state):
            result = json.dumps(wire["result"]) if state == TaskState.SUCCEEDED.value else None
            self.final = {"outcome": outcome, "usage": wire.get("usage"), "notes": texts,
                          "result_json": result}
            self._end()
            return
        message: dict[str, Any] = {}
        if texts:
            message["notes"] = texts
        if changed and state in (TaskState.ACTIVE.value, TaskState.WAITING.value):
            message["state"] = state
        progress = wire.get("progress")
        if progress is not None and progress != self._progress:
            self._progress = progress
            message["progress"] = progress
        if message:
            self.send(message)


class _LogBatcher:
    """Sends one local task's log lines to the supervisor in batches, in order.

    A batch goes when it holds ``LOG_BATCH_BYTES`` of text or ``LOG_BATCH_LINES``
    lines, ``CONSTS.dask_log_batch_delay`` after its first line, and at the end of the log.
    """

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._batch: list[list[str]] = []
        self._bytes = 0
        self._timer: threading.Timer | None = None
        self.ended = threading.Event()

    def on_line(self, line: dict[str, Any]) -> None:
        """The local log's follower (its own thread): a line, or the end."""
        if "end" in line:
            self.flush()
            self.ended.set()
            return
        with self._lock:
            self._batch.append([line["stream"], line["time"], line["text"]])
            self._bytes += len(line["text"])
            full = self._bytes >= LOG_BATCH_BYTES or len(self._batch) >= LOG_BATCH_LINES
            if not full and self._timer is None:
                self._timer = threading.Timer(CONSTS.dask_log_batch_delay, self.flush)
                self._timer.daemon = True
                self._timer.start()
        if full:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            batch, self._batch, self._bytes = self._batch, [], 0
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            # NOTE: sent under the lock, so that batches keep their order
            if batch:
                self._send({"log": batch})


def _ended(outcome: Outcome) -> dict[str, Any]:
    """The final payload of a task that ended here without running."""
    return {"outcome": outcome.to_wire(), "usage": None, "notes": [], "result_json": None}


def _new_messages(
    before: list[dict[str, str]], after: list[dict[str, str]]
) -> list[dict[str, str]]:
    """The messages of ``after`` that came after the last one of ``before``."""
    if not before:
        return list(after)
    last = before[-1]
    for index in range(len(after) - 1, -1, -1):
        if after[index] == last:
            return after[index + 1:]
    return list(after)


class RecentIds:
    """A set of ids that keeps only the ``limit`` most recently added (any thread)."""

    def __init__(self, limit: int = MAX_RETIRED) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def add(self, item: str) -> None:
        with self._lock:
            self._ids[item] = None
            self._ids.move_to_end(item)
            while len(self._ids) > self._limit:
                self._ids.popitem(last=False)

    def __contains__(self, item: object) -> bool:
        with self._lock:
            return item in self._ids

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)


class _Local:
    """This worker process's Manager, and the routing of its events to forwarders.

    Supervisors that share a worker may ask for the same task id; a local id is
    taken only when no forwarder still uses it, and each forwarder can cancel,
    kill or forget only its own task.
    """

    def __init__(self) -> None:
        self.manager = Manager(purge_delay=0, max_workers=_LOCAL_SLOTS,
                               cancel_grace=GRACE_CEILING)
        self.lock = threading.Lock()  #: guards the routes; never held over user code
        self._creating = threading.Lock()  #: one registration + creation at a time
        self._forwarders: dict[str, _Forwarder] = {}
        self._retired = RecentIds()  #: ids whose events may still come (see _resync)
        self._closing = False
        self.manager.subscribe(self._route)
        # NOTE: a worker that closes in order ends its tasks in order too; one
        # that is killed relies on the starter's PR_SET_PDEATHSIG.
        atexit.register(self.close)

    def close(self) -> None:
        """Kill every task's tree at once (the worker is leaving), then terminate.

        NOTE: the Manager's own grace is the ceiling, not any task's: its
        terminate() would wait that long for a task that ignores its cancel.
        """
        with self._creating:
            self._closing = True
        with self.lock:
            for local_id in self._forwarders:
                try:
                    self.manager.kill_task(local_id, "killed: the Dask worker is closing")
                except TaskNotFound:
                    pass
                except RuntimeError:  # the loop is closed: terminated already
                    break
        self.manager.terminate()

    def _route(self, event: dict[str, Any]) -> None:
        if event.get("method") == "DROPPED":
            self._resync()
            return
        task = event.get("task")
        if task is None:
            return
        with self.lock:
            forwarder = self._forwarders.get(task["meta"]["id"])
        if forwarder is not None:
            forwarder.on_event(event)

    def _resync(self) -> None:
        """The subscription fell 10,000 events behind and was dropped: catch up."""
        log.error("the worker-side event subscription was dropped; resubscribing")
        self.manager.subscribe(self._route)
        with self._creating:  # every route has its task
            with self.lock:
                routes = list(self._forwarders.items())
            for local_id, forwarder in routes:
                try:
                    wire = self.manager.get_task(local_id)
                except TaskNotFound:
                    # NOTE: it ended (and was purged) unseen; its old events may
                    # still come, so its id is never used again here.
                    self._retired.add(local_id)
                    forwarder.lost("the worker lost track of the task's events")
                    continue
                forwarder.on_event({"method": "PATCH", "task": wire})

    def create(self, spec: dict[str, Any], animator: Any, forwarder: _Forwarder) -> str:
        """Register the animator and create the task, routing its events to ``forwarder``."""
        # NOTE: registration and creation are one step (another thread of this
        # worker may register the same operation with other limits), and the
        # route exists before the task does (its first events must find it).
        with self._creating:
            if self._closing:
                raise RuntimeError("the Dask worker is closing")
            local_id: str = spec["task_id"]
            with self.lock:
                copy = 1
                while local_id in self._forwarders or local_id in self._retired \
                        or self._known(local_id):
                    copy += 1
                    local_id = f"{spec['task_id']}-{copy}"
                self._forwarders[local_id] = forwarder
            try:
                self.manager.register_animator(
                    spec["operation"], animator, spec["timeout"], spec["max_memory"],
                    sandbox=Sandbox(**spec["sandbox"]),
                )
                created = self.manager.run_task_as(local_id, spec["create"],
                                                   follow_log=forwarder.log.on_line)
            except BaseException:
                self.forget(local_id, forwarder)
                raise
        assert created == local_id, (created, local_id)
        return local_id

    def _known(self, local_id: str) -> bool:
        try:
            self.manager.get_task(local_id)
        except TaskNotFound:
            return False
        return True

    def cancel(self, local_id: str, forwarder: _Forwarder) -> None:
        """Cancel the task, if ``local_id`` is still ``forwarder``'s."""
        with self.lock:
            if self._forwarders.get(local_id) is forwarder:
                try:
                    self.manager.cancel_task(local_id)
                except TaskNotFound:
                    pass

    def kill(self, local_id: str, forwarder: _Forwarder, reason: str) -> None:
        """Kill the task's tree now (or cancel it while it waits for a process)."""
        with self.lock:
            if self._forwarders.get(local_id) is forwarder:
                try:
                    self.manager.kill_task(local_id, reason)  # canceled if still queued
                except TaskNotFound:
                    pass

    def forget(self, local_id: str, forwarder: _Forwarder) -> None:
        with self.lock:
            if self._forwarders.get(local_id) is forwarder:
                del self._forwarders[local_id]


_the_local: _Local | None = None
_local_lock = threading.Lock()


def _local() -> _Local:
    """This worker process's one _Local (whatever the supervisors' cancel graces)."""
    global _the_local
    with _local_lock:
        if _the_local is None:
            _the_local = _Local()
        return _the_local


class _Run:
    """One run of a task in this worker process, as its cancel finds it."""

    def __init__(self) -> None:
        self.canceled = False
        #: set by the end of the task and by its cancel: the waiting thread looks
        self.wake = threading.Event()


_runs: dict[str, _Run] = {}
_runs_lock = threading.Lock()


def _on_cancel(keys: list[str]) -> None:
    """The worker's ``housekeeping_cancel`` handler (on its event loop): the
    scheduler forwards the cancels of the tasks this worker claimed."""
    with _runs_lock:
        for key in keys:
            run = _runs.get(key)
            if run is not None:
                run.canceled = True
                run.wake.set()


def _claim(worker: Any, spec: dict[str, Any]) -> str:
    """Ask the scheduler whether this run may start (one round trip); see
    :mod:`supervisor.backends.dask.claims`."""
    import distributed
    from distributed.utils import sync

    def claim() -> Any:
        return sync(worker.loop, worker.scheduler.housekeeping_claim, key=spec["key"],
                    worker=worker.address, rerun=bool(spec["rerun"]),
                    callback_timeout=CONSTS.dask_claim_timeout)

    # NOTE: a restarted scheduler holds no earlier run of this task
    answer = claims.ask(claim, distributed.get_client())
    if answer not in ("run", "canceled", "refused"):
        raise RuntimeError(f"the scheduler does not keep housekeeping's task claims "
                           f"(answered {answer!r})")
    return str(answer)


def run_task_on_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one task on this Dask worker; return its outcome.

    ``spec`` (built by the supervisor's DaskBackend): ``task_id``, ``key`` (the
    Dask key), ``create``, ``operation``, ``animator`` (pickled by reference),
    ``timeout``, ``max_memory``, ``sandbox``, ``cancel_grace``, ``topic`` (for
    reports), ``lease`` (Variable name), ``lease_timeout``, ``rerun``.
    """
    import distributed

    worker = distributed.get_worker()
    outcome = {"worker": worker.address}
    key = spec["key"]
    run = _Run()
    # NOTE: registered before the claim: a cancel the scheduler forwards as
    # soon as it has the claim must find the run.
    worker.handlers.setdefault(WORKER_CANCEL, _on_cancel)
    with _runs_lock:
        _runs[key] = run
    try:
        try:
            verdict = _claim(worker, spec)
        except Exception as exc:
            return _not_started(worker, exc, 0)
        # NOTE: Dask re-runs a task whose worker died; the work may not be
        # idempotent, so a second run refuses and the supervisor fails the task,
        # unless the animator opted in (rerun_on_worker_loss).
        if verdict == "refused":
            return {"retry": True, **outcome, "sent": 0}
        # NOTE: canceled while it waited in Dask's queue (or ended by a supervisor
        # that gave up on it): a run that starts now must not run the animator.
        if verdict == "canceled" or run.canceled:
            return {**outcome, "sent": 0, **_ended(Outcome(
                OutcomeKind.CANCELED_QUEUED, "canceled before it started on a Dask worker"))}
        return _run(spec, worker, run)
    finally:
        with _runs_lock:
            if _runs.get(key) is run:
                del _runs[key]


def _not_started(worker: Any, exc: Exception, sent: int) -> dict[str, Any]:
    """The outcome of a run that could not start its task here (LOST, saying why)."""
    reason = f"cannot start the task on Dask worker {worker.address}: {exc}"
    return {"worker": worker.address, **_ended(Outcome(OutcomeKind.LOST, reason)),
            "sent": sent}


def _run(spec: dict[str, Any], worker: Any, run: _Run) -> dict[str, Any]:
    """Run the claimed task through this worker process's Manager; its outcome."""
    import distributed

    def send(message: dict[str, Any]) -> None:
        worker.log_event(spec["topic"], message)

    forwarder = _Forwarder(spec["task_id"], send, run.wake, worker.address)
    outcome = {"worker": worker.address}
    try:
        animator = pickle.loads(spec["animator"])
        local = _local()
        lease = _lease(spec["lease"], distributed.get_client())
    except Exception as exc:
        return _not_started(worker, exc, forwarder.sent)
    try:
        try:
            local_id = local.create(spec, animator, forwarder)
        except Exception as exc:
            return _not_started(worker, exc, forwarder.sent)
        try:
            _watch(spec, worker, local, local_id, forwarder, run, lease)
            # NOTE: its last lines go before the outcome, so that they are counted in "sent"
            forwarder.log.ended.wait(CONSTS.dask_log_end_wait)
            forwarder.log.flush()
        finally:
            local.forget(local_id, forwarder)
    finally:
        _release(lease)
    assert forwarder.final is not None
    final = {**outcome, **forwarder.final}
    if len(final.get("result_json") or "") <= END_REPORT_BYTES:
        # NOTE: the outcome as the last report too: it reaches the supervisor a
        # hop sooner than the future's result (which it need not fetch then).
        forwarder.send({"end": final})
    return {**final, "sent": forwarder.sent}


class _Lease:
    """One supervisor's lease as this worker process sees it: when it last moved.

    One thread per lease (not per task) reads the supervisor's Variable every
    ``CONSTS.dask_lease_poll`` seconds while tasks of that supervisor run here.
    """

    def __init__(self, name: str, client: Any) -> None:
        import distributed

        self.name = name
        self.seen = time.monotonic()
        self.users = 0
        self._variable = distributed.Variable(name, client=client)
        threading.Thread(target=self._poll, name=f"housekeeping-lease-{name}",
                         daemon=True).start()

    def _poll(self) -> None:
        last = None
        while True:
            with _leases_lock:
                if self.users == 0:
                    _leases.pop(self.name, None)
                    return
            try:
                value = self._variable.get(timeout=CONSTS.dask_lease_poll)
            except Exception:  # unreachable or deleted: the lease does not move
                value = last
            if value != last:
                last = value
                self.seen = time.monotonic()
            time.sleep(CONSTS.dask_lease_poll)

    def age(self) -> float:
        """Seconds since the lease was last seen renewed."""
        return time.monotonic() - self.seen


_leases: dict[str, _Lease] = {}
_leases_lock = threading.Lock()


def _lease(name: str, client: Any) -> _Lease:
    with _leases_lock:
        lease = _leases.get(name)
        if lease is None:
            lease = _leases[name] = _Lease(name, client)
        lease.users += 1
        return lease


def _release(lease: _Lease) -> None:
    with _leases_lock:
        lease.users -= 1


def _watch(spec: dict[str, Any], worker: Any, local: _Local, local_id: str,
           forwarder: _Forwarder, run: _Run, lease: _Lease) -> None:
    """Wait for the task's end; cancel it when asked (kill it after the supervisor's
    grace); kill it at once if the supervisor or the worker is gone."""
    grace = min(float(spec["cancel_grace"]), GRACE_CEILING)
    lease_timeout = float(spec["lease_timeout"])
    deadline: float | None = None  #: when a canceled task's tree is killed
    while True:
        now = time.monotonic()
        wait = CONSTS.dask_watch_interval
        if deadline is not None:
            wait = max(0.0, min(wait, deadline - now))
        run.wake.wait(wait)
        run.wake.clear()  # NOTE: before the looks: a later wake is not lost
        if forwarder.done.is_set():
            return
        now = time.monotonic()
        reason = None
        if run.canceled and deadline is None:
            local.cancel(local_id, forwarder)
            # NOTE: the supervisor's grace, not the local Manager's (a ceiling)
            deadline = now + grace
        elif deadline is not None and now >= deadline:
            local.kill(local_id, forwarder, f"killed after cancel grace period ({grace:g} s)")
            deadline = float("inf")  # killed once; its end comes
        if lease.age() > lease_timeout:
            reason = (f"killed: the supervisor's lease expired (no heartbeat "
                      f"for {lease_timeout:g} s)")
        elif getattr(worker.status, "name", "") in _WORKER_GONE:
            # NOTE: a retired or closing worker is out of the cluster: the
            # supervisor already failed the task, nobody hears from it.
            reason = f"killed: the Dask worker is {worker.status.name}"
        if reason is not None:
            log.error("task %s: %s", local_id, reason)
            local.kill(local_id, forwarder, reason)
            forwarder.done.wait()
            return
