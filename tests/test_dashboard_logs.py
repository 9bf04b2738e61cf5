"""The dashboard's log panel, driven in a real headless Chromium (playwright).

A click on a task row (or Enter on it) follows that task's log live below the
table. The browser is found as in ``test_dashboard.py`` (the system Chromium
or ``$HOUSEKEEPING_CHROMIUM``); without playwright or a browser these tests
are skipped with the reason shown, except the check of the served script.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import TIMEOUT, wait_for
from rest_support import LiveServer
from test_dashboard import ARTIFACTS, EVIL, browser_page, chromium, row_of

from rest.auth import hash_token

#: What the page keeps of a log (``LOG_KEEP`` in dashboard.js).
LOG_KEEP = 5000

ANIMATORS = '''
import os
import sys
import time

from supervisor import Animator, TaskState


class DashLogTalker(Animator):
    """Print to both streams, wait for the file ``args.go``, print again, wait for a cancel."""

    def execute(self, ops):
        args = ops.task["args"]
        print("first line from stdout")
        print("a warning on stderr", file=sys.stderr)
        print(args.get("evil", ""))
        ops.message("printed")
        while not os.path.exists(args["go"]):
            if ops.is_canceled():
                ops.set_state(TaskState.CANCELED)
            time.sleep(0.01)
        print("second line, printed later")
        while not ops.is_canceled():
            time.sleep(0.01)
        ops.set_state(TaskState.CANCELED)


class DashLogFlood(Animator):
    """Print ``args.lines`` numbered lines of 70 bytes as fast as it can, wait for the
    file ``args.go``, then print ``args.more`` lines."""

    def execute(self, ops):
        args = ops.task["args"]
        padding = "x" * 60
        for number in range(int(args["lines"])):
            print(f"{number:08d} {padding}")
        while not os.path.exists(args["go"]):
            if ops.is_canceled():
                ops.set_state(TaskState.CANCELED)
            time.sleep(0.01)
        for number in range(int(args["lines"]), int(args["lines"]) + int(args["more"])):
            print(f"{number:08d} {padding}")
        return None


def register(manager):
    manager.register_animator("DASHLOG_TALK", DashLogTalker())
    manager.register_animator("DASHLOG_FLOOD", DashLogFlood())
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dashboard-logs")
    (path / "dashlog_animators.py").write_text(ANIMATORS)
    return path


@pytest.fixture(scope="module")
def live(folder: Path) -> Iterator[LiveServer]:
    server = LiveServer("--animators", "dashlog_animators:register", "--max-workers", "4",
                        cwd=folder).start()
    try:
        yield server
    finally:
        server.close()


def test_the_script_follows_logs_with_fetch_not_event_source(live: LiveServer) -> None:
    # EventSource cannot send the Authorization header; the log stream must use fetch.
    script = live.get("/ui/dashboard.js").text
    assert "EventSource(" not in script
    assert "/log?follow=true&after=" in script
    page = live.get("/").text
    for element in ('id="log-panel"', 'id="log-lines"', 'id="log-close"', 'id="log-note"'):
        assert element in page, element


# -- the panel in a browser -------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from chromium()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    yield from browser_page(browser, 900)


def _panel_lines(page: Any) -> list[dict[str, Any]]:
    """What the panel shows, one dict per line."""
    return list(page.eval_on_selector_all("#log-lines .log-line", """nodes => nodes.map(n => ({
        seq: Number(n.dataset.seq), stream: n.querySelector('.log-stream').textContent,
        text: n.querySelector('.log-text').textContent,
        datetime: n.querySelector('time').dateTime, clock: n.querySelector('time').textContent,
        marker: getComputedStyle(n).borderLeftColor,
        children: n.querySelector('.log-text').children.length}))"""))


#: Records each log stream the page opens, and whether the page aborted it since.
WATCH_LOG_FETCHES = """
    window.__logStreams = [];
    const originalFetch = window.fetch;
    window.fetch = function (input, init) {
      const url = String(input);
      if (url.includes("/log?follow=true")) {
        const record = { url, aborted: false };
        window.__logStreams.push(record);
        const signal = init && init.signal;
        if (signal) signal.addEventListener("abort", () => { record.aborted = true; });
      }
      return originalFetch.apply(this, arguments);
    };
