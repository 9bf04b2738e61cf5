"""``/metrics``: Prometheus exposition built from the manager's public API, parsed back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import wait_for
from fakes import FakeManager
from prometheus_client.parser import text_string_to_metric_families
from rest_support import LiveServer, SseClient, assert_error, bearer, make_client

from supervisor.outcome import OutcomeKind

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Parse exposition text into ``{(sample name, sorted labels): value}``; fails if invalid."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; fails naming what is there when it is missing."""
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{key} not in {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


def scrape(client: Any, headers: dict[str, str] | None = None) -> Samples:
    result = client.simulate_get("/metrics", headers=headers or {})
    assert result.status_code == 200, result.text
    assert result.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(result.text)


def test_not_served_unless_asked() -> None:
    client, _ = make_client()
    assert client.simulate_get("/metrics").status_code == 404


def test_counts_lifecycle_events_from_the_manager() -> None:
    client, fake = make_client(metrics=True)
    before = scrape(client)
    assert value(before, "housekeeping_tasks", state="NEW", operation="SLEEP") == 0
    assert value(before, "housekeeping_sse_clients") == 0
    ok = fake.run_task({"operation": "SLEEP"})
    killed = fake.run_task({"operation": "SLEEP"})
    queued = fake.run_task({"operation": "HASH"})
    for task_id in (ok, killed):
        fake.set_state(task_id, "ACTIVE")
    fake.set_state(ok, "SUCCEEDED")
    fake.set_state(killed, "CANCELED", message="killed after cancel grace period",
                   kind=OutcomeKind.CANCELED_KILLED, killed=True)
    fake.set_state(killed, "CANCELED")  # a repeated terminal event is not counted twice
    samples = scrape(client)
    assert value(samples, "housekeeping_tasks_created_total", operation="SLEEP") == 2
    assert value(samples, "housekeeping_tasks_created_total", operation="HASH") == 1
    assert value(samples, "housekeeping_tasks_finished_total",
                 operation="SLEEP", state="SUCCEEDED", kind="returned") == 1
    assert value(samples, "housekeeping_tasks_finished_total",
                 operation="SLEEP", state="CANCELED", kind="canceled-killed") == 1
    assert value(samples, "housekeeping_forced_kills_total", operation="SLEEP",
                 kind="canceled-killed") == 1
    assert value(samples, "housekeeping_task_start_latency_seconds_count", operation="SLEEP") == 2
    assert value(samples, "housekeeping_tasks", state="NEW", operation="HASH") == 1
    assert value(samples, "housekeeping_tasks", state="SUCCEEDED", operation="SLEEP") == 1
    assert value(samples, "housekeeping_queue_depth") == 1  # FakeManager: NEW tasks
    fake.purge(queued)
    assert value(scrape(client), "housekeeping_tasks", state="NEW", operation="HASH") == 0


def test_a_dropped_subscription_subscribes_again() -> None:
    client, fake = make_client(metrics=True)
    fake.drop_subscribers()
    assert fake.subscriber_count == 1
    fake.run_task({"operation": "HASH"})
    samples = scrape(client)
    assert value(samples, "housekeeping_metrics_resubscribed_total") == 1
    assert value(samples, "housekeeping_tasks_created_total", operation="HASH") == 1


def test_task_log_counters_come_from_the_manager_at_scrape_time() -> None:
    client, fake = make_client(metrics=True)
    before = scrape(client)
    assert not [key for key in before if key[0].startswith("housekeeping_task_log_")]
    sleep_id = fake.run_task({"operation": "SLEEP"})
    hash_id = fake.run_task({"operation": "HASH"})
    fake.write_log(sleep_id, "stdout", "12345")  # 6 bytes with its newline
    fake.write_log(sleep_id, "stdout", "1")
    fake.write_log(sleep_id, "stderr", "oops")
    fake.write_log(hash_id, "stderr", "")
    fake.drop_log_lines(sleep_id, 2)
    samples = scrape(client)
    expected = {("SLEEP", "stdout"): (8, 2), ("SLEEP", "stderr"): (5, 0),
                ("HASH", "stderr"): (1, 0)}
    for (operation, stream), (size, dropped) in expected.items():
        assert value(samples, "housekeeping_task_log_bytes_total",
                     operation=operation, stream=stream) == size
        assert value(samples, "housekeeping_task_log_dropped_total",
                     operation=operation, stream=stream) == dropped
    assert len([key for key in samples if key[0] == "housekeeping_task_log_bytes_total"]) == 3
    fake.write_log(hash_id, "stderr", "more")
    assert value(scrape(client), "housekeeping_task_log_bytes_total",
                 operation="HASH", stream="stderr") == 6


def test_metrics_token_is_required_when_set() -> None:
    client, _ = make_client(metrics=True, metrics_token="s3cret")
    for headers in ({}, bearer("wrong"), bearer("s3cret-and-more"), {"Authorization": "s3cret"}):
        result = client.simulate_get("/metrics", headers=headers)
        assert_error(result.status_code, result.json, 401, "metrics")
        assert result.headers["WWW-Authenticate"].startswith("Bearer")
    assert value(scrape(client, bearer("s3cret")), "housekeeping_sse_clients") == 0


def test_closing_the_handlers_unsubscribes() -> None:
    from falcon import App

    from rest import RestOptions, register_handlers

    fake = FakeManager()
    handlers = register_handlers(App(), fake, None, options=RestOptions(metrics=True))
    assert fake.subscriber_count == 1
    handlers.close()
    assert fake.subscriber_count == 0


# -- a real server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    server = LiveServer("--max-workers", "2").start()
    try:
        yield server
    finally:
        server.close()


def _scrape_live(live: LiveServer) -> Samples:
    response = live.get("/metrics")
    assert response.status_code == 200, response.text
    return parse(response.text)


def test_live_server_exposes_valid_metrics(live: LiveServer) -> None:
    created = live.post("/api/v1/tasks", json={"operation": "SLEEP", "args": {"seconds": 0}})
    task_id = created.json()["meta"]["id"]
    wait_for(lambda: live.get(f"/api/v1/tasks/{task_id}").json()["state"] == "SUCCEEDED")
    stream = SseClient(live.api("/api/v1/task-events"))
    try:
        samples = wait_for(lambda: (s := _scrape_live(live)) and value(
            s, "housekeeping_tasks_finished_total", operation="SLEEP", state="SUCCEEDED",
            kind="returned") >= 1 and s)
        assert value(samples, "housekeeping_tasks_created_total", operation="SLEEP") >= 1
        assert value(samples, "housekeeping_task_start_latency_seconds_count",
                     operation="SLEEP") >= 1
        assert value(samples, "housekeeping_task_wall_seconds_count", operation="SLEEP") >= 1
        assert value(samples, "housekeeping_task_cpu_seconds_count", operation="SLEEP") >= 1
        assert value(samples, "housekeeping_sse_clients") == 1
        assert value(samples, "housekeeping_child_rss_bytes") > 0  # warm processes, starter
        assert value(samples, "housekeeping_running_children") == 0
        assert value(samples, "housekeeping_queue_depth") == 0
    finally:
        stream.close()


def test_live_server_counts_running_and_queued(live: LiveServer) -> None:
    ids = [live.post("/api/v1/tasks", json={"operation": "SLEEP", "args": {"seconds": 60}})
           .json()["meta"]["id"] for _ in range(3)]
    try:
        samples = wait_for(lambda: (s := _scrape_live(live)) and value(
            s, "housekeeping_running_children") == 2 and s)
        assert value(samples, "housekeeping_queue_depth") == 1
        assert value(samples, "housekeeping_tasks", state="ACTIVE", operation="SLEEP") == 2
    finally:
        for task_id in ids:
            live.post(f"/api/v1/tasks/{task_id}/cancel")
    wait_for(lambda: value(_scrape_live(live), "housekeeping_running_children") == 0)
