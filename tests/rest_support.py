"""Helpers of the REST tests: a TestClient over a fake manager, a live server, an SSE reader."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import requests
from conftest import PRIVATE_PIDS_OFF, TIMEOUT, describe, is_alive, wait_for
from fakes import FakeManager
from falcon import testing

from rest import RestOptions, create_app
from rest.cli import RET_OK

ROOT = Path(__file__).resolve().parent.parent


def make_client(
    manager: Any = None, access_control: Any = None, **options: Any
) -> tuple[testing.TestClient, Any]:
    """Return a TestClient over ``create_app`` and the manager behind it (a FakeManager)."""
    manager = manager if manager is not None else FakeManager()
    app = create_app(manager, access_control, options=RestOptions(**options))
    return testing.TestClient(app), manager


def bearer(token: str) -> dict[str, str]:
    """The Authorization header for ``token``."""
    return {"Authorization": f"Bearer {token}"}


def assert_error(status: int, body: Any, code: int, *fragments: str) -> str:
    """Check an error answer: the status, exactly ``{"code", "message"}``, words in the message."""
    assert status == code, body
    assert isinstance(body, dict) and set(body) == {"code", "message"}, body
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    for fragment in fragments:
        assert fragment in body["message"], body
    return str(body["message"])


# -- live server -------------------------------------------------------------------


class LiveServer:
    """``python -m rest serve --port 0 ...`` in a subprocess of its own process group."""

    def __init__(self, *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> None:
        self.args = ["--port", "0", "--cancel-grace", "1", *args]
        if PRIVATE_PIDS_OFF:
            self.args.append("--no-private-pids")
        self.cwd = cwd
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = tempfile.TemporaryFile()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.session = requests.Session()

    def start(self) -> LiveServer:
        """Start the server and wait for the URL it prints."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rest", "serve", *self.args],
            cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=self._log,
            start_new_session=True,
        )
        line = self._read_line(TIMEOUT)
        if not line.startswith("housekeeping serving on http://"):
            self.kill()
            raise AssertionError(f"server did not start: {line!r}\n{self.log()}")
        self.url = line.rsplit(" ", 1)[1]
        return self

    def run_to_exit(self, timeout: float = TIMEOUT) -> tuple[int, str, str]:
        """Run a server command that is expected to exit on its own."""
        done = subprocess.run(
            [sys.executable, "-m", "rest", "serve", *self.args], cwd=self.cwd, env=self.env,
            capture_output=True, text=True, timeout=timeout,
        )
        return done.returncode, done.stdout, done.stderr

    def _read_line(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                return f"<nothing printed within {timeout} s>"
        return self.proc.stdout.readline().decode().strip()

    def api(self, path: str) -> str:
        """The absolute URL of ``path``."""
        return self.url + path

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        """GET ``path`` with a deadline."""
        return self.session.get(self.api(path), timeout=TIMEOUT, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        """POST ``path`` with a deadline."""
        return self.session.post(self.api(path), timeout=TIMEOUT, **kwargs)

    def tree(self) -> list[psutil.Process]:
        """The server process and everything below it."""
        assert self.proc is not None
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        """Send ``sig`` and wait for the exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the server, its group and every descendant (cleanup after a failure)."""
        if self.proc is None:
            return
        procs = self.tree()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=5)
        self.proc.wait(5)

    def close(self) -> None:
        """Stop the server if it still runs (SIGTERM, then SIGKILL), and free resources."""
        self.session.close()
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()

    def log(self) -> str:
        """What the server wrote to stderr so far."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")


# -- server-sent events ---------------------------------------------------------------


class SseClient:
    """A blocking reader of a ``text/event-stream`` (http.client, so chunks arrive as sent)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None,
                 timeout: float = TIMEOUT) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        self.conn.request("GET", target, headers=headers or {})
        self.response = self.conn.getresponse()
        self.status = self.response.status

    def body(self) -> Any:
        """The JSON body of a non-stream answer."""
        return json.loads(self.response.read())

    def messages(self) -> Iterator[dict[str, Any]]:
        """Yield each SSE message as ``{"event", "data", "comments"}`` (data parsed as JSON)."""
        event: dict[str, Any] = {"comments": []}
        while True:
            raw = self.response.readline()
            if not raw:
                return
            line = raw.decode("utf-8").rstrip("\r\n")
            if line == "":
                if set(event) != {"comments"} or event["comments"]:
                    yield event
                event = {"comments": []}
            elif line.startswith(":"):
                event["comments"].append(line[1:].strip())
            else:
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                event[field] = json.loads(value) if field == "data" else value

    def next_event(self, skip_comments: bool = True) -> dict[str, Any]:
        """The next message that carries an event (comments skipped)."""
        for message in self.messages():
            if "event" in message or not skip_comments:
                return message
        raise AssertionError("the stream ended")

    def close(self) -> None:
        """Close the connection (the response holds the socket too).

        NOTE: shut down first: a thread blocked reading the stream would keep
        the socket open (no FIN) until its read returns.
        """
        if self.conn.sock is not None:
            try:
                self.conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.response.close()
        self.conn.close()



# -- OpenAPI ---------------------------------------------------------------------------


class OpenApiChecker:
    """Check real answers against the OpenAPI document: status documented, body valid."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    def response_spec(self, path: str, method: str, status: int) -> dict[str, Any]:
        """The documented response (``$ref`` followed); fails if the status is undocumented."""
        operation = self.document["paths"][path][method.lower()]
        assert str(status) in operation["responses"], (
            f"{method} {path} answered {status}, documented: {sorted(operation['responses'])}")
        spec = operation["responses"][str(status)]
        if "$ref" in spec:
            spec = self.document["components"]["responses"][spec["$ref"].rsplit("/", 1)[1]]
        return dict(spec)

    def check(self, path: str, method: str, status: int, headers: Any, body: Any) -> None:
        """Check one answer: status documented, documented headers present, body valid."""
        from openapi_schema_validator import OAS31Validator, oas31_format_checker

        spec = self.response_spec(path, method, status)
        for name, header in spec.get("headers", {}).items():
            if name == "Retry-After" and status == 503:
                continue  # documented as sent only when the stream limit is reached
            if header.get("required") is False:
                continue  # documented as sent only in some answers
            assert name.lower() in {h.lower() for h in headers}, f"{name} missing on {status}"
        content = spec.get("content", {})
        if "application/json" not in content:
            return
        schema = {**content["application/json"]["schema"],
                  "components": self.document["components"]}
        OAS31Validator(schema, format_checker=oas31_format_checker).validate(body)


@contextlib.contextmanager
def serving(live: LiveServer, *, stragglers_exit: bool = False) -> Iterator[LiveServer]:
    """Start ``live`` and yield it; then stop it (it must exit with ``RET_OK``) and
    check that no process of its tree is left, and close it in any case.

    With ``stragglers_exit``, processes that end on their own once their parent is
    gone (multiprocessing's resource tracker, say) are waited for, within the
    deadline; otherwise nothing may be left at once.
    """
    try:
        live.start()
        yield live
        tree = live.tree()
        assert live.stop() == RET_OK, live.log()

        def left() -> list[str]:
            return [describe(p) for p in tree if is_alive(p)]

        if stragglers_exit:
            wait_for(lambda: not left(), message=lambda: str(left()))
        assert not left(), left()
    finally:
        live.close()