"""


def _log_streams(page: Any) -> list[dict[str, Any]]:
    """The log streams the page opened: ``{"url", "aborted"}``."""
    return list(page.evaluate("() => window.__logStreams"))


def _open_streams_of(page: Any, task_id: str) -> list[str]:
    return [s["url"] for s in _log_streams(page)
            if f"/tasks/{task_id}/log?" in s["url"] and not s["aborted"]]


def _server_streams(server: LiveServer) -> int:
    """How many event streams (task events and followed logs) the server has open."""
    return int(server.get("/healthz").json()["eventStreams"])


def _last_line(page: Any) -> dict[str, Any] | None:
    """The newest line the panel shows (seq and text), or None."""
    return page.eval_on_selector("#log-lines", """box => box.lastElementChild && {
        seq: Number(box.lastElementChild.dataset.seq),
        text: box.lastElementChild.querySelector('.log-text').textContent}""")


def _shows(page: Any, text: str) -> bool:
    return any(line["text"] == text for line in _panel_lines(page))


def _state(server: LiveServer, task_id: str) -> str:
    return str(server.get(f"/api/v1/tasks/{task_id}").json()["state"])


def _start_talker(server: LiveServer, go: Path, **headers: str) -> str:
    """Create a DASHLOG_TALK task and wait until it printed its first lines."""
    body = {"operation": "DASHLOG_TALK", "args": {"go": str(go), "evil": EVIL}}
    created = requests.post(server.api("/api/v1/tasks"), json=body, headers=headers,
                            timeout=TIMEOUT)
    assert created.status_code == 201, created.text
    task_id = str(created.json()["meta"]["id"])

    def printed() -> bool:
        task = requests.get(server.api(f"/api/v1/tasks/{task_id}"), headers=headers,
                            timeout=TIMEOUT).json()
        return any(m["message"] == "printed" for m in task.get("messages") or [])

    wait_for(printed)
    return task_id


def _full_log(server: LiveServer, task_id: str) -> dict[str, Any]:
    """Every stored line of a task's log (paged with ``after``), and the last answer's fields."""
    lines: list[dict[str, Any]] = []
    after = 0
    while True:
        answer = server.get(f"/api/v1/tasks/{task_id}/log", params={"after": after, "limit": 10000})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        lines += body["lines"]
        if body["next"] == after:
            return {**body, "lines": lines}
        after = body["next"]


def test_a_running_tasks_output_appears_live_in_the_log_panel(
    live: LiveServer, page: Any, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    task_id = _start_talker(live, go)
    try:
        page.goto(live.url + "/")
        page.wait_for_selector(f"{row_of(task_id)}[data-state=ACTIVE]")
        page.evaluate("() => { window.__sameDocument = true; }")
        assert page.is_hidden("#log-panel")
        page.click(f"{row_of(task_id)} td.id")
        page.wait_for_selector("#log-panel[data-state=live]")
        assert page.text_content("#log-task") == task_id
        assert page.text_content("#log-operation") == "DASHLOG_TALK"
        wait_for(lambda: _shows(page, "first line from stdout"),
                 message=lambda: f"panel shows {_panel_lines(page)}")
        wait_for(lambda: len(_panel_lines(page)) == 3)
        assert _state(live, task_id) == "ACTIVE"  # shown while the task still runs

        shown = _panel_lines(page)
        stored = live.get(f"/api/v1/tasks/{task_id}/log").json()["lines"]
        assert [(n["seq"], n["stream"], n["text"], n["datetime"]) for n in shown] == [
            (line["seq"], line["stream"], line["text"], line["time"]) for line in stored]
        assert all(len(line["clock"]) == len("12:34:56.789") for line in shown), shown
        # (Two pipes: the stderr line may come before or after the stdout lines.)
        by_text = {line["text"]: line for line in shown}
        stdout, stderr, evil = (by_text["first line from stdout"],
                                by_text["a warning on stderr"], by_text[EVIL])
        assert (stdout["stream"], stderr["stream"], evil["stream"]) == (
            "stdout", "stderr", "stdout")
        assert stderr["marker"] != stdout["marker"], "stderr lines must look different"
        # Task output is text: the markup in it is shown, never parsed.
        assert evil["text"] == EVIL and evil["children"] == 0
        assert page.query_selector("#log-panel img, #log-panel script") is None
        assert page.evaluate("() => window.pwned") is None

        go.touch()  # the task prints its second line now
        wait_for(lambda: _shows(page, "second line, printed later"),
                 message=lambda: f"panel shows {_panel_lines(page)}")
        assert page.evaluate("() => window.__sameDocument") is True  # no reload
        assert _state(live, task_id) == "ACTIVE"
        assert page.is_hidden("#log-note")  # nothing was dropped
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-log.png"))

        live.post(f"/api/v1/tasks/{task_id}/cancel")
        page.wait_for_selector("#log-panel[data-state=complete]")
        assert page.text_content("#log-status") == "complete"
        assert [line["text"] for line in _panel_lines(page)][-1] == "second line, printed later"
        page.click("#log-close")
        assert page.is_hidden("#log-panel")
        assert page.query_selector("#log-lines .log-line") is None
    finally:
        live.post(f"/api/v1/tasks/{task_id}/cancel")


def test_another_row_switches_the_panel_and_ends_the_old_stream(
    live: LiveServer, page: Any, tmp_path: Path
) -> None:
    first_go, second_go = tmp_path / "first", tmp_path / "second"
    first = _start_talker(live, first_go)
    second = _start_talker(live, second_go)
    page.add_init_script(WATCH_LOG_FETCHES)
    try:
        page.goto(live.url + "/")
        page.wait_for_selector(f"{row_of(second)}[data-state=ACTIVE]")
        page.click(f"{row_of(first)} td.operation")
        wait_for(lambda: _shows(page, "first line from stdout"))
        assert page.eval_on_selector(row_of(first), "row => row.classList.contains('selected')")

        # The keyboard opens a row too: focus it, press Enter.
        page.focus(row_of(second))
        page.keyboard.press("Enter")
        page.wait_for_function(
            f"() => document.getElementById('log-task').textContent === {json.dumps(second)}")
        wait_for(lambda: len(_panel_lines(page)) == 3)
        assert _open_streams_of(page, first) == [], _log_streams(page)  # the old one was closed
        assert len(_open_streams_of(page, second)) == 1, _log_streams(page)
        # The server sees it too: the page holds its task events and one log.
        wait_for(lambda: _server_streams(live) == 2,
                 message=lambda: f"{_server_streams(live)} streams open")
        assert not page.eval_on_selector(row_of(first), "row => row.classList.contains('selected')")

        first_go.touch()  # the first task prints after the switch: not shown here
        wait_for(lambda: any(line["text"] == "second line, printed later"
                             for line in live.get(f"/api/v1/tasks/{first}/log").json()["lines"]))
        second_go.touch()
        wait_for(lambda: _shows(page, "second line, printed later"))
        shown = _panel_lines(page)
        stored = live.get(f"/api/v1/tasks/{second}/log").json()["lines"]
        assert [line["seq"] for line in shown] == [line["seq"] for line in stored] == [1, 2, 3, 4]

        page.focus("#log-lines")
        page.keyboard.press("Escape")
        assert page.is_hidden("#log-panel")
        assert page.evaluate("() => document.activeElement.dataset.id") == second
        assert _open_streams_of(page, second) == [], _log_streams(page)
        wait_for(lambda: _server_streams(live) == 1,
                 message=lambda: f"{_server_streams(live)} streams open")
    finally:
        live.post(f"/api/v1/tasks/{first}/cancel")
        live.post(f"/api/v1/tasks/{second}/cancel")


def test_the_panel_notes_dropped_lines_and_keeps_the_newest(
    live: LiveServer, page: Any, tmp_path: Path
) -> None:
    # 25 000 lines of 70 bytes overflow the default 1 MiB the server keeps per task;
    # 3 000 more arrive while the panel already holds its LOG_KEEP lines.
    go = tmp_path / "go"
    args = {"lines": 25000, "more": 3000, "go": str(go)}
    created = live.post("/api/v1/tasks", json={"operation": "DASHLOG_FLOOD", "args": args})
    task_id = created.json()["meta"]["id"]
    last_of_first = "00024999 " + "x" * 60
    wait_for(lambda: [line["text"] for line in _full_log(live, task_id)["lines"]][-1:]
             == [last_of_first])
    page.goto(live.url + "/")
    page.click(f"{row_of(task_id)} td.id")
    wait_for(lambda: (_last_line(page) or {}).get("text") == last_of_first)
    assert len(_panel_lines(page)) == LOG_KEEP
    assert "lines dropped by the server" in page.text_content("#log-note")

    go.touch()
    wait_for(lambda: _state(live, task_id) == "SUCCEEDED")

    def complete_log() -> dict[str, Any] | None:
        log = _full_log(live, task_id)
        return log if log["complete"] else None

    stored = wait_for(complete_log)
    assert stored["dropped"] > 0 and len(stored["lines"]) > LOG_KEEP, stored["dropped"]
    page.wait_for_selector("#log-panel[data-state=complete]")
    wait_for(lambda: (_last_line(page) or {}).get("seq") == stored["lines"][-1]["seq"])
    note = page.text_content("#log-note")
    assert f"{stored['dropped']} lines dropped by the server" in note, note
    assert f"showing the newest {LOG_KEEP} lines" in note, note
    shown = _panel_lines(page)
    newest = stored["lines"][-LOG_KEEP:]
    assert len(shown) == LOG_KEEP
    assert [line["text"] for line in shown] == [line["text"] for line in newest]
    assert page.eval_on_selector("#log-panel", "panel => Number(panel.dataset.dropped)") == (
        stored["dropped"])


def test_the_log_stream_carries_the_token(browser: Any, folder: Path, tmp_path: Path) -> None:
    token = "dashboard-log-token-1"
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [{
        "sha256": hash_token(token), "subject": "ops",
        "view": ["*"], "create": ["*"], "cancel": ["*"]}]}))
    server = LiveServer("--tokens", str(tokens), "--animators", "dashlog_animators:register",
                        "--max-workers", "1", cwd=folder).start()
    context = browser.new_context()
    auth = {"Authorization": f"Bearer {token}"}
    task_id = ""
    try:
        task_id = _start_talker(server, tmp_path / "go", **auth)
        tab = context.new_page()
        tab.set_default_timeout(TIMEOUT * 1000)
        tab.goto(server.url + "/")
        tab.wait_for_selector("body[data-connection=unauthorized]")
        tab.fill("#token", token)
        tab.click("#token-form button[type=submit]")
        tab.click(f"{row_of(task_id)} td.id")
        wait_for(lambda: _shows(tab, "first line from stdout"),
                 message=lambda: f"log status: {tab.text_content('#log-status')}")
        assert tab.get_attribute("#log-panel", "data-state") == "live"
    finally:
        if task_id:
            requests.post(server.api(f"/api/v1/tasks/{task_id}/cancel"), headers=auth,
                          timeout=TIMEOUT)
        context.close()
        server.close()
