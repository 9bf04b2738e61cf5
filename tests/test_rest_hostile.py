"""Hostile HTTP against a real ``housekeeping serve`` on loopback.

Raw-socket clients that are slow, idle, greedy or malformed: bodies and
headers trickled byte by byte, hundreds of idle connections, an event stream
that is never read, huge headers, a 10,000-character task id, non-UTF-8 and
very deeply nested JSON, malformed HTTP. Throughout, an honest client keeps
getting answers within a generous factor of the latency measured before any
attack, and every hostile request that is answered at all gets the right 4xx
(501 for an unknown transfer coding) as ``{"code", "message"}``.

Everything is bounded in count and time; the server runs with a short
``--channel-timeout`` so that closing idle and stalled connections can be seen.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import TIMEOUT, wait_for
from rest_support import LiveServer, SseClient

pytestmark = pytest.mark.slow

TASKS = "/api/v1/tasks"
EVENTS = "/api/v1/task-events"
THREADS = 8
MAX_STREAMS = 2
#: --channel-timeout of the server under test, seconds.
CHANNEL_TIMEOUT = 2
#: How long after CHANNEL_TIMEOUT the server may take to close a connection:
#: its sweep runs every second, plus scheduling slack on a loaded machine.
CLOSE_SLACK = 8.0
#: An honest client's median latency during an attack stays below LATENCY_FACTOR
#: times the median before it (but at least LATENCY_FLOOR: a loopback baseline
#: under a millisecond would make the bound a matter of scheduler noise), and
#: below MAX_LATENCY seconds.
LATENCY_FACTOR = 20
LATENCY_FLOOR = 0.025
MAX_LATENCY = 1.0
#: Honest requests per measurement.
SAMPLES = 25


# -- raw HTTP ---------------------------------------------------------------------------


class Answer:
    """A parsed HTTP answer from raw bytes."""

    def __init__(self, raw: bytes) -> None:
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.raw = raw
        self.status = int(lines[0].split(" ")[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        length = int(self.headers.get("content-length", len(body)))
        self.body = body[:length]

    def error(self, code: int) -> str:
        """Check the answer is ``code`` in the API's error form; return the message."""
        assert self.status == code, self.raw[:500]
        assert self.headers.get("content-type", "").startswith("application/json"), self.raw[:500]
        body = json.loads(self.body)
        assert isinstance(body, dict) and set(body) == {"code", "message"}, body
        assert body["code"] == code and isinstance(body["message"], str) and body["message"], body
        return str(body["message"])

    def json(self) -> Any:
        return json.loads(self.body)


class Hostile:
    """Raw sockets to one server, all closed on exit."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.sockets: list[socket.socket] = []

    def connect(self, rcvbuf: int | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sockets.append(sock)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(TIMEOUT)
        sock.connect(self.address)
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()

    def exchange(self, data: bytes) -> Answer | None:
        """Send ``data`` on a new connection, read until the server closes; None if no answer.

        A server that answers early and closes while the client still sends
        may reset the connection; whatever arrived before the reset counts.
        """
        with socket.create_connection(self.address, timeout=TIMEOUT) as sock:
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
            received = read_until_closed(sock)
        return Answer(received) if received else None


def read_until_closed(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Read what the server sends until it closes the connection (or resets it)."""
    chunks = []
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    else:
        raise AssertionError(f"the server kept the connection open for {timeout} s")
    return b"".join(chunks)


