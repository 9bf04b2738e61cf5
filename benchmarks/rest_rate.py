"""Request rates of a live ``housekeeping serve`` on loopback, next to bare Falcon on waitress.

Usage::

    python benchmarks/rest_rate.py [--seconds 5] [--clients 2] [--connections 4]

It starts each server as a subprocess on a free loopback port and drives it
for a bounded time from ``--clients`` processes holding ``--connections``
keep-alive connections each, then stops it with SIGTERM. Measured:

* ``baseline GET``: a bare Falcon app on waitress answering a small JSON object
  (the ceiling that waitress and the GIL set on this machine);
* ``GET /api/v1/tasks/{id}``: one task, fetched again and again;
* ``POST /api/v1/tasks (queued)``: creation only: ``--max-workers 1`` and a
  first task that never ends, so every new task waits as NEW and no process
  is started per request (the REST layer and the manager's bookkeeping, not
  process start; see the manager's own benchmarks for that).

Servers run with ``--log-level WARNING`` (no access log) except the row
marked "access log", which shows what one INFO line per request costs.

Client and server share the machine's cores, so compare the rows of one run
with each other, not with figures taken elsewhere.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE_APP = """
import sys, falcon, waitress
class Thing:
    def on_get(self, req, resp):
        resp.media = {"meta": {"id": "X1", "version": 1}, "state": "ACTIVE"}
app = falcon.App()
app.add_route("/thing", Thing())
server = waitress.create_server(app, host="127.0.0.1", port=0, threads=8)
print(f"housekeeping serving on http://127.0.0.1:{server.effective_port}", flush=True)
server.run()
"""


def start(command: list[str]) -> tuple[subprocess.Popen[bytes], str, int]:
    """Start a server subprocess; return it with the host and port it printed."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if "serving on http://" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    host, port = line.rsplit("//", 1)[1].split(":")
    return proc, host, int(port)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server and wait for it (kill it if it does not exit)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _client(host: str, port: int, method: str, path: str, body: bytes | None,
            connections: int, seconds: float) -> Counter[int]:
    """Run ``connections`` keep-alive loops until the deadline; count answers by status."""
    deadline = time.monotonic() + seconds
    counts: list[Counter[int]] = [Counter() for _ in range(connections)]
    headers = {"Content-Type": "application/json"} if body is not None else {}

    def loop(count: Counter[int]) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        while time.monotonic() < deadline:
            conn.request(method, path, body=body, headers=headers)
            answer = conn.getresponse()
            answer.read()
            count[answer.status] += 1
        conn.close()

    threads = [threading.Thread(target=loop, args=(count,)) for count in counts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts, Counter())


def drive(host: str, port: int, method: str, path: str, body: bytes | None, expect: int,
          args: argparse.Namespace) -> tuple[float, Counter[int]]:
    """Drive the server from ``args.clients`` processes.

    Returns:
        The rate of ``expect`` answers per second, and the count of every other status.
    """
    jobs = [(host, port, method, path, body, args.connections, args.seconds)] * args.clients
    started = time.monotonic()
    with multiprocessing.get_context("spawn").Pool(args.clients) as pool:
        results = pool.starmap(_client, jobs)
    elapsed = time.monotonic() - started
    total: Counter[int] = sum(results, Counter())
    ok = total.pop(expect, 0)
    return ok / elapsed, total


def request(host: str, port: int, method: str, path: str, body: dict[str, object] | None = None
            ) -> dict[str, object]:
    """One JSON request (setup only)."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    payload = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
    answer = json.loads(conn.getresponse().read())
    conn.close()
    return dict(answer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--connections", type=int, default=4, help="connections per client")
    args = parser.parse_args()
    serve = [sys.executable, "-m", "rest", "serve", "--port", "0"]
    quiet = [*serve, "--log-level", "WARNING"]
    rows: list[tuple[str, float, Counter[int]]] = []
    create = json.dumps({"operation": "SLEEP", "args": {"seconds": 0}}).encode()

    def measure(command: list[str], name: str, method: str, path: str,
                body: bytes | None = None, expect: int = 200, setup: bool = False) -> None:
        proc, host, port = start(command)
        try:
            if setup:  # one task that runs for the whole measurement
                first = request(host, port, "POST", "/api/v1/tasks",
                                {"operation": "SLEEP", "args": {"seconds": 3600}})
                path = path.format(id=first["meta"]["id"])  # type: ignore[index]
            rows.append((name, *drive(host, port, method, path, body, expect, args)))
        finally:
            stop(proc)

    measure([sys.executable, "-c", BASELINE_APP], "baseline GET (bare Falcon)", "GET", "/thing")
    measure([*quiet, "--max-workers", "1"], "GET /api/v1/tasks/{id}", "GET",
            "/api/v1/tasks/{id}", setup=True)
    measure([*serve, "--max-workers", "1"], "GET /api/v1/tasks/{id}, access log", "GET",
            "/api/v1/tasks/{id}", setup=True)
    measure([*quiet, "--max-workers", "1"], "POST /api/v1/tasks (queued)", "POST",
            "/api/v1/tasks", create, 201, setup=True)

    print(f"{args.clients} client processes x {args.connections} connections, "
          f"{args.seconds:g} s each, on {os.cpu_count()} CPUs")
    for name, rate, others in rows:
        extra = ", ".join(f"{n} x {status}" for status, n in sorted(others.items()))
        print(f"  {name:38s} {rate:8.0f} req/s" + (f"  (also {extra})" if extra else ""))

if __name__ == "__main__":
    main()
