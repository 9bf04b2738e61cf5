"""``housekeeping tasks ...``: the command-line client, against a real server and fakes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import TIMEOUT, free_port, wait_for
from fakes import DummyAccessControl, FakeManager
from rest_support import ROOT, LiveServer, make_client

from rest import client as cli_client
from rest.cli import build_parser, main

ANIMATORS = '''
import time
from supervisor import Animator


class Fail(Animator):
    def execute(self, ops):
        raise RuntimeError("disk on fire")


class Talk(Animator):
    def execute(self, ops):
        ops.message(ops.task["args"].get("say", ""))
        return {"said": True}


def register(manager):
    manager.register_animator("FAIL", Fail())
    manager.register_animator("TALK", Talk())
'''


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("client")
    (folder / "cli_animators.py").write_text(ANIMATORS)
    server = LiveServer("--animators", "cli_animators:register", "--max-workers", "2",
                        cwd=folder)
    server.start()
    try:
        yield server
    finally:
        server.close()


def run(live: LiveServer, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``housekeeping tasks ARGV`` in this process against ``live``."""
    capsys.readouterr()
    code = main(["tasks", argv[0], "--url", live.url, *argv[1:]])
    out, err = capsys.readouterr()
    return code, out, err


def create(live: LiveServer, operation: str, **args: Any) -> str:
    answer = live.post("/api/v1/tasks", json={"operation": operation, "args": args})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["meta"]["id"])


# -- exit codes of create --wait and watch ---------------------------------------------


def test_create_wait_exits_0_when_the_task_succeeds(live: LiveServer, capsys: Any) -> None:
    code, out, err = run(live, capsys, "create", "HASH", "--args", '{"megabytes": 8}', "--wait")
    assert (code, err) == (0, "")
    last = out.strip().splitlines()[-1]
    assert last.startswith("HASH") and " SUCCEEDED " in last and '"digest"' in last


def test_create_wait_exits_1_when_the_task_fails(live: LiveServer, capsys: Any) -> None:
    code, out, _ = run(live, capsys, "create", "FAIL", "--wait")
    assert code == cli_client.RET_TASK_FAILED == 1
    assert "FAILED: " in out and "disk on fire" in out


def test_watch_exits_2_when_the_task_is_canceled(live: LiveServer, capsys: Any) -> None:
    task_id = create(live, "SLEEP", seconds=60)

    def cancel_when_running() -> None:
        wait_for(lambda: live.get(f"/api/v1/tasks/{task_id}").json()["state"] == "ACTIVE")
        live.post(f"/api/v1/tasks/{task_id}/cancel")

    canceler = threading.Thread(target=cancel_when_running)
    canceler.start()
    try:
        code, out, _ = run(live, capsys, "watch", task_id)
    finally:
        canceler.join(TIMEOUT)
    assert code == cli_client.RET_TASK_CANCELED == 2
    assert f"{task_id} CANCELED" in out


def test_watch_of_several_tasks_reports_the_worst_outcome(live: LiveServer, capsys: Any) -> None:
    ok, bad = create(live, "SLEEP", seconds=0), create(live, "FAIL")
    code, out, _ = run(live, capsys, "watch", ok, bad)
    assert code == 1
    assert f"{ok} SUCCEEDED" in out and f"{bad} FAILED" in out


def test_a_real_command_draws_a_bar_and_exits_0(live: LiveServer) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rest", "tasks", "create", "HASH",
         "--args", '{"megabytes": 16}', "--wait"],
        cwd=ROOT, env={**live.env, "HOUSEKEEPING_URL": live.url},
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert "━" in done.stdout and "100%" in done.stdout  # the bar, drawn once at the end
    assert "SUCCEEDED" in done.stdout and done.stderr == ""


# -- list, get, cancel -------------------------------------------------------------------


def test_list_get_and_cancel_print_tables_and_json(live: LiveServer, capsys: Any) -> None:
    task_id = create(live, "SLEEP", seconds=60)
    code, out, _ = run(live, capsys, "list", "--operation", "SLEEP")
    assert code == 0
    header = out.splitlines()[0].split()
    assert header[:4] == ["ID", "OPERATION", "OBJECT", "STATE"]
    assert task_id in out
    code, out, _ = run(live, capsys, "list", "--json", "--operation", "SLEEP")
    listed = json.loads(out)
    assert task_id in [task["meta"]["id"] for task in listed]
    assert all(task["operation"] == "SLEEP" for task in listed)
    code, out, _ = run(live, capsys, "list", "--json", "--state", "succeeded")
    assert all(task["state"] == "SUCCEEDED" for task in json.loads(out))
    code, out, _ = run(live, capsys, "get", task_id)
    assert code == 0 and "cancelRequested" in out and task_id in out
    code, out, _ = run(live, capsys, "get", task_id, "--json")
    assert json.loads(out)["meta"]["id"] == task_id
    code, out, _ = run(live, capsys, "cancel", task_id, "--json")
    assert code == 0 and json.loads(out)["cancelRequested"] is True
    wait_for(lambda: live.get(f"/api/v1/tasks/{task_id}").json()["state"] == "CANCELED")


