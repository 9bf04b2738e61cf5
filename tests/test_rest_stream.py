"""The task-event stream at the WSGI level: framing, filters, bound, keep-alive, drop, shutdown."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import TIMEOUT, wait_for
from fakes import DummyAccessControl, FakeManager
from falcon import testing
from rest_support import assert_error, bearer, make_client

from rest import create_app, handlers_of
from rest.app import RestOptions
from rest.stream import DROPPED_MESSAGE, format_event
from supervisor.wire import ChangeEvent, TaskSnapshot

EVENTS = "/api/v1/task-events"


class Stream:
    """One stream opened by calling the WSGI app directly (the TestClient would drain it)."""

    def __init__(self, app: Any, query: str = "", headers: dict[str, str] | None = None,
                 **environ: Any):
        env = testing.create_environ(EVENTS, query_string=query, headers=headers)
        env.update(environ)
        self.started: list[tuple[str, dict[str, str]]] = []
        self.body = app(env, self._start_response)
        self.chunks: Iterator[bytes] = iter(self.body)

    def _start_response(self, status: str, headers: list[tuple[str, str]],
                        exc_info: Any = None) -> None:
        self.started.append((status, dict(headers)))

    @property
    def status(self) -> str:
        return self.started[0][0]

    @property
    def headers(self) -> dict[str, str]:
        return {name.lower(): value for name, value in self.started[0][1].items()}

    def next(self) -> bytes:
        return next(self.chunks)

    def next_event(self) -> tuple[str, dict[str, Any]]:
        """Skip comments; parse the next event."""
        while True:
            chunk = self.next().decode()
            if not chunk.startswith(":") and not chunk.startswith("retry:"):
                break
        lines = dict(line.split(": ", 1) for line in chunk.strip().split("\n"))
        return lines["event"], json.loads(lines["data"])

    def rest(self) -> list[bytes]:
        return list(self.chunks)

    def close(self) -> None:
        self.body.close()


def opened(app: Any, query: str = "", headers: dict[str, str] | None = None,
           **environ: Any) -> Stream:
    stream = Stream(app, query, headers, **environ)
    assert stream.status.startswith("200"), stream.status
    assert stream.next().startswith(b"retry: ")
    return stream


def test_events_are_framed_and_in_order() -> None:
    client, fake = make_client()
    stream = opened(client.app)
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-cache"
    task_id = fake.run_task({"operation": "HASH"})
    fake.set_state(task_id, "ACTIVE")
    fake.set_state(task_id, "SUCCEEDED")
    fake.purge(task_id)
    seen = [stream.next_event() for _ in range(4)]
    assert [name for name, _ in seen] == ["POST", "PATCH", "PATCH", "DELETE"]
    assert [data["task"]["state"] for _, data in seen] == ["NEW", "ACTIVE", "SUCCEEDED",
                                                           "SUCCEEDED"]
    assert all(set(data) == {"method", "uri", "scope", "task"} for _, data in seen)
    assert seen[0][1]["scope"]["meta.id"] == task_id
    stream.close()
    assert fake.subscriber_count == 0


def test_format_event_is_one_data_line() -> None:
    task = {"meta": {"id": "T1", "version": 2, "timeCreated": "t", "timeModified": "t"},
            "operation": "SLEEP", "state": "ACTIVE",
            "messages": [{"time": "t", "message": "line\nbreak ⇒"}]}
    event = ChangeEvent("PATCH", "/tasks/T1", {"operation": "SLEEP", "state": "ACTIVE"},
                        TaskSnapshot.from_wire(task))
    encoded = format_event(event)
    assert encoded.count(b"\n") == 3 and encoded.endswith(b"\n\n")
    assert json.loads(encoded.split(b"data: ", 1)[1]) == event.to_dict()
    assert event.to_dict()["task"] == task


def test_operation_filter() -> None:
    client, fake = make_client()
    stream = opened(client.app, "operation=SLEEP")
    fake.run_task({"operation": "HASH"})
    sleep_id = fake.run_task({"operation": "SLEEP"})
    name, data = stream.next_event()
    assert name == "POST" and data["task"]["meta"]["id"] == sleep_id
    stream.close()


def test_stream_shows_only_what_the_subject_may_view() -> None:
    control = DummyAccessControl({"hasher": {"view": {"HASH"}}, "all": {"view": {"*"}}})
    client, fake = make_client(access_control=control)
    assert_error(*_status_json(client.simulate_get(EVENTS)), 401)
    hasher = opened(client.app, headers=bearer("hasher"))
    everyone = opened(client.app, headers=bearer("all"))
    sleep_id = fake.run_task({"operation": "SLEEP"})
    hash_id = fake.run_task({"operation": "HASH"})
    assert hasher.next_event()[1]["task"]["meta"]["id"] == hash_id
    assert everyone.next_event()[1]["task"]["meta"]["id"] == sleep_id
    assert everyone.next_event()[1]["task"]["meta"]["id"] == hash_id
    hasher.close()
    everyone.close()


def test_keepalive_comment_when_idle() -> None:
    client, _ = make_client(keepalive=0.05)
    stream = opened(client.app)
    assert stream.next() == b": keep-alive\n\n"
    stream.close()


def test_a_client_that_hung_up_is_noticed_while_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rest.stream.DISCONNECT_POLL", 0.01)
    client, fake = make_client(keepalive=TIMEOUT * 10)
    gone = threading.Event()
    stream = opened(client.app, **{"waitress.client_disconnected": gone.is_set})
    gone.set()
    assert stream.rest() == []  # ends without writing (waitress then calls close)
    stream.close()
    assert fake.subscriber_count == 0


def test_stream_count_is_bounded_and_slots_come_back() -> None:
    client, fake = make_client(max_streams=2)
    first, second = opened(client.app), opened(client.app)
    third = client.simulate_get(EVENTS)
    assert_error(third.status_code, third.json, 503, "limit 2")
    assert int(third.headers["Retry-After"]) > 0
    first.close()
    assert fake.subscriber_count == 1
    fourth = opened(client.app)
    second.close()
    fourth.close()
    assert fake.subscriber_count == 0


def test_close_before_iterating_frees_the_slot() -> None:
    client, fake = make_client(max_streams=1)
    env = testing.create_environ(EVENTS)
    body = client.app(env, lambda status, headers, exc_info=None: None)
    body.close()  # as waitress does when the client vanished before the first write
    assert fake.subscriber_count == 0
    opened(client.app).close()


def test_dropped_subscriber_gets_a_last_event_and_the_stream_ends() -> None:
    client, fake = make_client()
    stream = opened(client.app)
    fake.run_task({"operation": "HASH"})
    fake.drop_subscribers()
    assert stream.next_event()[0] == "POST"
    name, data = stream.next_event()
    assert name == "DROPPED" and data["task"] is None and data["message"] == DROPPED_MESSAGE
    assert stream.rest() == []
    stream.close()


def test_shutdown_ends_streams_and_refuses_new_ones() -> None:
    client, fake = make_client()
    stream = opened(client.app)
    task_id = fake.run_task({"operation": "HASH"})
    handlers = handlers_of(client.app)
    assert handlers is not None
    handlers.close()
    assert stream.next_event()[1]["task"]["meta"]["id"] == task_id  # queued events still go
    assert stream.rest() == [b": server shutting down\n\n"]
    stream.close()
    result = client.simulate_get(EVENTS)
    assert_error(result.status_code, result.json, 503, "shutting down")


def test_shutdown_wakes_a_waiting_stream_at_once() -> None:
    client, _ = make_client(keepalive=TIMEOUT * 10)
    stream = opened(client.app)
    got: list[list[bytes]] = []
    reader = threading.Thread(target=lambda: got.append(stream.rest()))
    reader.start()
    handlers = handlers_of(client.app)
    assert handlers is not None
    handlers.close()
    reader.join(TIMEOUT)
    assert got == [[b": server shutting down\n\n"]]
    stream.close()


def test_a_full_mailbox_blocks_the_delivery_thread_until_the_stream_ends() -> None:
    fake = FakeManager()
    app = create_app(fake, options=RestOptions())
    stream = opened(app)
    producer = threading.Thread(target=lambda: [fake.run_task({"operation": "HASH"})
                                                for _ in range(300)])
    producer.start()
    # 256 events fill the mailbox; delivering the 257th waits: backpressure reaches the manager
    wait_for(lambda: len(fake.tasks) >= 257 or not producer.is_alive())
    assert len(fake.tasks) == 257 and producer.is_alive()
    assert stream.next_event()[0] == "POST"
    wait_for(lambda: len(fake.tasks) >= 258)
    stream.close()
    producer.join(TIMEOUT)
    assert not producer.is_alive() and len(fake.tasks) == 300


@pytest.mark.parametrize("max_streams", [0, -1])
def test_max_streams_must_be_positive(max_streams: int) -> None:
    with pytest.raises(ValueError, match="max_streams"):
        create_app(FakeManager(), options=RestOptions(max_streams=max_streams))


def _status_json(result: testing.Result) -> tuple[int, Any]:
    return result.status_code, result.json
