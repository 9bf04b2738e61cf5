"""``housekeeping tasks logs`` and ``create --wait --logs``: a real server, the CLI as a
subprocess, and the log follower against scripted streams."""

from __future__ import annotations

import io
import json
import re
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TIMEOUT, wait_for
from rest_support import ROOT, LiveServer
from rich.console import Console

from rest import client as cli_client
from rest import client_logs
from rest.cli import DEFAULT_LOG_LIMIT, build_parser
from rest.client_render import LogPrinter, log_line_text

ANIMATORS = '''
import os
import sys
import time

from supervisor import Animator, TaskState


class Say(Animator):
    """Print each [stream, text] of args.lines, then return."""

    def execute(self, ops):
        lines = ops.task["args"].get("lines", [])
        for stream, text in lines:
            print(text, file=sys.stderr if stream == "stderr" else sys.stdout)
        return {"said": len(lines)}


class SayThenWait(Animator):
    """Print args.text, wait for the file args.gate (or a cancel), print, end as args.end."""

    def execute(self, ops):
        args = ops.task["args"]
        print(args["text"])
        while not os.path.exists(args["gate"]):
            if ops.is_canceled():
                print("canceled at last", file=sys.stderr)
                ops.set_state(TaskState.CANCELED)
            time.sleep(0.01)
        print("through the gate")
        if args.get("end") == "fail":
            raise RuntimeError("told to fail")
        return {"ok": True}


def register(manager):
    manager.register_animator("SAY", Say())
    manager.register_animator("SAY_THEN_WAIT", SayThenWait())
'''

#: --log-limit of the second server: a few KiB, so that a small task overflows it.
SMALL_LIMIT = 4096

_LINE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (stdout|stderr) (.*)")