def test_create_prints_the_new_task(live: LiveServer, capsys: Any) -> None:
    code, out, _ = run(live, capsys, "create", "SLEEP", "--object-id", "vol-9",
                       "--args", '{"seconds": 0}', "--json")
    task = json.loads(out)
    assert code == 0 and task["objectId"] == "vol-9" and task["args"] == {"seconds": 0}


@pytest.mark.parametrize(("argv", "fragment"), [
    (["get", "NOPE000001"], "404"),
    (["cancel", "NOPE000001"], "404"),
    (["create", "COPY"], "409"),
    (["create", "HASH", "--args", '{"megabytes": 0}'], "args.megabytes"),
    (["create", "HASH", "--args", "{not json"], "not valid JSON"),
    (["create", "HASH", "--args", "[1]"], "JSON object"),
    (["watch", "NOPE000001"], "not found"),
])
def test_api_errors_are_one_line(live: LiveServer, capsys: Any, argv: list[str],
                                 fragment: str) -> None:
    code, _, err = run(live, capsys, *argv)
    assert code == cli_client.RET_API
    assert err.startswith("housekeeping: ") and err.count("\n") == 1 and fragment in err


# -- connection and auth errors ----------------------------------------------------------


@pytest.mark.parametrize("argv", [["list"], ["create", "SLEEP", "--wait"], ["watch"]])
def test_unreachable_server_is_a_one_line_error(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rest", "tasks", *argv],
        cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                       "HOUSEKEEPING_URL": f"http://127.0.0.1:{free_port()}"},
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert done.returncode == cli_client.RET_CONNECTION == 8, done.stderr
    assert done.stderr.startswith("housekeeping: cannot reach http://127.0.0.1:")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def _in_process(argv: list[str], manager: Any = None, access: Any = None,
                capsys: Any = None) -> tuple[int, str, str]:
    """Run a client command against a WSGI app over a FakeManager (no server)."""
    client, manager = make_client(manager, access)
    args = build_parser().parse_args(["tasks", *argv, "--url", "http://testserver"])
    code = cli_client.run_tasks_command(args, transport=httpx.WSGITransport(app=client.app))
    out, err = capsys.readouterr()
    return code, out, err


def test_auth_errors_have_their_own_exit_code(capsys: Any) -> None:
    access = DummyAccessControl({"ops": {"view": {"*"}, "create": {"SLEEP"}}})
    code, _, err = _in_process(["list"], access=access, capsys=capsys)
    assert code == cli_client.RET_AUTH == 9
    assert err.startswith("housekeeping: 401 unauthorized:") and "HOUSEKEEPING_TOKEN" in err
    code, _, err = _in_process(["create", "HASH", "--token", "ops"], access=access, capsys=capsys)
    assert code == cli_client.RET_AUTH and "403 forbidden" in err
    code, out, _ = _in_process(["list", "--token", "ops", "--json"], access=access, capsys=capsys)
    assert (code, json.loads(out)) == (0, [])


def test_token_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setenv("HOUSEKEEPING_TOKEN", "ops")
    access = DummyAccessControl({"ops": {"view": {"*"}}})
    code, _, err = _in_process(["list"], access=access, capsys=capsys)
    assert (code, err) == (0, "")


def test_server_strings_cannot_inject_markup_or_terminal_codes(capsys: Any) -> None:
    manager = FakeManager()
    task_id = manager.run_task({"operation": "HASH", "objectId": "[red]obj\x1b[2J"})
    manager.set_state(task_id, "FAILED", message="[bold]boom[/bold] \x1b]0;owned\x07\u202e")
    outputs = []
    for argv in (["get", task_id], ["list"]):
        code, out, _ = _in_process(argv, manager=manager, capsys=capsys)
        assert code == 0
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
        assert "[red]obj?[2J" in out  # markup shown as typed, the escape defused
        outputs.append(out)
    assert "[bold]boom[/bold] ?]0;owned??" in outputs[0]


