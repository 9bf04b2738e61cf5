"""``housekeeping serve --journal``: a real server, a real journal file, real restarts
(SIGTERM and SIGKILL), retention, pages over HTTP, idempotent POSTs, a failing disk."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import TIMEOUT, wait_for
from journal_support import fill, read_only, rows, tiny_disk
from rest_support import LiveServer, assert_error

from rest.cli import RET_JOURNAL, RET_OK

TASKS = "/api/v1/tasks"
TERMINAL = {"CANCELED", "FAILED", "SUCCEEDED"}

pytestmark = pytest.mark.slow


@pytest.fixture
def servers() -> Iterator[list[LiveServer]]:
    """Servers a test starts; each is stopped (or killed) afterwards."""
    made: list[LiveServer] = []
    yield made
    for server in made:
        server.close()


def serve(servers: list[LiveServer], journal: Path, *args: str) -> LiveServer:
    server = LiveServer("--journal", str(journal), *args)
    servers.append(server)
    return server.start()


def create(server: LiveServer, body: dict[str, Any]) -> str:
    answer = server.post(TASKS, json=body)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["meta"]["id"])


def fetch(server: LiveServer, task_id: str) -> dict[str, Any]:
    answer = server.get(f"{TASKS}/{task_id}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def wait_state(server: LiveServer, task_id: str, states: set[str]) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def reached() -> bool:
        last.update(fetch(server, task_id))
        return last["state"] in states

    wait_for(reached, message=lambda: f"task is {last}")
    return last


def recorded(journal: Path) -> dict[str, str]:
    """Task id -> state, as committed in the journal file."""
    return dict(rows(journal))


def number(task_id: str) -> int:
    return int(task_id.lstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))


# -- restarts ------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_a_restart_keeps_finished_ends_running_and_runs_queued_tasks(
        servers: list[LiveServer], tmp_path: Path, stop: str) -> None:
    journal = tmp_path / "tasks.db"
    first = serve(servers, journal, "--max-workers", "1")
    finished = create(first, {"operation": "HASH", "args": {"megabytes": 1}})
    assert wait_state(first, finished, TERMINAL)["state"] == "SUCCEEDED"
    running = create(first, {"operation": "SLEEP", "args": {"seconds": 60}})
    wait_state(first, running, {"ACTIVE"})
    queued = [create(first, {"operation": "HASH", "objectId": f"q{n}",
                             "args": {"megabytes": 1}}) for n in range(3)]
    before = {task_id: fetch(first, task_id) for task_id in queued}
    expected = {finished: "SUCCEEDED", running: "ACTIVE", **dict.fromkeys(queued, "NEW")}
    wait_for(lambda: recorded(journal) == expected, message=lambda: str(recorded(journal)))
    if stop == "SIGTERM":
        assert first.stop(signal.SIGTERM) == RET_OK, first.log()
    else:
        first.kill()  # NOTE: the server and every process below it, at once

    second = serve(servers, journal, "--max-workers", "1")
    assert fetch(second, finished)["state"] == "SUCCEEDED"
    ended = fetch(second, running)
    if stop == "SIGTERM":  # canceled and recorded as at every stop
        assert (ended["state"], ended["outcome"]["kind"]) == ("CANCELED", "canceled-terminate")
    else:
        assert (ended["state"], ended["outcome"]["kind"]) == ("FAILED", "lost")
        assert ended["outcome"]["message"] == "the supervisor stopped while the task ran"
    for task_id in queued:
        done = wait_state(second, task_id, TERMINAL)
        assert done["state"] == "SUCCEEDED", done
        assert done["meta"]["timeCreated"] == before[task_id]["meta"]["timeCreated"]
        assert done["objectId"] == before[task_id]["objectId"]
        assert done["messages"][0]["message"] == "queued again after a restart"
    fresh = create(second, {"operation": "HASH", "args": {"megabytes": 1}})
    assert number(fresh) > max(number(task_id) for task_id in expected)
    listed = second.get(TASKS, params={"history": "true"}).json()
    assert [t["meta"]["id"] for t in listed] == [finished, running, *queued, fresh]
    assert second.get("/healthz").json()["journal"] == "ok"


def test_a_purged_task_is_fetched_from_the_journal(servers: list[LiveServer],
                                                   tmp_path: Path) -> None:
    server = serve(servers, tmp_path / "tasks.db", "--purge-delay", "0")
    task_id = create(server, {"operation": "HASH", "args": {"megabytes": 1}})
    done = wait_state(server, task_id, TERMINAL)
    assert done["state"] == "SUCCEEDED" and done["result"]["megabytes"] == 1
    assert task_id not in [t["meta"]["id"] for t in server.get(TASKS).json()]
    assert task_id in [t["meta"]["id"] for t in server.get(TASKS, params={
        "history": "true", "operation": "HASH", "state": "SUCCEEDED"}).json()]
    assert_error(server.get(f"{TASKS}/HASH999999").status_code,
                 server.get(f"{TASKS}/HASH999999").json(), 404)


def test_retention_by_count_deletes_the_oldest_finished_records(
        servers: list[LiveServer], tmp_path: Path) -> None:
    journal = tmp_path / "tasks.db"
    server = serve(servers, journal, "--purge-delay", "0", "--retention-tasks", "5")
    made = [create(server, {"operation": "SLEEP", "args": {"seconds": 0}}) for _ in range(8)]
    # NOTE: only the newest five are waited for: an older one may already be gone
    # from the table and the journal by the time it is asked for
    for task_id in made[3:]:
        wait_state(server, task_id, TERMINAL)
    wait_for(lambda: list(recorded(journal)) == made[3:],
             message=lambda: str(recorded(journal)))
    for task_id in made[:3]:
        assert server.get(f"{TASKS}/{task_id}").status_code == 404
    assert fetch(server, made[3])["state"] == "SUCCEEDED"


def test_a_journal_that_cannot_be_opened_stops_the_server(
        servers: list[LiveServer], tmp_path: Path) -> None:
    server = LiveServer("--journal", str(tmp_path / "no-such-folder" / "tasks.db"))
    code, _, err = server.run_to_exit()
    assert code == RET_JOURNAL, err
    assert "no-such-folder" in err and "Traceback" not in err


# -- pages and filters over HTTP ----------------------------------------------------------------


def test_pages_and_filters_over_http(servers: list[LiveServer], tmp_path: Path) -> None:
    server = serve(servers, tmp_path / "tasks.db", "--max-workers", "1")
    holder = create(server, {"operation": "SLEEP", "args": {"seconds": 60}})
    wait_state(server, holder, {"ACTIVE"})  # NOTE: the rest stay queued
    made = [create(server, {"operation": "HASH", "objectId": f"o{n % 2}",
                            "args": {"megabytes": 1}}) for n in range(25)]
    pages = []
    answer = server.get(TASKS, params={"operation": "HASH", "limit": "10"})
    while True:
        assert answer.status_code == 200, answer.text
        pages.append([t["meta"]["id"] for t in answer.json()])
        if "next" not in answer.links:
            break
        answer = server.session.get(requests.compat.urljoin(server.url, answer.links["next"][
            "url"]), timeout=TIMEOUT)
    assert [len(page) for page in pages] == [10, 10, 5]
    assert [task_id for page in pages for task_id in page] == made
    active = server.get(TASKS, params={"state": "ACTIVE"}).json()
    assert [t["meta"]["id"] for t in active] == [holder]
    odd = server.get(TASKS, params={"objectId": "o1", "state": ["NEW", "ACTIVE"]})
    assert [t["meta"]["id"] for t in odd.json()] == made[1::2]
    assert server.get(TASKS, params={"limit": "10001"}).status_code == 400
    assert server.post(f"{TASKS}/{holder}/cancel").status_code == 200


# -- idempotent POSTs --------------------------------------------------------------------------


def test_ten_concurrent_posts_with_one_key_create_one_task(
        servers: list[LiveServer], tmp_path: Path) -> None:
    server = serve(servers, tmp_path / "tasks.db", "--threads", "12")
    body = {"operation": "SLEEP", "args": {"seconds": 30}}
    headers = {"Idempotency-Key": "checkout-7f3a"}
    answers: list[requests.Response] = []
    barrier = threading.Barrier(10)

    def post() -> None:
        with requests.Session() as session:
            barrier.wait()
            answers.append(session.post(server.api(TASKS), json=body, headers=headers,
                                        timeout=TIMEOUT))

    threads = [threading.Thread(target=post) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(a.status_code for a in answers) == [200] * 9 + [201]
    assert len({a.json()["meta"]["id"] for a in answers}) == 1
    assert len({a.headers["Location"] for a in answers}) == 1
    assert all(a.headers.get("Idempotent-Replayed") == "true"
               for a in answers if a.status_code == 200)
    assert len(server.get(TASKS, params={"operation": "SLEEP"}).json()) == 1
    conflict = server.post(TASKS, json={"operation": "SLEEP", "args": {"seconds": 31}},
                           headers=headers)
    assert_error(conflict.status_code, conflict.json(), 422, "checkout-7f3a")
    server.post(f"{TASKS}/{answers[0].json()['meta']['id']}/cancel")


# -- a failing disk -----------------------------------------------------------------------------


def test_a_full_disk_leaves_the_server_serving(servers: list[LiveServer]) -> None:
    with tiny_disk("1m") as folder:
        server = serve(servers, folder / "tasks.db", "--purge-delay", "0")
        fill(folder)
        big = {"operation": "SLEEP", "args": {"seconds": 0, "pad": "x" * 100_000}}
        made = [create(server, big) for _ in range(5)]
        wait_for(lambda: server.get("/healthz").json()["journal"] != "ok")
        health = server.get("/healthz").json()
        assert health["status"] == "ok" and "full" in health["journal"], health
        for task_id in made:  # NOTE: kept (and served) in memory meanwhile
            assert wait_state(server, task_id, TERMINAL)["state"] == "SUCCEEDED"
        assert create(server, {"operation": "SLEEP", "args": {"seconds": 0}})
        assert "journal" in server.log() and "full" in server.log()
        assert server.stop() == RET_OK, server.log()


def test_a_read_only_journal_leaves_the_server_serving(servers: list[LiveServer],
                                                       tmp_path: Path) -> None:
    journal = tmp_path / "tasks.db"
    first = serve(servers, journal, "--purge-delay", "0")
    old = create(first, {"operation": "HASH", "args": {"megabytes": 1}})
    wait_state(first, old, TERMINAL)
    wait_for(lambda: recorded(journal).get(old) == "SUCCEEDED")
    assert first.stop() == RET_OK
    with read_only(journal):
        server = serve(servers, journal)
        health = server.get("/healthz").json()
        assert health["status"] == "ok" and "readonly" in health["journal"], health
        assert fetch(server, old)["state"] == "SUCCEEDED"  # what is there is still read
        task_id = create(server, {"operation": "HASH", "args": {"megabytes": 1}})
        assert wait_state(server, task_id, TERMINAL)["state"] == "SUCCEEDED"
        assert server.stop() == RET_OK, server.log()
