"""Prometheus metrics at ``/metrics``, built only from the manager's public API.

Two sources::

    manager.subscribe_changes() --observe()--> counters and histograms (created,
                                finished, forced kills, start latency, wall and
                                CPU seconds)
    scrape --collect()--> manager.counts_by_operation(), counts(), psutil, open
                          streams (gauges computed when Prometheus asks; the
                          manager keeps its counts as it goes, so a scrape
                          costs the same with 20 tasks or 20,000), and
                          manager.log_totals() (the task-log counters: the
                          loop adds to them as it reads, nothing per line here)

Everything is read from the data of the change events, never from message
text: finished tasks by their ``outcome.kind``, forced kills by the outcome's
``killed`` (every kill the supervisor decided: a timeout, a cancel grace run
out, a protocol error, a terminate), wall and CPU seconds from ``usage``, and
start latency from the creation time to the time of the first event that
shows the task running. Each app has a registry of its own, so two apps in
one process do not share metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rest.errors import ApiError

if TYPE_CHECKING:
    import falcon

    from rest.resources import TaskManager
    from supervisor.wire import ChangeEvent

log = logging.getLogger("housekeeping.metrics")

#: What generate_latest() writes: the classic text format, which every scraper reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

STATES = ("NEW", "ACTIVE", "WAITING", "CANCELED", "FAILED", "SUCCEEDED")
TERMINAL = frozenset({"CANCELED", "FAILED", "SUCCEEDED"})
_RUNNING = frozenset({"ACTIVE", "WAITING"})

#: Buckets of the start-latency histogram (seconds): a warm start costs a pipe message.
START_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0, 30.0, 60.0, 300.0)
#: Buckets of the wall-time and CPU-time histograms (seconds).
RUN_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
               14400.0, 86400.0)


def children_rss() -> int:
    """Return the summed resident memory of every process below this one (task trees)."""
    total = 0
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    for child in children:
        try:
            total += int(child.memory_info().rss)
        except psutil.Error:
            continue  # NOTE: it ended between the listing and the read
    return total


class TaskMetrics:
    """The metrics of one manager, in a registry of their own."""

    def __init__(
        self,
        manager: TaskManager,
        *,
        open_streams: Callable[[], int],
        rss: Callable[[], int] = children_rss,
    ) -> None:
        """Create the metrics and subscribe to the manager's events.

        Args:
            manager: the manager to observe (public API only).
            open_streams: returns the number of SSE clients connected now.
            rss: returns the summed RSS of the task processes, in bytes.
        """
        self._manager = manager
        self._open_streams = open_streams
        self._rss = rss
        self.registry = CollectorRegistry(auto_describe=True)
        self.created = Counter(
            "housekeeping_tasks_created", "Tasks created.", ["operation"],
            registry=self.registry)
        self.finished = Counter(
            "housekeeping_tasks_finished",
            "Tasks that reached a terminal state, by state and outcome kind.",
            ["operation", "state", "kind"], registry=self.registry)
        self.forced_kills = Counter(
            "housekeeping_forced_kills",
            "Task trees the supervisor killed (timeout, cancel grace over, protocol "
            "error, terminate, ...), by outcome kind.",
            ["operation", "kind"], registry=self.registry)
        self.start_latency = Histogram(
            "housekeeping_task_start_latency_seconds",
            "Seconds from creation to ACTIVE (queueing plus hand-over to a process).",
            ["operation"], buckets=START_BUCKETS, registry=self.registry)
        self.wall_time = Histogram(
            "housekeeping_task_wall_seconds",
            "Wall-clock seconds of each task that ran, hand-over to exit (its usage).",
            ["operation"], buckets=RUN_BUCKETS, registry=self.registry)
        self.cpu_time = Histogram(
            "housekeeping_task_cpu_seconds",
            "CPU seconds (user + system) of each task that ran, its reaped "
            "descendants included (its usage).",
            ["operation"], buckets=RUN_BUCKETS, registry=self.registry)
        self.resubscribed = Counter(
            "housekeeping_metrics_resubscribed",
            "Times the metrics fell behind the event stream and subscribed again "
            "(events were lost from the counters).", registry=self.registry)
        self.registry.register(_Snapshot(self))
        self._lock = threading.Lock()
        self._started: set[str] = set()  # ids seen running, until purged
        self._finished: set[str] = set()  # ids counted as finished, until purged
        self._closed = False
        self._unsubscribe = manager.subscribe_changes(self.observe)

    def observe(self, event: ChangeEvent) -> None:
        """Update the counters and histograms from one change event."""
        method = event.method
        if method == "DROPPED":
            self._resubscribe()
            return
        task = event.task
        if task is None:
            return
        task_id, operation, state = task.id, task.operation, task.state
        with self._lock:
            if method == "DELETE":
                self._started.discard(task_id)
                self._finished.discard(task_id)
                return
            if method == "POST":
                self.created.labels(operation).inc()
            if state in _RUNNING and task_id not in self._started:
                # NOTE: the first event that shows it running is the one of its
                # NEW ⇒ ACTIVE change: its modification time is when it started.
                self._started.add(task_id)
                self.start_latency.labels(operation).observe(
                    max(0.0, task.modified_at - task.created_at))
            outcome = task.outcome
            if state in TERMINAL and outcome is not None and task_id not in self._finished:
                self._finished.add(task_id)
                self._started.discard(task_id)
                self.finished.labels(operation, state, outcome.kind.value).inc()
                if outcome.killed:
                    self.forced_kills.labels(operation, outcome.kind.value).inc()
                usage = task.usage
                if usage is not None:
                    self.wall_time.labels(operation).observe(usage.wall_seconds)
                    self.cpu_time.labels(operation).observe(usage.cpu_seconds)

    def close(self) -> None:
        """Stop observing the manager."""
        with self._lock:
            self._closed = True
        self._unsubscribe()

    def exposition(self) -> bytes:
        """Return the metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def snapshot(self) -> Iterator[Metric]:
        """Yield the gauges computed at scrape time."""
        tasks = GaugeMetricFamily(
            "housekeeping_tasks", "Tasks in the table, by state and operation.",
            labels=["state", "operation"])
        by_key: dict[tuple[str, str], int] = {}
        for operation, states in self._manager.counts_by_operation().items():
            for state, count in states.items():
                by_key[(state, operation)] = count
        for (state, operation), count in sorted(by_key.items()):
            tasks.add_metric([state, operation], count)
        yield tasks
        counts = self._manager.counts()
        yield GaugeMetricFamily(
            "housekeeping_queue_depth", "Tasks waiting for a worker slot (NEW).",
            value=counts.get("queued", counts.get("NEW", 0)))
        yield GaugeMetricFamily(
            "housekeeping_running_children", "Task processes running a task now.",
            value=counts.get("running", counts.get("ACTIVE", 0) + counts.get("WAITING", 0)))
        yield GaugeMetricFamily(
            "housekeeping_child_rss_bytes",
            "Summed resident memory of the server's child processes (tasks, warm "
            "processes, the starter) and their descendants.", value=self._rss())
        yield GaugeMetricFamily(
            "housekeeping_sse_clients", "Event-stream clients connected now.",
            value=self._open_streams())
        yield from self._log_counters()

    def _log_counters(self) -> Iterator[Metric]:
        """The task-log counters, as the manager has them (since it started)."""
        captured = CounterMetricFamily(
            "housekeeping_task_log_bytes",
            "Bytes of task output captured (stdout, stderr, logging), by operation and stream.",
            labels=["operation", "stream"])
        dropped = CounterMetricFamily(
            "housekeeping_task_log_dropped",
            "Task log lines discarded to keep each task's newest output within its limit.",
            labels=["operation", "stream"])
        for (operation, stream), (size, lines) in sorted(self._manager.log_totals().items()):
            captured.add_metric([operation, stream], size)
            dropped.add_metric([operation, stream], lines)
        yield captured
        yield dropped

    def _resubscribe(self) -> None:
        # NOTE: the manager dropped this subscriber (it fell more than its backlog
        # behind); the counters missed events, but keep counting from here.
        with self._lock:
            if self._closed:
                return
        log.warning("metrics fell behind the task events; subscribing again")
        self.resubscribed.inc()
        self._unsubscribe = self._manager.subscribe_changes(self.observe)


class _Snapshot(Collector):
    """The scrape-time gauges of a :class:`TaskMetrics`."""

    def __init__(self, metrics: TaskMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.snapshot()

    def describe(self) -> Iterator[Metric]:
        return iter(())


class MetricsEndpoint:
    """``/metrics``: the exposition text; with a token, only for ``Authorization: Bearer``."""

    def __init__(self, metrics: TaskMetrics, token: str | None = None) -> None:
        """Serve ``metrics``; ``token`` (if given) is required from scrapers."""
        self._metrics = metrics
        self._digest = hashlib.sha256(token.encode("utf-8")).digest() if token else None

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Return the metrics (``text/plain; version=0.0.4``)."""
        if self._digest is not None:
            scheme, _, given = (req.get_header("Authorization") or "").strip().partition(" ")
            # NOTE: compare digests, in constant time, so neither the length nor the
            # content of the token leaks through timing.
            offered = hashlib.sha256(given.strip().encode("utf-8")).digest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(offered, self._digest):
                raise ApiError(401, "the metrics need Authorization: Bearer <metrics token>",
                               headers={"WWW-Authenticate": 'Bearer realm="housekeeping-metrics"'})
        resp.content_type = CONTENT_TYPE
        resp.data = self._metrics.exposition()