# -- following the stream ------------------------------------------------------------------


class DummyApi:
    """An ApiClient stand-in: scripted streams, a task table to re-read."""

    def __init__(self, streams: list[list[Any]], tasks: dict[str, dict[str, Any]]) -> None:
        self.streams = streams
        self.tasks = tasks
        self.opened = 0
        self.rereads = 0

    def events(self, operation: str | None = None) -> Iterator[dict[str, Any]]:
        script = self.streams[self.opened]
        self.opened += 1
        for item in script:
            if isinstance(item, Exception):
                raise item
            yield item

    def get_task(self, task_id: str) -> dict[str, Any]:
        self.rereads += 1
        return self.tasks[task_id]


def _task(task_id: str, state: str, version: int) -> dict[str, Any]:
    return {"meta": {"id": task_id, "version": version}, "operation": "SLEEP", "state": state}


def test_follower_reconnects_and_rereads_after_the_stream_breaks() -> None:
    broken = cli_client.ClientError(cli_client.RET_CONNECTION, "cannot reach x: reset")
    api = DummyApi(
        streams=[
            [cli_client.OPENED, {"method": "PATCH", "task": _task("A", "ACTIVE", 2)}, broken],
            [cli_client.OPENED],  # the task ended while the client was away
        ],
        tasks={"A": _task("A", "SUCCEEDED", 9)},
    )
    api.tasks["A"], first = _task("A", "NEW", 1), api.tasks["A"]
    seen: list[int] = []

    def on_change(task: dict[str, Any]) -> None:
        seen.append(task["meta"]["version"])
        api.tasks["A"] = first  # from now on a re-read finds it finished

    follower = cli_client.Follower(api, ["A"], on_change=on_change,  # type: ignore[arg-type]
                                   sleep=lambda s: None)
    follower.run()
    assert (api.opened, follower.connections) == (2, 2)
    assert seen == [1, 2, 9]  # versions only go forward
    assert follower.tasks["A"]["state"] == "SUCCEEDED"


def test_follower_gives_up_after_the_reconnect_window() -> None:
    broken = cli_client.ClientError(cli_client.RET_CONNECTION, "cannot reach x: refused")
    api = DummyApi(streams=[[cli_client.OPENED, broken]] + [[broken]] * 1000,
                   tasks={"A": _task("A", "ACTIVE", 1)})
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    follower = cli_client.Follower(api, ["A"], reconnect_for=30,  # type: ignore[arg-type]
                                   sleep=sleep, clock=lambda: now[0])
    with pytest.raises(cli_client.ClientError) as failure:
        follower.run()
    assert failure.value.code == cli_client.RET_CONNECTION
    assert "gave up reconnecting after 30 s" in str(failure.value)
    assert 10 < api.opened < 20 and 30 <= now[0] < 34  # backing off up to 3 s between tries


def test_follower_fails_at_once_when_it_never_connected() -> None:
    broken = cli_client.ClientError(cli_client.RET_CONNECTION, "cannot reach x: refused")
    api = DummyApi(streams=[[broken]], tasks={})
    follower = cli_client.Follower(api, ["A"], sleep=lambda s: None)  # type: ignore[arg-type]
    with pytest.raises(cli_client.ClientError):
        follower.run()
    assert api.opened == 1


def test_follower_restarts_after_dropped() -> None:
    api = DummyApi(
        streams=[[cli_client.OPENED, {"method": "DROPPED", "task": None}],
                 [cli_client.OPENED, {"method": "PATCH", "task": _task("A", "FAILED", 5)}]],
        tasks={"A": _task("A", "ACTIVE", 3)},
    )
    follower = cli_client.Follower(api, ["A"], sleep=lambda s: None)  # type: ignore[arg-type]
    follower.run()
    assert api.opened == 2 and api.rereads == 2
    assert cli_client.outcome_code(list(follower.tasks.values())) == 1


def test_outcome_codes() -> None:
    assert cli_client.outcome_code([_task("A", "SUCCEEDED", 1)]) == 0
    assert cli_client.outcome_code([_task("A", "SUCCEEDED", 1), _task("B", "CANCELED", 1)]) == 2
    assert cli_client.outcome_code([_task("A", "CANCELED", 1), _task("B", "FAILED", 1)]) == 1


def test_parse_sse() -> None:
    lines = ["retry: 3000", ": hello", "", "event: PATCH", 'data: {"method": "PATCH",',
             'data: "task": null}', "", "event: X", "data: not json", ""]
    assert list(cli_client.parse_sse(iter(lines))) == [{"method": "PATCH", "task": None}]

