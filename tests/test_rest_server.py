"""A real ``housekeeping serve`` subprocess on loopback: the real manager, the demo animators."""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from conftest import TIMEOUT, is_alive, wait_for
from rest_support import ROOT, LiveServer, OpenApiChecker, SseClient, assert_error, bearer

from rest.cli import RET_ANIMATORS, RET_BIND, RET_INSECURE, RET_OK, RET_WRONG_SUPERVISOR

TASKS = "/api/v1/tasks"
EVENTS = "/api/v1/task-events"
TERMINAL = {"CANCELED", "FAILED", "SUCCEEDED"}
CANCEL_GRACE = 1.0  # what LiveServer passes as --cancel-grace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["local", "dask"])
def server(request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """The server with tasks on this machine, and with tasks on ``--dask local``."""
    backend = ["--dask", "local"] if request.param == "dask" else []
    live = LiveServer("--max-workers", "2", "--max-streams", "2", *backend)
    try:
        live.start()
        yield live
        assert live.stop() == RET_OK, live.log()
    finally:
        live.close()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    path = tmp_path_factory.mktemp("tokens") / "tokens.json"
    path.write_text(json.dumps({"tokens": [
        {"sha256": _sha("ops"), "subject": "ops", "view": ["*"], "create": ["*"],
         "cancel": ["*"]},
        {"sha256": _sha("viewer"), "subject": "viewer", "view": ["SLEEP"]},
    ]}))
    live = LiveServer("--tokens", str(path), "--max-workers", "1", "--max-queued", "0")
    try:
        live.start()
        yield live
        assert live.stop() == RET_OK, live.log()
    finally:
        live.close()


def create(server: LiveServer, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    answer = server.post(TASKS, json=body, **kwargs)
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def wait_state(server: LiveServer, task_id: str, states: set[str],
               **kwargs: Any) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def reached() -> bool:
        last.update(server.get(f"{TASKS}/{task_id}", **kwargs).json())
        return last["state"] in states

    wait_for(reached, message=lambda: f"task is {last}")
    return last


# -- the life of a task ---------------------------------------------------------------


def test_create_watch_succeed(server: LiveServer) -> None:
    checker = OpenApiChecker(server.get("/api/v1/openapi.json").json())
    answer = server.post(TASKS, json={"operation": "HASH", "objectId": "vol-1",
                                      "args": {"megabytes": 2}})
    assert answer.status_code == 201
    checker.check(TASKS, "POST", 201, answer.headers, answer.json())
    task = answer.json()
    assert answer.headers["Location"] == f"{TASKS}/{task['meta']['id']}"
    assert task["state"] in ("NEW", "ACTIVE") and task["objectId"] == "vol-1"
    done = wait_state(server, task["meta"]["id"], TERMINAL)
    assert done["state"] == "SUCCEEDED", done
    expected = hashlib.sha256(bytes(range(256)) * (2 * 1024 * 1024 // 256)).hexdigest()
    assert done["result"] == {"digest": expected, "megabytes": 2}
    assert done["progress"]["percentComplete"] == 100
    assert "State change NEW ⇒ ACTIVE" in [m["message"] for m in done["messages"]]
    assert done["meta"]["version"] > task["meta"]["version"]
    checker.check(f"{TASKS}/{{id}}", "GET", 200, {}, done)
    listed = server.get(TASKS, params={"operation": "HASH"})
    checker.check(TASKS, "GET", 200, listed.headers, listed.json())
    assert task["meta"]["id"] in [t["meta"]["id"] for t in listed.json()]
    health = server.get("/healthz").json()
    checker.check("/healthz", "GET", 200, {}, health)
    assert health["operations"] == ["HASH", "SLEEP"]
    log = server.log()  # requests and task lifecycle are logged
    assert "POST /api/v1/tasks 201" in log
    assert f"task {task['meta']['id']} ended SUCCEEDED" in log


def test_cancel(server: LiveServer) -> None:
    task = create(server, {"operation": "SLEEP", "args": {"seconds": 60}})
    task_id = task["meta"]["id"]
    wait_state(server, task_id, {"ACTIVE"})
    answer = server.post(f"{TASKS}/{task_id}/cancel")
    assert answer.status_code == 200 and answer.json()["cancelRequested"] is True
    again = server.post(f"{TASKS}/{task_id}/cancel")
    assert again.status_code in (200, 404)  # a no-op while canceling, 404 once finished
    assert wait_state(server, task_id, TERMINAL)["state"] == "CANCELED"
    gone = server.post(f"{TASKS}/{task_id}/cancel")
    assert_error(gone.status_code, gone.json(), 404)


def test_readme_walk_through(server: LiveServer) -> None:
    """The README's walk-through, step by step (on either backend)."""
    body = {"operation": "SLEEP", "objectId": "vol-42", "args": {"seconds": 30}}
    task = create(server, body)
    task_id = task["meta"]["id"]
    assert task["state"] == "NEW" and task["objectId"] == "vol-42"
    running = wait_for(lambda: (t := server.get(f"{TASKS}/{task_id}").json()).get("progress")
                       and t)
    assert running["state"] == "ACTIVE"
    assert [m["message"] for m in running["messages"]] == ["State change NEW ⇒ ACTIVE"]
    canceling = server.post(f"{TASKS}/{task_id}/cancel").json()
    assert canceling["cancelRequested"] is True
    done = wait_state(server, task_id, TERMINAL)
    assert done["state"] == "CANCELED"
    assert [m["message"] for m in done["messages"]][1:] == [
        "the animator honoured the cancel", "State change ACTIVE ⇒ CANCELED"]
    again = server.post(f"{TASKS}/{task_id}/cancel")
    assert again.status_code == 404
    assert again.json()["message"] == f"task '{task_id}' not found or already finished"
    assert task_id in [t["meta"]["id"] for t in server.get(TASKS, params={"operation": "SLEEP"})
                       .json()]
    health = server.get("/healthz").json()
    assert health["status"] == "ok" and health["CANCELED"] >= 1


# -- every 4xx over the wire ---------------------------------------------------------


def test_client_errors(server: LiveServer) -> None:
    def error(answer: requests.Response, code: int, *words: str) -> None:
        assert_error(answer.status_code, answer.json(), code, *words)

    error(server.post(TASKS, json={"operation": "SLEEP", "args": {"seconds": -1}}), 400,
          "args.seconds")
    error(server.post(TASKS, json={"operation": "SLEEP", "state": "NEW"}), 400, "state")
    error(server.post(TASKS, data=b"{oops", headers={"Content-Type": "application/json"}),
          400, "JSON")
    error(server.get(f"{TASKS}/SLEEP999999"), 404)
    error(server.get("/nothing"), 404)
    error(server.session.delete(server.api(TASKS), timeout=TIMEOUT), 405)
    error(server.post(TASKS, json={"operation": "NOPE"}), 409, "NOPE")
    error(server.post(TASKS, data=b"operation=SLEEP"), 415)
    big = b'{"operation": "SLEEP", "args": {"p": "' + b"x" * (1024 * 1024) + b'"}}'
    error(server.post(TASKS, data=big, headers={"Content-Type": "application/json"}), 413)

    def chunks() -> Iterator[bytes]:
        yield b'{"operation": "SLEEP", "args": {"p": "'
        for _ in range(17):
            yield b"x" * 65536
        yield b'"}}'

    error(server.post(TASKS, data=chunks(), headers={"Content-Type": "application/json"}), 413)
    assert server.get(TASKS).status_code == 200  # still serving


def test_auth_matrix_and_429(secured: LiveServer) -> None:
    ops, viewer = bearer("ops"), bearer("viewer")
    missing = secured.get(TASKS)
    assert_error(missing.status_code, missing.json(), 401)
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert secured.get(TASKS, headers=bearer("wrong")).status_code == 401
    assert secured.get("/healthz").status_code == 200
    assert secured.get("/api/v1/openapi.json").json()["security"] == [{"bearer": []}]

    hash_task = create(secured, {"operation": "HASH", "args": {"megabytes": 1}}, headers=ops)
    wait_state(secured, hash_task["meta"]["id"], TERMINAL, headers=ops)
    sleep_task = create(secured, {"operation": "SLEEP", "args": {"seconds": 60}}, headers=ops)
    sleep_id = sleep_task["meta"]["id"]
    assert secured.post(TASKS, json={"operation": "SLEEP"}, headers=viewer).status_code == 403
    assert secured.get(f"{TASKS}/{hash_task['meta']['id']}", headers=viewer).status_code == 404
    assert secured.get(f"{TASKS}/{sleep_id}", headers=viewer).status_code == 200
    assert [t["meta"]["id"] for t in secured.get(TASKS, headers=viewer).json()] == [sleep_id]
    assert secured.post(f"{TASKS}/{sleep_id}/cancel", headers=viewer).status_code == 403

    # --max-workers 1 --max-queued 0: while SLEEP runs, another task would have to wait
    wait_state(secured, sleep_id, {"ACTIVE"}, headers=ops)
    full = secured.post(TASKS, json={"operation": "SLEEP"}, headers=ops)
    assert_error(full.status_code, full.json(), 429, "queue full")
    assert int(full.headers["Retry-After"]) >= 1
    assert secured.post(f"{TASKS}/{sleep_id}/cancel", headers=ops).status_code == 200
    wait_state(secured, sleep_id, TERMINAL, headers=ops)


# -- the event stream ---------------------------------------------------------------


def test_events_arrive_live_and_in_order(server: LiveServer) -> None:
    stream = SseClient(server.api(EVENTS))
    hashes = SseClient(server.api(EVENTS + "?operation=HASH"))
    try:
        assert stream.status == 200
        assert stream.response.getheader("Content-Type").startswith("text/event-stream")
        assert stream.next_event(skip_comments=False)["comments"]  # subscribed
        assert hashes.next_event(skip_comments=False)["comments"]
        task_id = create(server, {"operation": "SLEEP", "args": {"seconds": 60}})["meta"]["id"]
        events = []
        while True:
            event = stream.next_event()
            assert event["data"]["task"]["meta"]["id"] == task_id
            events.append(event)
            if event["data"]["task"]["state"] == "ACTIVE":
                break
        # the client sees ACTIVE while the task still runs, not after the fact
        assert server.get(f"{TASKS}/{task_id}").json()["state"] == "ACTIVE"
        assert server.post(f"{TASKS}/{task_id}/cancel").status_code == 200
        while events[-1]["data"]["task"]["state"] not in TERMINAL:
            events.append(stream.next_event())
        assert events[0]["event"] == "POST" and events[0]["data"]["task"]["state"] == "NEW"
        assert all(e["event"] == "PATCH" for e in events[1:])
        versions = [e["data"]["task"]["meta"]["version"] for e in events]
        assert versions == sorted(versions) and len(set(versions)) == len(versions)
        assert events[-1]["data"]["task"]["state"] == "CANCELED"
        hash_id = create(server, {"operation": "HASH", "args": {"megabytes": 1}})["meta"]["id"]
        first = hashes.next_event()
        assert first["event"] == "POST" and first["data"]["task"]["meta"]["id"] == hash_id
    finally:
        stream.close()
        hashes.close()


def test_stream_limit(server: LiveServer) -> None:
    def open_streams() -> int:
        return int(server.get("/healthz").json()["eventStreams"])

    wait_for(lambda: open_streams() == 0)  # earlier tests' streams are gone
    streams = [SseClient(server.api(EVENTS)) for _ in range(2)]
    try:
        for stream in streams:
            assert stream.next_event(skip_comments=False)["comments"]
        assert open_streams() == 2
        third = SseClient(server.api(EVENTS))
        assert third.status == 503
        assert_error(third.status, third.body(), 503, "limit 2")
        third.close()
    finally:
        for stream in streams:
            stream.close()
    # a client that hung up frees its slot without waiting for a keep-alive write
    wait_for(lambda: open_streams() == 0, timeout=5.0)


# -- shutdown ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_with_running_tasks_exits_0_and_leaves_nothing(sig: int) -> None:
    live = LiveServer("--animators", "fakes:register_misbehaving", "--max-workers", "3",
                      cwd=ROOT / "tests")
    try:
        live.start()
        sleeper = create(live, {"operation": "SLEEP", "args": {"seconds": 60}})["meta"]["id"]
        stubborn = create(live, {"operation": "STUBBORN"})["meta"]["id"]
        forker = create(live, {"operation": "FORKER"})["meta"]["id"]
        for task_id in (sleeper, stubborn, forker):
            wait_state(live, task_id, {"ACTIVE"})
        wait_for(lambda: any(m["message"].startswith("ready") for m in
                             live.get(f"{TASKS}/{forker}").json()["messages"]))
        stream = SseClient(live.api(EVENTS))
        assert stream.next_event(skip_comments=False)["comments"]
        tree = live.tree()
        assert len(tree) >= 5, [p.cmdline() for p in tree]
        started = time.monotonic()
        code = live.stop(sig)
        elapsed = time.monotonic() - started
        assert code == RET_OK, live.log()
        assert elapsed < CANCEL_GRACE + 2.0, f"took {elapsed:.2f} s\n{live.log()}"
        rest = list(stream.messages())
        assert rest and rest[-1]["comments"] == ["server shutting down"], rest
        stream.close()
        _, alive = psutil.wait_procs(tree, timeout=0)
        assert not [p for p in alive if is_alive(p)], alive
    finally:
        live.close()


def test_refuses_a_public_bind_without_tokens() -> None:
    code, out, err = LiveServer("--host", "0.0.0.0").run_to_exit()
    assert code == RET_INSECURE and "refusing" in err and "--tokens" in err
    assert out == ""


def test_animators_flag_and_no_demo(tmp_path: Path) -> None:
    (tmp_path / "myanimators.py").write_text(
        "from supervisor import Animator\n\n"
        "class Echo(Animator):\n"
        "    def execute(self, ops):\n"
        "        return ops.task['args']\n\n"
        "def register(manager):\n"
        "    manager.register_animator('ECHO', Echo())\n"
    )
    live = LiveServer("--animators", "myanimators:register", "--no-demo", cwd=tmp_path)
    try:
        live.start()
        assert live.get("/healthz").json()["operations"] == ["ECHO"]
        task_id = create(live, {"operation": "ECHO", "args": {"x": [1, 2]}})["meta"]["id"]
        done = wait_state(live, task_id, TERMINAL)
        assert done["state"] == "SUCCEEDED" and done["result"] == {"x": [1, 2]}, done
        assert live.stop() == RET_OK
    finally:
        live.close()


def test_failing_register_function_is_reported(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("def register(manager):\n    raise RuntimeError('no')\n")
    code, _, err = LiveServer("--animators", "broken:register", cwd=tmp_path).run_to_exit()
    assert code == RET_ANIMATORS and "broken:register" in err and "RuntimeError: no" in err


def test_port_in_use_is_reported(server: LiveServer) -> None:
    port = server.url.rsplit(":", 1)[1]
    live = LiveServer()
    live.args[1] = port
    code, _, err = live.run_to_exit()
    assert code == RET_BIND and "cannot listen" in err


def test_supervisord_package_gets_advice(tmp_path: Path) -> None:
    fake = tmp_path / "shadow" / "supervisor"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("# supervisord\n")
    live = LiveServer(cwd=tmp_path, env={"PYTHONPATH": f"{tmp_path / 'shadow'}:{ROOT}"})
    code, _, err = live.run_to_exit()
    assert code == RET_WRONG_SUPERVISOR, err
    assert "supervisord" in err and "separately" in err and str(fake) in err


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
