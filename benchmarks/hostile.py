"""9. Hostile: the supervisor's bounds against tasks and clients that push them.

Each figure is a row of the hostile-task table (README, Reliability), taken
from a real ``housekeeping serve`` on loopback:

* memory of big tasks: 40 tasks created with a body just under 1 MiB
  (``args.pad``: zeros, which the animator ignores); the server's RSS growth
  divided by the JSON posted (the bound: 2.5×);
* ``/healthz`` p50 while a running big task reports progress about 20 times
  a second and one client follows the event stream (as the dashboard does),
  against the same server idle (the bound: 20 ms);
* RSS growth of the server with a client that opens the event stream and
  never reads it, beside that task (the bound: 100 MiB);
* POST of a 900 KB task and ``/healthz`` right after, while every warm task
  process is stopped (SIGSTOP): nothing may wait on a child (the bound: 100 ms);
* ``/metrics`` p50 with 20,000 tasks in the table, against an empty table
  (the bound: 20 ms).

There are no peers here: the ratios compare the same server with and without
the pressure.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import statistics
import threading
import time
from collections.abc import Iterator

import psutil

from benchmarks.animators import FILL_ENV
from benchmarks.common import TIMEOUT, Options, Section, Table, wait_until
from benchmarks.http_load import ServerProcess, hk_command, latencies

TITLE = "9. Hostile"
API = "/api/v1/tasks"
BIG_TASKS = 40
FILLED = 20_000
MIB = 1 / 2**20


def padded_body(size: int, operation: str = "HOLD") -> bytes:
    """A create body of about ``size`` bytes: ``args.pad`` is a list of zeros."""
    return json.dumps({"operation": operation, "args": {"pad": [0] * (size // 2 - 40)}},
                      separators=(",", ":")).encode()


def rss(server: ServerProcess) -> int:
    """The server process's resident memory (not its children's)."""
    return int(psutil.Process(server.proc.pid).memory_info().rss)


def post(server: ServerProcess, body: bytes) -> str:
    """POST a raw create body; return the new task's id."""
    return timed_post(server, body)[1]


def timed_post(server: ServerProcess, body: bytes) -> tuple[float, str]:
    """POST a raw create body: the seconds until the whole answer was read, the new id."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
    try:
        conn.connect()
        start = time.perf_counter()
        conn.request("POST", API, body=body, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        data = answer.read()
        took = time.perf_counter() - start
        if answer.status != 201:
            raise RuntimeError(f"POST {API}: {answer.status} {data[:200]!r}")
        return took, str(json.loads(data)["meta"]["id"])
    finally:
        conn.close()


def cancel_all(server: ServerProcess, ids: list[str]) -> None:
    for task_id in ids:
        server.request("POST", f"{API}/{task_id}/cancel")


@contextlib.contextmanager
def follower(server: ServerProcess) -> Iterator[list[int]]:
    """A client that reads the event stream as fast as it comes; yields its byte count."""
    received = [0]
    sock = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
    sock.sendall(b"GET /api/v1/task-events HTTP/1.1\r\nHost: bench\r\n\r\n")

    def read() -> None:
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received[0] += len(chunk)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        thread.join(TIMEOUT)


@contextlib.contextmanager
def never_reader(server: ServerProcess) -> Iterator[socket.socket]:
    """A client that opens the event stream and never reads a byte of it."""
    sock = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.sendall(b"GET /api/v1/task-events HTTP/1.1\r\nHost: bench\r\n\r\n")
        wait_until(lambda: server.json("GET", "/healthz")["eventStreams"] >= 1,
                   "the event stream to open")
        yield sock
    finally:
        sock.close()


def version(server: ServerProcess, task_id: str) -> int:
    return int(server.json("GET", f"{API}/{task_id}")["meta"]["version"])


def warm_processes(server: ServerProcess) -> list[psutil.Process]:
    """The idle task processes of the server: its starter's children."""
    starters = [p for p in psutil.Process(server.proc.pid).children()
                if "workers.starter" in " ".join(p.cmdline())]
    return [child for starter in starters for child in starter.children()]


COMMON = ("--purge-delay", "3600", "--max-workers", "2")
BIG = 1024 * 1024 - 1024  #: bytes of a big task's create body: just under the 1 MiB limit


def big_tasks_memory() -> float:
    """RSS growth of a server given 40 big tasks, per byte of their JSON."""
    body = padded_body(BIG)
    with ServerProcess(hk_command(*COMMON)) as server:
        post(server, b'{"operation": "NOOP"}')
        before = rss(server)
        ids = [post(server, body) for _ in range(BIG_TASKS)]
        grown = rss(server) - before
        cancel_all(server, ids)
    return grown / (BIG_TASKS * len(body))


def health_beside_a_follower(samples: int) -> tuple[float, float, int]:
    """/healthz p50 idle, then beside a ticking big task and an SSE follower; bytes read."""
    with ServerProcess(hk_command(*COMMON)) as server:
        idle = statistics.median(latencies(server.host, server.port, "/healthz", samples))
        with follower(server) as received:
            task_id = post(server, padded_body(BIG, "TICK"))
            wait_until(lambda: version(server, task_id) >= 5, "progress")
            pressed = statistics.median(
                latencies(server.host, server.port, "/healthz", samples))
            cancel_all(server, [task_id])
    return idle, pressed, received[0]