def _server(folder: Path, *extra: str) -> LiveServer:
    (folder / "log_animators.py").write_text(ANIMATORS)
    return LiveServer("--animators", "log_animators:register", "--max-workers", "4",
                      *extra, cwd=folder).start()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = _server(tmp_path_factory.mktemp("logs"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = _server(tmp_path_factory.mktemp("small_logs"), "--log-limit", str(SMALL_LIMIT))
    try:
        yield server
    finally:
        server.close()


def create(live: LiveServer, operation: str, **args: Any) -> str:
    answer = live.post("/api/v1/tasks", json={"operation": operation, "args": args})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["meta"]["id"])


def complete_log(live: LiveServer, task_id: str) -> dict[str, Any]:
    """Poll the log over the API until it is complete; return it."""
    last: dict[str, Any] = {}

    def done() -> bool:
        last.update(live.get(f"/api/v1/tasks/{task_id}/log").json())
        return last.get("complete") is True

    wait_for(done, message=lambda: f"log is {last}")
    return last


def cli(live: LiveServer, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``housekeeping tasks ARGV`` as a subprocess against ``live``."""
    return subprocess.run(
        [sys.executable, "-m", "rest", "tasks", *argv], cwd=ROOT,
        env={**live.env, "HOUSEKEEPING_URL": live.url},
        capture_output=True, text=True, timeout=TIMEOUT,
    )


def parsed(out: str) -> list[tuple[str, str]]:
    """The (stream, text) of each ``TIME STREAM TEXT`` line printed."""
    lines = []
    for line in out.splitlines():
        match = _LINE.fullmatch(line)
        assert match is not None, f"not a log line: {line!r}"
        lines.append((match[2], match[3]))
    return lines


class Following:
    """``housekeeping tasks ARGV`` running, its stdout read line by line with a deadline."""

    def __init__(self, live: LiveServer, *argv: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rest", "tasks", *argv], cwd=ROOT,
            env={**live.env, "HOUSEKEEPING_URL": live.url},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []

    def read_until(self, fragment: str) -> str:
        """Read lines until one holds ``fragment``; return it."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(deadline - time.monotonic()):
                    break
                line = self.proc.stdout.readline()
                if not line:
                    break
                self.lines.append(line.rstrip("\n"))
                if fragment in line:
                    return line
        raise AssertionError(f"{fragment!r} not printed; got {self.lines}")

    def finish(self) -> tuple[int, str, str]:
        """Wait for the exit; return the code, the rest of stdout, and stderr."""
        out, err = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode, out, err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=TIMEOUT)


# -- tasks logs ------------------------------------------------------------------------

_SAID = [["stdout", "one"], ["stderr", "two"], ["stdout", "three"],
         ["stderr", "four\tx\x1b[31mred [bold]markup[/bold]"], ["stdout", "five"]]


@pytest.fixture(scope="module")
def said(live: LiveServer) -> tuple[str, list[dict[str, Any]]]:
    """A finished SAY task and its log lines as the API returns them."""
    task_id = create(live, "SAY", lines=_SAID)
    return task_id, complete_log(live, task_id)["lines"]


def test_logs_prints_both_streams_in_seq_order_with_the_stream(
        live: LiveServer, said: tuple[str, list[dict[str, Any]]]) -> None:
    task_id, lines = said
    done = cli(live, "logs", task_id)
    assert (done.returncode, done.stderr) == (0, "")
    shown = parsed(done.stdout)
    assert [stream for stream, _ in shown] == [line["stream"] for line in lines]
    assert [text for stream, text in shown if stream == "stdout"] == ["one", "three", "five"]
    assert [text for stream, text in shown if stream == "stderr"] == [
        "two", "four    x?[31mred [bold]markup[/bold]"]  # tab expanded, escape defused
    assert "\x1b" not in done.stdout


def test_logs_json_prints_each_line_as_the_api_has_it(
        live: LiveServer, said: tuple[str, list[dict[str, Any]]]) -> None:
    task_id, lines = said
    done = cli(live, "logs", task_id, "--json")
    assert (done.returncode, done.stderr) == (0, "")
    assert [json.loads(row) for row in done.stdout.splitlines()] == lines
    assert "\x1b" not in done.stdout


def test_logs_after_prints_only_the_later_lines(
        live: LiveServer, said: tuple[str, list[dict[str, Any]]]) -> None:
    task_id, lines = said
    after = lines[1]["seq"]
    done = cli(live, "logs", task_id, "--after", str(after), "--json")
    assert done.returncode == 0, done.stderr
    assert [json.loads(row) for row in done.stdout.splitlines()] == lines[2:]
    done = cli(live, "logs", task_id, "--after", str(lines[-1]["seq"]))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@pytest.mark.parametrize(("end", "code"), [("succeed", cli_client.RET_OK),
                                           ("fail", cli_client.RET_TASK_FAILED),
                                           ("cancel", cli_client.RET_TASK_CANCELED)])
def test_follow_prints_while_the_task_runs_and_exits_with_its_outcome(
        live: LiveServer, tmp_path: Path, end: str, code: int) -> None:
    gate = tmp_path / "gate"
    task_id = create(live, "SAY_THEN_WAIT", text=f"waiting to {end}", gate=str(gate), end=end)
    following = Following(live, "logs", task_id, "--follow")
    try:
        line = following.read_until(f"waiting to {end}")
        assert " stdout " in line
        # NOTE: the task waits for the gate, so the line came while it ran.
        assert live.get(f"/api/v1/tasks/{task_id}").json()["state"] == "ACTIVE"
        if end == "cancel":
            assert live.post(f"/api/v1/tasks/{task_id}/cancel").status_code == 200
        else:
            gate.touch()
        returncode, out, err = following.finish()
    finally:
        following.close()
    assert returncode == code, err
    assert err == ""
    if end == "cancel":
        assert parsed(out) == [("stderr", "canceled at last")]
    else:
        assert parsed(out) == [("stdout", "through the gate")]
    assert live.get(f"/api/v1/tasks/{task_id}").json()["state"] == {
        "succeed": "SUCCEEDED", "fail": "FAILED", "cancel": "CANCELED"}[end]


@pytest.mark.parametrize("follow", [[], ["--follow"]])
def test_logs_of_an_unknown_task_is_the_not_found_code(live: LiveServer,
                                                       follow: list[str]) -> None:
    done = cli(live, "logs", "NOPE000001", *follow)
    assert done.returncode == cli_client.RET_API == 10
    assert done.stderr.startswith("housekeeping: 404") and done.stderr.count("\n") == 1
    assert done.stdout == ""


# -- --log-limit and dropped lines -------------------------------------------------------


def test_serve_log_limit_is_validated_and_defaults_to_the_library_s() -> None:
    from supervisor.manager import DEFAULT_LOG_LIMIT as LIBRARY_DEFAULT

    assert build_parser().parse_args(["serve"]).log_limit == DEFAULT_LOG_LIMIT == LIBRARY_DEFAULT
    assert build_parser().parse_args(["serve", "--log-limit", "65536"]).log_limit == 65536
    for bad in ("0", "-1", "1.5", "lots"):
        with pytest.raises(SystemExit) as caught:
            build_parser().parse_args(["serve", "--log-limit", bad])
        assert caught.value.code == 2


@pytest.mark.parametrize("follow", [[], ["--follow"]])
def test_a_log_over_the_limit_drops_lines_and_says_how_many(
        small: LiveServer, follow: list[str]) -> None:
    lines = [["stdout", f"line {i:04d} " + "x" * 90] for i in range(200)]  # ~20 KB
    task_id = create(small, "SAY", lines=lines)
    log = complete_log(small, task_id)
    assert log["dropped"] > 0
    assert sum(len(line["text"]) + 1 for line in log["lines"]) <= SMALL_LIMIT
    done = cli(small, "logs", task_id, *follow)
    assert done.returncode == 0, done.stderr
    assert done.stderr == (f"housekeeping: {log['dropped']} older lines of this log were "
                           "dropped (the server keeps the newest --log-limit bytes of each "
                           "task)\n")
    shown = parsed(done.stdout)
    assert shown == [("stdout", line["text"]) for line in log["lines"]]
    assert shown[-1] == ("stdout", lines[-1][1])  # the newest kept
    # after the dropped ones, nothing was missed, so nothing is said
    done = cli(small, "logs", task_id, "--after", str(log["dropped"]), *follow)
    assert (done.returncode, done.stderr) == (0, "")


# -- create --wait --logs ----------------------------------------------------------------


def test_create_wait_logs_shows_the_task_s_lines_then_its_outcome(live: LiveServer) -> None:
    args = json.dumps({"lines": [["stdout", "hello from the task"], ["stderr", "a warning"]]})
    done = cli(live, "create", "SAY", "--args", args, "--wait", "--logs")
    assert (done.returncode, done.stderr) == (0, "")
    rows = done.stdout.splitlines()
    said = [row for row in rows if _LINE.fullmatch(row)]
    assert parsed("\n".join(said)) == [("stdout", "hello from the task"), ("stderr", "a warning")]
    outcome = rows.index(next(row for row in rows if " SUCCEEDED " in row))
    assert rows.index(said[-1]) < outcome  # the log came above the final line


def test_create_logs_shows_lines_printed_while_it_runs(live: LiveServer, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    args = json.dumps({"text": "still running", "gate": str(gate)})
    following = Following(live, "create", "SAY_THEN_WAIT", "--args", args, "--logs")
    try:
        following.read_until("still running")
        gate.touch()
        returncode, out, err = following.finish()
    finally:
        following.close()
    assert (returncode, err) == (0, "")
    assert "through the gate" in out and " SUCCEEDED " in out


def test_create_logs_with_json_is_refused_before_creating(live: LiveServer) -> None:
    before = len(live.get("/api/v1/tasks").json())
    done = cli(live, "create", "SAY", "--logs", "--json")
    assert done.returncode == cli_client.RET_API and "--json" in done.stderr
    assert len(live.get("/api/v1/tasks").json()) == before


# -- the follower and the printer, without a server ----------------------------------------


def _line(seq: int, text: str = "", stream: str = "stdout") -> dict[str, Any]:
    return {"seq": seq, "time": "2026-12-03T00:17:21.319288Z", "stream": stream,
            "text": text or f"line {seq}"}


def _event(seq: int) -> dict[str, Any]:
    return {"method": "line", "line": _line(seq)}


class DummyLogApi:
    """An ApiClient stand-in: scripted log streams and log pages, with the ``after``s asked."""

    def __init__(self, streams: list[list[Any]] | None = None,
                 pages: list[dict[str, Any]] | None = None) -> None:
        self.streams = streams or []
        self.pages = pages or []
        self.afters: list[int] = []

    def log_events(self, task_id: str, after: int = 0) -> Iterator[dict[str, Any]]:
        self.afters.append(after)
        script = self.streams[len(self.afters) - 1]
        for item in script:
            if isinstance(item, Exception):
                raise item
            yield item

    def get_log(self, task_id: str, after: int = 0, limit: int = 0) -> dict[str, Any]:
        self.afters.append(after)
        return self.pages[len(self.afters) - 1]


def _follow(api: DummyLogApi, after: int = 0) -> tuple[client_logs.LogFollower, list[int]]:
    shown: list[int] = []
    follower = client_logs.LogFollower(
        api, "T", after=after, on_line=lambda line: shown.append(line["seq"]),  # type: ignore[arg-type]
        sleep=lambda s: None)
    follower.run()
    return follower, shown


def test_follower_resumes_after_the_last_line_when_a_stream_ends_without_end() -> None:
    broken = cli_client.ClientError(cli_client.RET_CONNECTION, "cannot reach x: reset")
    api = DummyLogApi(streams=[
        [cli_client.OPENED, _event(4), _event(5)],  # dropped for being slow: no end
        [cli_client.OPENED, _event(5), _event(6), broken],  # 5 repeated: shown once
        [cli_client.OPENED, _event(7), {"method": "end", "next": 7, "dropped": 3}],
    ])
    follower, shown = _follow(api, after=3)
    assert api.afters == [3, 5, 6]
    assert shown == [4, 5, 6, 7]  # each once, in order
    assert (follower.dropped, follower.next, follower.connections) == (3, 7, 3)


def test_follower_reports_a_task_purged_while_it_reconnected() -> None:
    gone = cli_client.ClientError(cli_client.RET_API, "404: task 'T' not found")
    api = DummyLogApi(streams=[[cli_client.OPENED, _event(1)], [gone]])
    with pytest.raises(cli_client.ClientError) as failure:
        _follow(api)
    assert failure.value.code == cli_client.RET_API
    assert "purged before its log ended" in str(failure.value)


def test_follower_fails_at_once_when_it_never_connected() -> None:
    for error in (cli_client.ClientError(cli_client.RET_CONNECTION, "cannot reach x"),
                  cli_client.ClientError(cli_client.RET_API, "404: task 'T' not found")):
        api = DummyLogApi(streams=[[error]])
        with pytest.raises(cli_client.ClientError) as failure:
            _follow(api)
        assert failure.value is error and api.afters == [0]


def test_follower_gives_up_after_the_reconnect_window() -> None:
    broken = cli_client.ClientError(cli_client.RET_CONNECTION, "cannot reach x: refused")
    api = DummyLogApi(streams=[[cli_client.OPENED, _event(1), broken]] + [[broken]] * 1000)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    follower = client_logs.LogFollower(api, "T", reconnect_for=30,  # type: ignore[arg-type]
                                      sleep=sleep, clock=lambda: now[0])
    with pytest.raises(cli_client.ClientError) as failure:
        follower.run()
    assert "gave up reconnecting after 30 s" in str(failure.value)
    assert set(api.afters[1:]) == {1}


def test_read_log_pages_until_a_short_or_complete_page() -> None:
    full = [_line(seq) for seq in range(1, cli_client.LOG_PAGE + 1)]
    api = DummyLogApi(pages=[
        {"lines": full, "next": cli_client.LOG_PAGE, "dropped": 0, "complete": False},
        {"lines": [_line(cli_client.LOG_PAGE + 1)], "next": cli_client.LOG_PAGE + 1,
         "dropped": 0, "complete": False},
    ])
    shown: list[int] = []
    page = client_logs.read_log(api, "T", 0, lambda line: shown.append(line["seq"]))  # type: ignore[arg-type]
    assert api.afters == [0, cli_client.LOG_PAGE]
    assert shown == list(range(1, cli_client.LOG_PAGE + 2)) and page["next"] == shown[-1]


def test_parse_log_sse() -> None:
    lines = ["retry: 3000", ": keep-alive", "", "id: 1", "event: line",
             "data: " + json.dumps(_line(1)), "", "event: end",
             'data: {"next": 1, "dropped": 0}', "", "event: line", "data: [1]", ""]
    assert list(cli_client.parse_log_sse(iter(lines))) == [
        {"method": "line", "line": _line(1)}, {"method": "end", "next": 1, "dropped": 0}]


def test_note_dropped_counts_only_the_lines_asked_for(capsys: pytest.CaptureFixture[str]) -> None:
    client_logs.note_dropped(5, 0)
    client_logs.note_dropped(5, 4)
    client_logs.note_dropped(5, 5)
    client_logs.note_dropped(None, 0)
    err = capsys.readouterr().err.splitlines()
    assert [row.split(" older ")[0] for row in err] == ["housekeeping: 5", "housekeeping: 1"]
    assert "1 older line of" in err[1]


def test_printer_colours_stderr_on_a_terminal_and_defuses_task_text() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system="standard", highlight=False)
    printer = LogPrinter(console)
    printer.show(_line(1, "fine"))
    printer.show(_line(2, "bad \x1b[2J\x1b]0;owned\x07 [red]x[/red] \u202e", "stderr"))
    text = out.getvalue()
    assert "\x1b[2J" not in text and "\x07" not in text and "\u202e" not in text
    assert "bad ?[2J?]0;owned? [red]x[/red] ?" in text
    assert "\x1b[31m" in text.splitlines()[1] and "\x1b[31m" not in text.splitlines()[0]
    assert log_line_text(_line(3)).plain == "2026-12-03T00:17:21.319Z stdout line 3"
