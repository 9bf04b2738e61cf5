"""``GET /api/v1/tasks/{id}/log``: pages and followed logs, over a fake manager and a real server.

The WSGI-level tests drive the app over a ``FakeManager`` (framing, parameters,
access, the stream bound, a subscription that fell behind, shutdown); the
live ones run real task processes behind ``housekeeping serve`` (order and
streams, a line followed while its task runs, a 20 MiB flood with the
server's own stdout a pipe that nobody reads, bytes that are not UTF-8, long
lines, metrics).
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import TIMEOUT, wait_for
from fakes import DummyAccessControl, FakeManager
from falcon import testing
from rest_support import ROOT, LiveServer, SseClient, assert_error, bearer, make_client
from test_metrics import parse, value

from rest import handlers_of
from rest.log_stream import DEFAULT_PAGE, MAX_PAGE, format_end, format_line

TASKS = "/api/v1/tasks"
EVENTS = "/api/v1/task-events"
MIB = 1024 * 1024
MAX_LINE_BYTES = 16 * 1024


def log_path(task_id: str) -> str:
    return f"{TASKS}/{task_id}/log"


# -- over a fake manager ----------------------------------------------------------------


class LogReader:
    """A followed log opened by calling the WSGI app directly (the TestClient would drain it)."""

    def __init__(self, app: Any, task_id: str, query: str = "follow=true",
                 headers: dict[str, str] | None = None, **environ: Any) -> None:
        env = testing.create_environ(log_path(task_id), query_string=query, headers=headers)
        env.update(environ)
        self.started: list[tuple[str, dict[str, str]]] = []
        self.body = app(env, self._start_response)
        self.chunks: Iterator[bytes] = iter(self.body)
        self.pending: list[dict[str, Any]] = []

    def _start_response(self, status: str, headers: list[tuple[str, str]],
                        exc_info: Any = None) -> None:
        self.started.append((status, {name.lower(): v for name, v in headers}))

    @property
    def status(self) -> str:
        return self.started[0][0]

    @property
    def headers(self) -> dict[str, str]:
        return self.started[0][1]

    def next_message(self) -> dict[str, Any]:
        """The next SSE message (``{"comments": [...], field: value}``; data parsed)."""
        while not self.pending:
            self.pending = parse_messages(next(self.chunks))
        return self.pending.pop(0)

    def next_event(self) -> dict[str, Any]:
        """The next message that carries an event (comments skipped)."""
        while True:
            message = self.next_message()
            if "event" in message:
                return message

    def rest(self) -> list[dict[str, Any]]:
        """Every message left, until the stream ends."""
        found, self.pending = self.pending, []
        for chunk in self.chunks:
            found.extend(parse_messages(chunk))
        return found

    def close(self) -> None:
        self.body.close()


def parse_messages(chunk: bytes) -> list[dict[str, Any]]:
    """Split one chunk into SSE messages; each must be complete (end with a blank line)."""
    text = chunk.decode("utf-8")
    assert text.endswith("\n\n"), text
    messages = []
    for block in text[:-2].split("\n\n"):
        message: dict[str, Any] = {"comments": []}
        for line in block.split("\n"):
            if line.startswith(":"):
                message["comments"].append(line[1:].strip())
                continue
            field, _, rest = line.partition(": ")
            assert field not in message, block
            message[field] = json.loads(rest) if field == "data" else rest
        messages.append(message)
    return messages


def following(app: Any, task_id: str, query: str = "follow=true",
              headers: dict[str, str] | None = None, **environ: Any) -> LogReader:
    reader = LogReader(app, task_id, query, headers, **environ)
    assert reader.status.startswith("200"), reader.status
    assert reader.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert reader.headers["cache-control"] == "no-cache"
    opening = reader.next_message()
    assert opening["retry"] == "3000" and opening["comments"] == ["housekeeping task log"]
    return reader


def line_of(message: dict[str, Any]) -> tuple[str, int, str, str]:
    """(event, id, stream, text) of a line message, its id checked against its seq."""
    assert set(message) == {"comments", "id", "event", "data"}, message
    data = message["data"]
    assert set(data) == {"seq", "time", "stream", "text"}, data
    assert int(message["id"]) == data["seq"]
    return message["event"], data["seq"], data["stream"], data["text"]


@pytest.fixture
def fake_task() -> tuple[testing.TestClient, FakeManager, str]:
    client, fake = make_client()
    task_id = fake.run_task({"operation": "HASH"})
    fake.set_state(task_id, "ACTIVE")
    return client, fake, task_id


def test_a_page_is_the_managers_log_json(fake_task: Any) -> None:
    client, fake, task_id = fake_task
    fake.write_log(task_id, "stdout", "one")
    fake.write_log(task_id, "stderr", "two")
    result = client.simulate_get(log_path(task_id))
    assert result.status_code == 200
    assert result.headers["content-type"] == "application/json"
    assert result.json == fake.get_log(task_id)
    assert [(line["seq"], line["stream"], line["text"]) for line in result.json["lines"]] == [
        (1, "stdout", "one"), (2, "stderr", "two")]
    assert result.json["next"] == 2 and result.json["complete"] is False


def test_the_default_page_and_the_largest_limit(fake_task: Any) -> None:
    client, fake, task_id = fake_task
    for number in range(DEFAULT_PAGE + 1):
        fake.write_log(task_id, "stdout", f"line {number}")
    page = client.simulate_get(log_path(task_id)).json
    assert len(page["lines"]) == DEFAULT_PAGE and page["next"] == DEFAULT_PAGE
    rest = client.simulate_get(log_path(task_id), params={"after": page["next"]}).json
    assert [line["text"] for line in rest["lines"]] == [f"line {DEFAULT_PAGE}"]
    everything = client.simulate_get(log_path(task_id), params={"limit": MAX_PAGE}).json
    assert len(everything["lines"]) == DEFAULT_PAGE + 1


@pytest.mark.parametrize(("query", "named"), [
    ("after=-1", "'after'"), ("after=x", "'after'"), ("after=1.5", "'after'"),
    ("after=", "'after'"), ("after=" + "9" * 19, "'after'"), ("after=1&after=2", "'after'"),
    ("limit=0", "'limit'"), (f"limit={MAX_PAGE + 1}", "'limit'"), ("limit=ten", "'limit'"),
    ("follow=yes", "'follow'"), ("follow=1", "'follow'"), ("follow=true&limit=0", "'limit'"),
])
def test_bad_parameters_are_400_before_the_task_is_looked_up(
        fake_task: Any, query: str, named: str) -> None:
    client, _, task_id = fake_task
    for target in (task_id, "NOPE000001"):  # NOTE: an unknown id says 400 too: no probing
        result = client.simulate_get(log_path(target), query_string=query)
        assert_error(result.status_code, result.json, 400, named)


def test_a_bad_last_event_id_is_400(fake_task: Any) -> None:
    client, _, task_id = fake_task
    result = client.simulate_get(log_path(task_id), query_string="follow=true",
                                 headers={"Last-Event-ID": "seven"})
    assert_error(result.status_code, result.json, 400, "Last-Event-ID")


def test_unknown_and_malformed_ids_are_404(fake_task: Any) -> None:
    client, _, _ = fake_task
    for query in ("", "follow=true"):
        for task_id in ("NOPE000001", "x" * 200):
            result = client.simulate_get(log_path(task_id), query_string=query)
            assert_error(result.status_code, result.json, 404, "not found")


def test_access_is_as_for_the_task() -> None:
    control = DummyAccessControl({"hasher": {"view": {"HASH"}}, "all": {"view": {"*"}},
                                  "nobody": {}})
    client, fake = make_client(access_control=control)
    hash_id = fake.run_task({"operation": "HASH"})
    sleep_id = fake.run_task({"operation": "SLEEP"})
    fake.write_log(sleep_id, "stdout", "secret")
    for query in ("", "follow=true"):
        missing = client.simulate_get(log_path(hash_id), query_string=query)
        assert_error(missing.status_code, missing.json, 401)
        assert missing.headers["WWW-Authenticate"] == 'Bearer realm="housekeeping"'
        wrong = client.simulate_get(log_path(hash_id), query_string=query,
                                    headers=bearer("nope"))
        assert_error(wrong.status_code, wrong.json, 401)
        for token in ("hasher", "nobody"):
            hidden = client.simulate_get(log_path(sleep_id), query_string=query,
                                         headers=bearer(token))
            unknown = client.simulate_get(log_path("SLEEP999999"), query_string=query,
                                          headers=bearer(token))
            item = client.simulate_get(f"{TASKS}/{sleep_id}", headers=bearer(token))
            assert hidden.status_code == unknown.status_code == item.status_code == 404
            assert (hidden.json["message"].replace(sleep_id, "SLEEP999999")
                    == unknown.json["message"])
            assert "secret" not in hidden.text
    assert client.simulate_get(log_path(hash_id), headers=bearer("hasher")).status_code == 200
    seen = client.simulate_get(log_path(sleep_id), headers=bearer("all")).json
    assert [line["text"] for line in seen["lines"]] == ["secret"]
    reader = following(client.app, hash_id, headers=bearer("hasher"))
    reader.close()
    assert fake.log_subscriber_count(hash_id) == 0


def test_follow_sends_the_kept_lines_then_new_ones_then_the_end(fake_task: Any) -> None:
    client, fake, task_id = fake_task
    fake.write_log(task_id, "stdout", "kept 1")
    fake.write_log(task_id, "stderr", "kept 2")
    reader = following(client.app, task_id)
    assert [line_of(reader.next_event()) for _ in range(2)] == [
        ("line", 1, "stdout", "kept 1"), ("line", 2, "stderr", "kept 2")]
    fake.write_log(task_id, "stderr", "new ⇒ 3")
    assert line_of(reader.next_event()) == ("line", 3, "stderr", "new ⇒ 3")
    fake.drop_log_lines(task_id, 1)
    fake.set_state(task_id, "SUCCEEDED")
    fake.end_log(task_id)
    end = reader.next_event()
    assert end == {"comments": [], "event": "end", "data": {"next": 3, "dropped": 1}}
    assert reader.rest() == []
    reader.close()
    assert fake.log_subscriber_count(task_id) == 0


def test_a_followed_log_sends_every_line_whatever_the_limit(fake_task: Any) -> None:
    client, fake, task_id = fake_task
    for number in range(3):
        fake.write_log(task_id, "stdout", f"kept {number}")
    reader = following(client.app, task_id, "follow=true&limit=1")
    assert [line_of(reader.next_event())[1] for _ in range(3)] == [1, 2, 3]
    reader.close()


def test_a_line_is_one_message_with_its_seq_as_id() -> None:
    line = {"seq": 12, "time": "2026-11-27T18:00:00.000001Z", "stream": "stderr",
            "text": 'a\rb "quoted" \x1b[31m ⇒ \ufffd'}
    encoded = format_line(line)
    assert encoded.startswith(b"id: 12\nevent: line\ndata: {") and encoded.endswith(b"}\n\n")
    assert encoded.count(b"\n") == 4 and b"\r" not in encoded
    assert json.loads(encoded.split(b"data: ", 1)[1]) == line
    assert format_end(7, 2) == b'event: end\ndata: {"next":7,"dropped":2}\n\n'


def test_after_and_last_event_id_choose_where_to_start(fake_task: Any) -> None:
    client, fake, task_id = fake_task
    for number in range(1, 5):
        fake.write_log(task_id, "stdout", f"line {number}")
    cases = [("follow=true&after=2", {}, 3), ("follow=true", {"Last-Event-ID": "3"}, 4),
             ("follow=true&after=1", {"Last-Event-ID": "3"}, 2)]  # the query wins
    for query, headers, first in cases:
        reader = following(client.app, task_id, query, headers)
        assert line_of(reader.next_event())[1] == first, (query, headers)
        reader.close()
    fake.end_log(task_id)
    done = following(client.app, task_id, "follow=true", {"Last-Event-ID": "4"})
    assert done.rest() == [{"comments": [], "event": "end", "data": {"next": 4, "dropped": 0}}]
    done.close()


def test_a_purged_task_ends_the_stream(fake_task: Any) -> None:
    client, fake, task_id = fake_task
    fake.write_log(task_id, "stdout", "one")
    fake.drop_log_lines(task_id, 1)
    fake.write_log(task_id, "stdout", "two")
    reader = following(client.app, task_id)
    assert line_of(reader.next_event())[1:] == (2, "stdout", "two")
    fake.set_state(task_id, "SUCCEEDED")
    fake.purge(task_id)
    # NOTE: the task is gone: the dropped count is the one known when the stream opened
    assert reader.rest() == [{"comments": [], "event": "end", "data": {"next": 2, "dropped": 1}}]
    reader.close()


def test_a_subscription_that_fell_behind_is_renewed_without_a_gap(fake_task: Any) -> None:
    client, fake, task_id = fake_task
    fake.write_log(task_id, "stdout", "one")
    reader = following(client.app, task_id)
    assert line_of(reader.next_event())[1] == 1
    fake.write_log(task_id, "stdout", "two")
    fake.end_log(task_id, "behind")  # the manager dropped the follower after line 2
    assert fake.log_subscriber_count(task_id) == 0
    fake.write_log(task_id, "stdout", "three")  # while nobody follows
    assert line_of(reader.next_event())[1:] == (2, "stdout", "two")
    assert line_of(reader.next_event())[1:] == (3, "stdout", "three")
    assert fake.log_subscriber_count(task_id) == 1
    fake.write_log(task_id, "stderr", "four")
    assert line_of(reader.next_event())[1:] == (4, "stderr", "four")
    fake.end_log(task_id)
    assert reader.next_event()["event"] == "end"
    reader.close()
    assert fake.log_subscriber_count(task_id) == 0


def test_log_streams_share_the_bound_with_event_streams(fake_task: Any) -> None:
    client, fake, task_id = fake_task
    client, fake = make_client(fake, max_streams=2)
    events = client.app(testing.create_environ(EVENTS), lambda *args: None)
    log = following(client.app, task_id)
    for path, query in ((log_path(task_id), "follow=true"), (EVENTS, "")):
        result = client.simulate_get(path, query_string=query)
        assert_error(result.status_code, result.json, 503, "limit 2")
        assert int(result.headers["Retry-After"]) > 0
    assert client.simulate_get(log_path(task_id)).status_code == 200  # a page takes no slot
    assert client.simulate_get("/healthz").json["eventStreams"] == 2
    log.close()
    assert fake.log_subscriber_count(task_id) == 0
    following(client.app, task_id).close()
    events.close()


def test_a_refused_subscription_gives_its_slot_back(fake_task: Any) -> None:
    client, fake, task_id = fake_task
    client, fake = make_client(fake, max_streams=1)
    fake.broken["subscribe_log"] = RuntimeError("boom")
    result = client.simulate_get(log_path(task_id), query_string="follow=true")
    assert result.status_code == 500
    del fake.broken["subscribe_log"]
    following(client.app, task_id).close()


def test_keepalive_and_a_client_that_hung_up(fake_task: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rest.stream.DISCONNECT_POLL", 0.01)
    client, fake, task_id = fake_task
    client, fake = make_client(fake, keepalive=0.05)
    reader = following(client.app, task_id)
    assert reader.next_message() == {"comments": ["keep-alive"]}
    reader.close()
    gone = threading.Event()
    reader = following(client.app, task_id, **{"waitress.client_disconnected": gone.is_set})
    gone.set()
    assert reader.rest() == []
    reader.close()
    assert fake.log_subscriber_count(task_id) == 0


def test_shutdown_ends_log_streams_without_an_end_event(fake_task: Any) -> None:
    client, fake, task_id = fake_task
    reader = following(client.app, task_id)
    fake.write_log(task_id, "stdout", "queued before the shutdown")
    handlers = handlers_of(client.app)
    assert handlers is not None
    handlers.close()
    assert line_of(reader.next_event())[3] == "queued before the shutdown"
    assert reader.rest() == [{"comments": ["server shutting down"]}]
    reader.close()
    result = client.simulate_get(log_path(task_id), query_string="follow=true")
    assert_error(result.status_code, result.json, 503, "shutting down")


def test_many_lines_are_written_a_batch_per_chunk(fake_task: Any) -> None:
    client, fake, task_id = fake_task
    for number in range(200):
        fake.write_log(task_id, "stdout", f"line {number}")
    reader = following(client.app, task_id)
    chunk = next(reader.chunks)
    assert 1 < len(parse_messages(chunk)) <= 64  # NOTE: LINES_PER_CHUNK
    reader.close()


# -- a real server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    server = LiveServer("--animators", "animators:register_logs", "--max-workers", "4",
                        "--max-streams", "2", cwd=ROOT / "tests").start()
    try:
        yield server
    finally:
        server.close()


def create(live: LiveServer, operation: str, args: dict[str, Any] | None = None) -> str:
    created = live.post(TASKS, json={"operation": operation, "args": args or {}})
    assert created.status_code == 201, created.text
    return str(created.json()["meta"]["id"])


def state_of(live: LiveServer, task_id: str) -> str:
    return str(live.get(f"{TASKS}/{task_id}").json()["state"])


def get_log(live: LiveServer, task_id: str, **params: Any) -> dict[str, Any]:
    response = live.get(log_path(task_id), params=params)
    assert response.status_code == 200, response.text
    return dict(response.json())


def whole_log(live: LiveServer, task_id: str) -> dict[str, Any]:
    """Every kept line, read page by page once the log is complete."""
    wait_for(lambda: get_log(live, task_id, after=10**15)["complete"])
    lines: list[dict[str, Any]] = []
    page = {"next": 0, "complete": False}
    while not page["complete"]:
        page = get_log(live, task_id, after=page["next"], limit=MAX_PAGE)
        lines += page["lines"]
    return {**page, "lines": lines}


def test_lines_come_back_in_order_with_their_streams(live: LiveServer, tmp_path: Path) -> None:
    script = [["stdout", "one"], ["stderr", "two"], ["stderr", "three"], ["stdout", "four"]]
    task_id = create(live, "GATED", {"lines": script, "gate": str(tmp_path)})
    for index in range(len(script)):
        # NOTE: the task writes line i+1 only once line i is in its log: the order across
        # the two pipes is then certain, and each line is seen while the task runs.
        wait_for(lambda count=index + 1: len(get_log(live, task_id)["lines"]) == count)
        assert state_of(live, task_id) == "ACTIVE"
        (tmp_path / str(index)).touch()
    wait_for(lambda: state_of(live, task_id) == "SUCCEEDED")
    log = wait_for(lambda: (found := get_log(live, task_id))["complete"] and found)
    assert [(line["seq"], line["stream"], line["text"]) for line in log["lines"]] == [
        (1, "stdout", "one"), (2, "stderr", "two"), (3, "stderr", "three"), (4, "stdout", "four")]
    assert log["next"] == 4 and log["dropped"] == 0
    assert all(line["time"].endswith("Z") for line in log["lines"])
    middle = get_log(live, task_id, after=1, limit=2)
    assert [line["seq"] for line in middle["lines"]] == [2, 3]
    assert middle["next"] == 3 and middle["complete"] is False
    last = get_log(live, task_id, after=3)
    assert [line["text"] for line in last["lines"]] == ["four"] and last["complete"] is True
    assert get_log(live, task_id, after=4) == {"lines": [], "next": 4, "dropped": 0,
                                               "complete": True}
    bad = live.get(log_path(task_id), params={"limit": MAX_PAGE + 1})
    assert_error(bad.status_code, bad.json(), 400, "limit")
    unknown = live.get(log_path("NOPE000001"))
    assert_error(unknown.status_code, unknown.json(), 404, "not found")


def test_follow_delivers_a_line_while_the_task_runs_then_ends(live: LiveServer) -> None:
    task_id = create(live, "PRINTER", {"first": "hello from a running task"})
    stream = SseClient(live.api(log_path(task_id) + "?follow=true"))
    try:
        assert stream.status == 200
        assert stream.response.getheader("Content-Type") == "text/event-stream; charset=utf-8"
        first = stream.next_event()
        assert (first["id"], first["event"]) == ("1", "line")
        assert first["data"]["text"] == "hello from a running task"
        assert first["data"]["stream"] == "stdout" and first["data"]["seq"] == 1
        assert state_of(live, task_id) == "ACTIVE"  # the line came before the task ended
        assert live.post(f"{TASKS}/{task_id}/cancel").status_code == 200
        second = stream.next_event()
        assert (second["id"], second["event"], second["data"]["text"]) == (
            "2", "line", "canceled, bye")
        end = stream.next_event()
        assert end["event"] == "end" and end["data"] == {"next": 2, "dropped": 0}
        assert list(stream.messages()) == []  # and the stream closes
    finally:
        stream.close()
    assert state_of(live, task_id) == "CANCELED"
    resumed = SseClient(live.api(log_path(task_id) + "?follow=true"),
                        headers={"Last-Event-ID": "1"})
    try:
        events = [(m.get("id"), m["event"], m["data"]) for m in resumed.messages()
                  if "event" in m]
        assert [(id_, event) for id_, event, _ in events] == [("2", "line"), (None, "end")]
        assert events[0][2]["text"] == "canceled, bye"
    finally:
        resumed.close()


def test_follow_counts_against_max_streams(live: LiveServer) -> None:
    wait_for(lambda: live.get("/healthz").json()["eventStreams"] == 0)  # earlier tests' streams
    task_id = create(live, "PRINTER")
    first = SseClient(live.api(log_path(task_id) + "?follow=true"))
    events = SseClient(live.api(EVENTS))
    try:
        assert first.next_event()["event"] == "line"
        assert events.next_event(skip_comments=False)["comments"]
        for path in (log_path(task_id) + "?follow=true", EVENTS):
            refused = live.get(path)
            assert_error(refused.status_code, refused.json(), 503, "limit 2")
            assert int(refused.headers["Retry-After"]) > 0
        assert live.get("/healthz").json()["eventStreams"] == 2
        first.close()
        wait_for(lambda: live.get("/healthz").json()["eventStreams"] == 1)
        again = SseClient(live.api(log_path(task_id) + "?follow=true"))
        try:
            assert again.status == 200 and again.next_event()["data"]["seq"] == 1
        finally:
            again.close()
    finally:
        first.close()
        events.close()
        live.post(f"{TASKS}/{task_id}/cancel")
    wait_for(lambda: state_of(live, task_id) == "CANCELED")


def test_invalid_utf8_and_a_100_kib_line(live: LiveServer) -> None:
    task_id = create(live, "RAW")
    log = wait_for(lambda: (found := get_log(live, task_id))["complete"] and found)
    out = [line["text"] for line in log["lines"] if line["stream"] == "stdout"]
    err = [line["text"] for line in log["lines"] if line["stream"] == "stderr"]
    assert out == ["bad \ufffd\ufffd bytes"]
    assert len(err) == 7 and all(len(text.encode()) <= MAX_LINE_BYTES for text in err)
    assert "".join(err) == "x" * (100 * 1024)
    followed = SseClient(live.api(log_path(task_id) + "?follow=true"))
    try:
        data = [m["data"] for m in followed.messages() if "event" in m]
    finally:
        followed.close()
    assert data == [*log["lines"], {"next": log["next"], "dropped": 0}]


def test_following_a_flood_misses_only_lines_the_log_dropped(live: LiveServer) -> None:
    wait_for(lambda: live.get("/healthz").json()["eventStreams"] == 0)
    task_id = create(live, "FLOOD", {"mib": 8})
    stream = SseClient(live.api(log_path(task_id) + "?follow=true"))
    seqs: list[int] = []
    last_text = ""
    try:
        for message in stream.messages():
            if message.get("event") == "line":
                seqs.append(message["data"]["seq"])
                last_text = message["data"]["text"]
            elif message.get("event") == "end":
                end = message["data"]
                break
        else:
            raise AssertionError("the stream closed without an end event")
    finally:
        stream.close()
    written = live.get(f"{TASKS}/{task_id}").json()["result"]
    assert written == 8 * MIB // 100
    assert seqs == sorted(set(seqs)) and seqs[-1] == written == end["next"]
    assert last_text == f"{written - 1:099d}"
    assert written - len(seqs) <= end["dropped"]  # a line not received was dropped by the log


def high_water_rss(pid: int) -> int:
    """The peak resident memory of a process so far (``VmHWM``), in bytes."""
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmHWM:"):
            return int(row.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def test_a_20_mib_flood_with_the_servers_stdout_unread() -> None:
    server = LiveServer("--animators", "animators:register_logs", "--max-workers", "1",
                        cwd=ROOT / "tests").start()
    try:
        assert server.proc is not None and server.proc.stdout is not None
        # NOTE: LiveServer read the "serving on" line; nobody reads this pipe again.
        assert stat.S_ISFIFO(os.fstat(server.proc.stdout.fileno()).st_mode)
        process = psutil.Process(server.proc.pid)
        baseline = process.memory_info().rss
        peak = [baseline]
        task_id = create(server, "FLOOD", {"mib": 20})

        def finished() -> bool:
            peak[0] = max(peak[0], process.memory_info().rss)
            return state_of(server, task_id) in ("SUCCEEDED", "FAILED", "CANCELED")

        wait_for(finished, timeout=TIMEOUT, interval=0.05)
        task = server.get(f"{TASKS}/{task_id}").json()
        assert task["state"] == "SUCCEEDED", task
        written = task["result"]
        assert written == 20 * MIB // 100
        log = whole_log(server, task_id)
        lines = log["lines"]
        assert lines[-1]["text"] == f"{written - 1:099d}"  # the last line written is kept
        assert log["dropped"] > 0 and log["dropped"] + len(lines) == written
        assert [line["seq"] for line in lines] == list(range(log["dropped"] + 1, written + 1))
        kept = sum(len(line["text"]) + 1 for line in lines)
        assert 900 * 1024 < kept <= MIB, kept  # about the newest 1 MiB
        # NOTE: the kernel's high-water mark catches a peak between two polls; it may
        # also be a peak from before the flood, which only makes the check stricter.
        # Below the 20 MiB written: a server that kept (or queued) it all would fail.
        growth = max(peak[0], high_water_rss(server.proc.pid)) - baseline
        assert growth < 16 * MIB, f"server RSS grew {growth / MIB:.1f} MiB"
        samples = parse(server.get("/metrics").text)
        assert value(samples, "housekeeping_task_log_bytes_total",
                     operation="FLOOD", stream="stdout") == written * 100
        assert value(samples, "housekeeping_task_log_dropped_total",
                     operation="FLOOD", stream="stdout") == log["dropped"]
        # and none of it went to the server's own stdout
        fd = server.proc.stdout.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        try:
            leaked = os.read(fd, 65536)
        except BlockingIOError:
            leaked = b""
        assert b"0000000" not in leaked, leaked[:200]
    finally:
        server.close()