def never_read_growth(seconds: float) -> tuple[int, int]:
    """Peak RSS growth with a never-read stream beside a ticking big task; its versions."""
    with ServerProcess(hk_command(*COMMON)) as server, never_reader(server):
        task_id = post(server, padded_body(BIG, "TICK"))
        wait_until(lambda: version(server, task_id) >= 3, "progress")
        before, first = rss(server), version(server, task_id)
        deadline = time.monotonic() + seconds
        peak = before
        while time.monotonic() < deadline:
            peak = max(peak, rss(server))
            time.sleep(0.25)
        versions = version(server, task_id) - first
        cancel_all(server, [task_id])
    return peak - before, versions


def stopped_warm_latency(stop: bool) -> tuple[float, float]:
    """POST of a 900 KB task and /healthz right after, every warm process stopped
    (SIGSTOP) if ``stop``, else as they are (the same request's own cost)."""
    with ServerProcess(hk_command(*COMMON)) as server:
        warm: list[psutil.Process] = []

        def found() -> bool:
            warm[:] = warm_processes(server)
            return len(warm) >= 2

        wait_until(found, "the warm processes")
        for proc in warm if stop else []:
            proc.send_signal(signal.SIGSTOP)
        try:
            posted, task_id = timed_post(server, padded_body(900_000))
            health = statistics.median(latencies(server.host, server.port, "/healthz", 5))
            cancel_all(server, [task_id])
        finally:
            for proc in warm:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGCONT)
    return posted, health


def run(options: Options) -> Section:
    """Measure each bound in turn on fresh servers, round after round."""
    rounds = options.pick(2, 5)
    samples = options.pick(100, 300)
    stream_seconds = options.pick(5.0, 15.0)
    memory = Table("server RSS growth ÷ JSON posted, 40 tasks of ~1 MiB", "×", [], digits=2)
    health = Table("GET /healthz p50", "ms", [], scale=1000, digits=2,
                   ratio_title="ratio under pressure ÷ idle")
    unread = Table(f"server RSS growth over {stream_seconds:g} s, a never-read event stream "
                   "beside a big task", "MiB", [], scale=MIB, digits=1)
    stalled = Table("a 900 KB task posted: latency", "ms", [], scale=1000, digits=1,
                    ratio_title="ratio warm processes stopped ÷ running")
    metrics = Table("GET /metrics p50", "ms", [], scale=1000, digits=2,
                    ratio_title="ratio 20,000 tasks ÷ empty table")
    section = Section(TITLE, [memory, health, unread, stalled, metrics])
    section.facts["create body of a big task"] = f"{len(padded_body(BIG)):,} bytes"
    for _ in range(rounds):
        memory.row("housekeeping").samples.append(big_tasks_memory())
        idle, pressed, received = health_beside_a_follower(samples)
        health.row("housekeeping idle").samples.append(idle)
        health.row("housekeeping, big task + SSE follower").samples.append(pressed)
        section.facts["bytes the follower read (last round)"] = f"{received:,}"
        grown, versions = never_read_growth(stream_seconds)
        unread.row("housekeeping, peak").samples.append(grown)
        section.facts["task versions during the never-read run (last round)"] = str(versions)
        for stop, name in ((False, "warm processes running"), (True, "warm processes stopped")):
            posted, after = stopped_warm_latency(stop)
            stalled.row(f"housekeeping POST (900 KB), {name}").samples.append(posted)
            stalled.row(f"housekeeping GET /healthz right after, {name}").samples.append(after)

    filled_cmd = hk_command(*COMMON, animators="benchmarks.animators:register_filled")
    with ServerProcess(hk_command(*COMMON)) as empty, \
            ServerProcess(filled_cmd, env={FILL_ENV: str(FILLED)}) as filled:
        total = filled.json("GET", "/healthz")["total"]
        if total != FILLED:
            raise RuntimeError(f"expected {FILLED} tasks, the server has {total}")
        for _ in range(rounds):
            for name, server in (("housekeeping, empty table", empty),
                                 (f"housekeeping, {FILLED:,} tasks", filled)):
                metrics.row(name).samples.append(statistics.median(
                    latencies(server.host, server.port, "/metrics", samples // 2)))

    memory.pairs = []
    unread.pairs = []
    stalled.pairs = [(f"housekeeping {what}, warm processes stopped",
                      f"housekeeping {what}, warm processes running")
                     for what in ("POST (900 KB)", "GET /healthz right after")]
    health.pairs = [("housekeeping, big task + SSE follower", "housekeeping idle")]
    metrics.pairs = [(f"housekeeping, {FILLED:,} tasks", "housekeeping, empty table")]
    section.notes += [
        "the bounds: RSS growth ≤ 2.5× the JSON; /healthz p50 ≤ 20 ms under pressure; "
        "≤ 100 MiB beside a never-read stream; ≤ 100 ms with the warm processes stopped; "
        "/metrics p50 ≤ 20 ms with 20,000 tasks",
        "every server is `housekeeping serve --max-workers 2 --purge-delay 3600` with the "
        "benchmark animators; HOLD waits for its cancel, TICK also reports progress "
        "every 10 ms (the parent applies at most 20 versions a second)",
        "a round's figure is the median of sequential requests on one keep-alive "
        "connection; the table shows the median and p95 over rounds",
    ]
    return section
