"""Servers in subprocesses and the clients that load them, for the REST benchmarks.

The load generator is ``wrk`` when it is installed (``apt-get install wrk``),
else a keep-alive Python client; :func:`load_generator` names the one in use.
Latency at rest (no load) is measured by :func:`latencies`, one keep-alive
connection, one request at a time.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from benchmarks.common import TIMEOUT, percentile

ROOT = Path(__file__).resolve().parent.parent
#: wrk's settings: threads and connections (the figures in FACTS were taken so).
WRK_THREADS = 2
CONNECTIONS = 16
_SERVING = re.compile(r"serving on (http://[^\s]+)")


def hk_command(*extra: str, animators: str = "benchmarks.animators:register") -> list[str]:
    """``housekeeping serve`` on a free loopback port with the benchmark animators."""
    return [sys.executable, "-m", "rest", "serve", "--host", "127.0.0.1", "--port", "0",
            "--no-demo", "--animators", animators, "--log-level", "WARNING", *extra]


def bare_command(fixture: str) -> list[str]:
    """The bare Falcon floor serving ``fixture`` (see ``benchmarks.bare_app``)."""
    return [sys.executable, "-m", "benchmarks.bare_app", fixture]


class ServerProcess:
    """A server started as a subprocess; stopped with SIGTERM (then SIGKILL) on exit."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.command = command
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.url = ""
        self.host = ""
        self.port = 0

    def __enter__(self) -> ServerProcess:
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                     stderr=self._stderr, start_new_session=True)
        try:
            assert self.proc.stdout is not None
            ready = select.select([self.proc.stdout], [], [], TIMEOUT)[0]
            line = self.proc.stdout.readline().decode() if ready else ""
            found = _SERVING.search(line)
            if found is None:
                raise RuntimeError(f"server did not start: {line!r}\n{self.stderr_tail()}")
            self.url = found.group(1)
            self.host, port = self.url.rsplit("//", 1)[1].rsplit(":", 1)
            self.port = int(port)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far: (the server process, its helper processes and their children).

        A helper's reaped children (task processes) count in its ``children_*`` times.
        """
        server = psutil.Process(self.proc.pid)
        times = server.cpu_times()
        helpers = 0.0
        for child in server.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                t = child.cpu_times()
                helpers += t.user + t.system + t.children_user + t.children_system
        return times.user + times.system, helpers

    def stderr_tail(self) -> str:
        """The last lines the server wrote to stderr."""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-2000:]

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """One request on a new connection (set-up and checks only)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        try:
            payload = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=payload,
                         headers={"Content-Type": "application/json"})
            answer = conn.getresponse()
            return answer.status, answer.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any = None) -> Any:
        """One JSON request; raise unless it answered 2xx."""
        status, data = self.request(method, path, body)
        if not 200 <= status < 300:
            raise RuntimeError(f"{method} {path}: {status} {data[:200]!r}")
        return json.loads(data)


@dataclass
class Load:
    """What one load run measured."""

    rate: float  #: successful (2xx) requests per second
    p50: float  #: seconds
    p99: float  #: seconds
    requests: int
    errors: int  #: non-2xx answers and socket errors


def load_generator() -> str:
    """Name the load generator this run uses."""
    if shutil.which("wrk"):
        return f"wrk -t{WRK_THREADS} -c{CONNECTIONS} --latency (keep-alive)"
    return f"Python http.client, {CONNECTIONS} keep-alive connections in 2 processes (no wrk)"


def load(url: str, seconds: float, method: str = "GET", body: bytes | None = None) -> Load:
    """Drive ``url`` for ``seconds`` with the load generator."""
    if shutil.which("wrk"):
        return _wrk(url, seconds, method, body)
    return _python_load(url, seconds, method, body)


_WRK_SCRIPT = """
wrk.method = "{method}"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
"""
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def _wrk(url: str, seconds: float, method: str, body: bytes | None) -> Load:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT.format(
            method=method, body=json.dumps(body.decode()) if body is not None else "nil"))
    try:
        done = subprocess.run(
            ["wrk", f"-t{WRK_THREADS}", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s",
             "--latency", "--timeout", "10s", "-s", script.name, url],
            capture_output=True, text=True, timeout=seconds + TIMEOUT, check=True)
    finally:
        os.unlink(script.name)
    out = done.stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    elapsed = _seconds(re.search(r"requests in ([\d.]+\w+),", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket:
        errors += sum(int(n) for n in socket.groups())
    p50 = _seconds(re.search(r"\s50%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    p99 = _seconds(re.search(r"\s99%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    return Load((requests - errors) / elapsed, p50, p99, requests, errors)


def _python_client(url: str, seconds: float, method: str, body: bytes | None,
                   connections: int) -> tuple[list[float], int]:
    """Keep-alive loops on ``connections`` threads; return latencies of 2xx and errors."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    headers = {"Content-Type": "application/json"}

    def loop() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        mine: list[float] = []
        bad = 0
        while time.monotonic() < deadline:
            start = time.perf_counter()
            conn.request(method, path, body=body, headers=headers)
            answer = conn.getresponse()
            answer.read()
            if 200 <= answer.status < 300:
                mine.append(time.perf_counter() - start)
            else:
                bad += 1
        conn.close()
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=loop) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors[0]


def _python_load(url: str, seconds: float, method: str, body: bytes | None) -> Load:
    import multiprocessing

    started = time.monotonic()
    jobs = [(url, seconds, method, body, CONNECTIONS // 2)] * 2
    with multiprocessing.get_context("forkserver").Pool(2) as pool:
        results = pool.starmap(_python_client, jobs)
    elapsed = time.monotonic() - started
    latencies = [x for lat, _ in results for x in lat]
    errors = sum(e for _, e in results)
    if not latencies:
        return Load(0.0, 0.0, 0.0, errors, errors)
    return Load(len(latencies) / elapsed, percentile(latencies, 50), percentile(latencies, 99),
                len(latencies) + errors, errors)


def latencies(host: str, port: int, path: str, count: int) -> list[float]:
    """Time ``count`` sequential GETs of ``path`` on one keep-alive connection."""
    return timed_gets(host, port, [path] * count)


def timed_gets(host: str, port: int, paths: list[str]) -> list[float]:
    """Time one GET of each path, in turn, on one keep-alive connection."""
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    found = []
    try:
        for path in paths:
            start = time.perf_counter()
            conn.request("GET", path)
            answer = conn.getresponse()
            answer.read()
            found.append(time.perf_counter() - start)
            if answer.status != 200:
                raise RuntimeError(f"GET {path}: {answer.status}")
    finally:
        conn.close()
    return found