def request(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    """Build one raw HTTP/1.1 request that asks the server to close after answering."""
    fields = {"Host": "localhost", "Connection": "close", **headers}
    if body or method == "POST":
        fields.setdefault("Content-Length", str(len(body)))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode("latin-1") + b"\r\n" + body


def json_post(body: bytes, path: str = TASKS) -> bytes:
    return request("POST", path, body, **{"Content-Type": "application/json"})


# -- an honest client -------------------------------------------------------------------


class Prober:
    """Times honest ``GET /healthz`` requests, each on a new connection."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        self.host, self.port = parts.hostname, parts.port

    def once(self) -> float:
        started = time.perf_counter()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        try:
            conn.request("GET", "/healthz")
            answer = conn.getresponse()
            body = answer.read()
        finally:
            conn.close()
        elapsed = time.perf_counter() - started
        assert answer.status == 200, body
        return elapsed

    def median(self, samples: int = SAMPLES) -> float:
        return statistics.median(self.once() for _ in range(samples))

    def health(self) -> dict[str, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        try:
            conn.request("GET", "/healthz")
            return dict(json.loads(conn.getresponse().read()))
        finally:
            conn.close()


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = LiveServer("--threads", str(THREADS), "--max-streams", str(MAX_STREAMS),
                      "--max-workers", "2", "--purge-delay", "1",
                      "--channel-timeout", str(CHANNEL_TIMEOUT), "--log-level", "INFO")
    try:
        live.start()
        yield live
    finally:
        live.close()


@pytest.fixture(scope="module")
def prober(server: LiveServer) -> Prober:
    return Prober(server.url)


@pytest.fixture(scope="module")
def baseline(prober: Prober) -> float:
    """The honest client's median latency before any attack (after a warm-up)."""
    for _ in range(5):
        prober.once()
    return prober.median(SAMPLES * 2)


@pytest.fixture
def hostile(server: LiveServer) -> Iterator[Hostile]:
    parts = urlsplit(server.url)
    assert parts.hostname is not None and parts.port is not None
    clients = Hostile(parts.hostname, parts.port)
    try:
        yield clients
    finally:
        clients.close()


def assert_responsive(prober: Prober, baseline: float, what: str) -> float:
    """Measure the honest client now; fail if its median, or any one request, left the bound."""
    samples = [prober.once() for _ in range(SAMPLES)]
    median = statistics.median(samples)
    limit = min(max(LATENCY_FACTOR * baseline, LATENCY_FLOOR), MAX_LATENCY)
    assert median < limit, (
        f"during {what}: median GET latency {median * 1000:.1f} ms, "
        f"baseline {baseline * 1000:.1f} ms, limit {limit * 1000:.1f} ms")
    assert max(samples) < MAX_LATENCY, (
        f"during {what}: a GET took {max(samples):.2f} s (limit {MAX_LATENCY} s)")
    return median


@contextmanager
def repeating(action: Callable[[], None], count: int) -> Iterator[list[BaseException]]:
    """Run ``action`` up to ``count`` times in a thread while the block runs; yield its errors."""
    errors: list[BaseException] = []
    stop = threading.Event()

    def loop() -> None:
        for _ in range(count):
            if stop.is_set():
                return
            try:
                action()
            except BaseException as exc:  # reported by the test
                errors.append(exc)
                return

    thread = threading.Thread(target=loop, name="hostile", daemon=True)
    thread.start()
    try:
        yield errors
    finally:
        stop.set()
        thread.join(TIMEOUT)
    assert not thread.is_alive(), "the hostile client did not finish"


@contextmanager
def trickling(sockets: list[socket.socket], payload: bytes,
              interval: float = 0.05) -> Iterator[threading.Event]:
    """Send ``payload`` to every socket one byte per ``interval``, all in step.

    Yields an event that is set once every byte was sent.
    """
    done = threading.Event()
    stop = threading.Event()

    def loop() -> None:
        for index in range(len(payload)):
            for sock in sockets:
                sock.sendall(payload[index:index + 1])
            if stop.wait(interval):
                return
        done.set()

    thread = threading.Thread(target=loop, name="trickle", daemon=True)
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join(TIMEOUT)


def wait_all_closed(sockets: list[socket.socket], timeout: float) -> dict[socket.socket, bytes]:
    """Poll until the server closed every socket; return what each received."""
    received = {sock: b"" for sock in sockets}
    open_ = set(sockets)
    deadline = time.monotonic() + timeout
    while open_ and time.monotonic() < deadline:
        ready, _, _ = select.select(list(open_), [], [], 0.1)
        for sock in ready:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if chunk:
                received[sock] += chunk
            else:
                open_.discard(sock)
    assert not open_, f"{len(open_)} of {len(sockets)} connections still open after {timeout} s"
    return received


# -- the tests ----------------------------------------------------------------------------


def test_baseline_latency_is_sane(baseline: float) -> None:
    assert 0 < baseline < 0.2, baseline


def test_slow_headers_do_not_hold_up_others(
        prober: Prober, baseline: float, hostile: Hostile) -> None:
    # 200 clients send a request line, then a header one byte every 50 ms
    # (more than waitress's default connection limit of 100)
    slow = [hostile.connect() for _ in range(200)]
    for sock in slow:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n")
    with trickling(slow, b"X-Slow: " + b"s" * 30 + b"\r\n") as done:
        assert_responsive(prober, baseline, "200 clients trickling headers")
        assert done.wait(TIMEOUT)
    # once they finish, each slow client is served normally
    for sock in slow:
        sock.sendall(b"\r\n")
    for sock in slow:
        answer = Answer(read_until_closed(sock))
        assert answer.status == 200 and answer.json()["status"] == "ok", answer.raw


def test_slow_bodies_do_not_hold_threads(
        prober: Prober, baseline: float, hostile: Hostile) -> None:
    # twice as many slow uploads as the server has threads: waitress buffers
    # a body before a thread runs the request, so no thread waits for one
    body = b'{"operation": "NOPE", "args": {}}'
    slow = [hostile.connect() for _ in range(THREADS * 2)]
    for sock in slow:
        sock.sendall(json_post(body)[: -len(body)])
    with trickling(slow, body) as done:
        assert_responsive(prober, baseline, f"{len(slow)} bodies trickled byte by byte")
        assert done.wait(TIMEOUT)
    for sock in slow:
        assert "unsupported operation" in Answer(read_until_closed(sock)).error(409)


def test_many_idle_connections(
        prober: Prober, baseline: float, hostile: Hostile) -> None:
    # 200 connections that never send a byte, and 100 that stop mid-header;
    # waitress's default connection limit (100) would lock everyone else out
    idle = [hostile.connect() for _ in range(200)]
    partial = [hostile.connect() for _ in range(100)]
    for sock in partial:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: loc")
    opened = time.monotonic()
    assert_responsive(prober, baseline, "300 idle connections")
    # ... and the server closes them after --channel-timeout, without an answer
    received = wait_all_closed(idle + partial, CHANNEL_TIMEOUT + CLOSE_SLACK)
    assert time.monotonic() - opened >= CHANNEL_TIMEOUT * 0.9
    assert not any(received.values()), {v for v in received.values() if v}


@pytest.mark.parametrize("blob", [200_000, 100], ids=["beyond-the-buffers", "within-them"])
def test_an_event_stream_that_is_never_read(
        server: LiveServer, prober: Prober, baseline: float, hostile: Hostile,
        blob: int) -> None:
    """A stream client that never reads is closed after --channel-timeout, whether its
    backlog waits in the server (big events) or all of it sits in the kernel's socket
    buffers (small ones: the server has nothing left to write and sees no stall)."""
    # a stream client with a tiny receive buffer that never reads
    stuck = hostile.connect(rcvbuf=4096)
    stuck.sendall(request("GET", EVENTS, Accept="text/event-stream"))
    honest = SseClient(server.api(EVENTS))
    try:
        assert honest.status == 200
        wait_for(lambda: prober.health()["eventStreams"] == 2)
        # a third stream is over --max-streams 2
        third = hostile.exchange(request("GET", EVENTS))
        assert third is not None and "too many event streams" in third.error(503)
        assert third.headers.get("retry-after") == "5"
        big = {"blob": "x" * blob}
        ids = []
        for _ in range(8):
            answer = server.post(TASKS, json={"operation": "SLEEP", "args": {"seconds": 0},
                                              "serviceStates": big})
            assert answer.status_code == 201, answer.text
            ids.append(answer.json()["meta"]["id"])
        # the honest stream gets every task's events meanwhile
        seen: set[str] = set()
        for message in honest.messages():
            if message.get("event") == "POST":
                seen.add(message["data"]["task"]["meta"]["id"])
            if seen == set(ids):
                break
        assert seen == set(ids)
        # NOTE: the honest client goes on reading (else it stalls too, and is closed)
        threading.Thread(target=_drain, args=(honest,), daemon=True).start()
        assert_responsive(prober, baseline, "a stream that is never read")
        # the stuck stream took nothing for --channel-timeout: it is closed and
        # its slot (and server thread) comes back
        wait_for(lambda: prober.health()["eventStreams"] == 1,
                 timeout=CHANNEL_TIMEOUT + CLOSE_SLACK)
    finally:
        honest.close()
    wait_for(lambda: prober.health()["eventStreams"] == 0)
    again = SseClient(server.api(EVENTS))
    try:
        assert again.status == 200
    finally:
        again.close()
    wait_for(lambda: prober.health()["eventStreams"] == 0)  # NOTE: for the next test


def _drain(stream: SseClient) -> None:
    try:
        for _ in stream.messages():
            pass
    except Exception:  # NOTE: closed under it by the test, in any of several ways
        pass


def test_huge_headers_are_431(prober: Prober, baseline: float, hostile: Hostile) -> None:
    one_huge = request("GET", "/healthz", **{"X-Huge": "h" * 70_000})
    long_line = request("GET", f"{TASKS}/{'a' * 100_000}")

    def attack() -> None:
        for data in (one_huge, long_line):
            answer = hostile.exchange(data)
            assert answer is not None, "no answer"
            assert "Request Header Fields Too Large" in answer.error(431)

    attack()
    with repeating(attack, 50) as errors:
        assert_responsive(prober, baseline, "huge headers")
    assert not errors, errors
    # many small headers under the limit are fine
    many = request("GET", "/healthz", **{f"X-Many-{i}": "m" for i in range(3000)})
    answer = hostile.exchange(many)
    assert answer is not None and answer.status == 200, answer


@pytest.mark.parametrize("method, path", [
    ("GET", f"{TASKS}/{'a' * 10_000}"),
    ("POST", f"{TASKS}/{'a' * 10_000}/cancel"),
    ("GET", f"{TASKS}/%FF%FE%00"),
    ("GET", f"{TASKS}/..%2F..%2Fetc%2Fpasswd"),
])
def test_absurd_task_ids_are_404_without_echo(
        server: LiveServer, hostile: Hostile, method: str, path: str) -> None:
    answer = hostile.exchange(request(method, path))
    assert answer is not None
    message = answer.error(404)
    assert len(answer.body) < 300, len(answer.body)
    assert "not found" in message.lower()
    # nor is the whole path written to the access log
    wait_for(lambda: f" {method} /api/v1/tasks/" in server.log())
    assert "a" * 301 not in server.log()


BAD_BODIES = {
    "not UTF-8": (b'{"operation": "SLEEP", "objectId": "\xff\xfe"}', 400, "UTF-8"),
    "UTF-16": ('{"operation": "SLEEP"}'.encode("utf-16"), 400, "UTF-8"),
    "deep array": (b"[" * 100_000 + b"]" * 100_000, 400, "nested"),
    "deep object in args": (b'{"operation": "SLEEP", "args": ' + b'{"a": ' * 70 + b"1"
                            + b"}" * 70 + b"}", 400, "nested"),
    "deep and over 1 MiB": (b"[" * 600_000 + b"]" * 600_000, 413, "larger than"),
    "huge number": (b'{"operation": "SLEEP", "args": {"seconds": 1' + b"0" * 5000 + b"}}",
                    400, "JSON"),
    "NaN": (b'{"operation": "SLEEP", "args": {"seconds": NaN}}', 400, "NaN"),
    "truncated": (b'{"operation": "SLE', 400, "JSON"),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_malformed_json_is_rejected(
        prober: Prober, baseline: float, hostile: Hostile, name: str) -> None:
    body, code, words = BAD_BODIES[name]

    def attack() -> None:
        answer = hostile.exchange(json_post(body))
        assert answer is not None, "no answer"
        assert words in answer.error(code)

    attack()
    with repeating(attack, 30) as errors:
        assert_responsive(prober, baseline, f"{name} bodies")
    assert not errors, errors


MALFORMED = {
    "garbage request line": (b"GARBAGE\r\n\r\n", 400),
    "Content-Length not a number": (b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Length: abc\r\n\r\n", 400),
    "Content-Length past waitress's limit": (b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\n"
                                             b"Content-Type: application/json\r\n"
                                             b"Content-Length: 99999999999\r\n\r\n", 413),
    "header without a colon": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400),
    "bare LF in a header": (b"GET /healthz HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", 400),
    "unknown transfer coding": (b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\n"
                                b"Transfer-Encoding: gzip\r\n\r\n", 501),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_http_is_answered_in_the_error_form(hostile: Hostile, name: str) -> None:
    data, code = MALFORMED[name]
    answer = hostile.exchange(data)
    assert answer is not None
    answer.error(code)


def test_a_body_that_never_comes_is_closed(hostile: Hostile) -> None:
    # a declared body (under waitress's limit) that is never sent: no thread
    # waits for it, and the connection is closed as idle
    sock = hostile.connect()
    sock.sendall(json_post(b"")[:-2].replace(b"Content-Length: 0", b"Content-Length: 2000000")
                 + b"\r\n")
    received = wait_all_closed([sock], CHANNEL_TIMEOUT + CLOSE_SLACK)
    assert received[sock] == b""


def test_the_server_came_through(server: LiveServer, prober: Prober, baseline: float) -> None:
    assert server.proc is not None and server.proc.poll() is None, server.log()
    assert_responsive(prober, baseline, "nothing (after the attacks)")
    log = server.log()
    assert "Traceback" not in log, log[-4000:]
