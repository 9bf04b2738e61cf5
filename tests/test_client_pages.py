"""``housekeeping tasks list`` reads every page, with the server's filters; ``tasks
create`` sends an Idempotency-Key and retries with the same one. Over a WSGI app and a
FakeManager (no server)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fakes import FakeManager
from rest_support import make_client

from rest import client as cli_client
from rest.cli import build_parser


def run(argv: list[str], fake: FakeManager, capsys: Any,
        transport: httpx.BaseTransport | None = None) -> tuple[int, Any, str]:
    client, _ = make_client(fake)
    args = build_parser().parse_args(["tasks", *argv, "--url", "http://testserver"])
    code = cli_client.run_tasks_command(
        args, transport=transport or httpx.WSGITransport(app=client.app))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_reads_every_page(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setattr(cli_client, "TASK_PAGE", 10)
    fake = FakeManager()
    made = [fake.run_task({"operation": "HASH"}) for _ in range(25)]
    queries: list[str] = []
    client, _ = make_client(fake)
    inner = httpx.WSGITransport(app=client.app)

    def handle(request: httpx.Request) -> httpx.Response:
        queries.append(request.url.query.decode())
        return inner.handle_request(request)

    code, out, _ = run(["list", "--json"], fake, capsys, httpx.MockTransport(handle))
    assert code == 0
    assert [task["meta"]["id"] for task in json.loads(out)] == made
    assert queries == ["limit=10", f"limit=10&after={made[9]}", f"limit=10&after={made[19]}"]


def test_list_passes_the_filters_and_stops_at_its_limit(
        monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setattr(cli_client, "TASK_PAGE", 3)
    fake = FakeManager()
    hashes = [fake.run_task({"operation": "HASH", "objectId": "v"}) for _ in range(6)]
    fake.run_task({"operation": "SLEEP", "objectId": "v"})
    fake.set_state(hashes[0], "ACTIVE")
    code, out, _ = run(["list", "--operation", "HASH", "--state", "new", "--state", "ACTIVE",
                        "--object-id", "v", "--limit", "4", "--json"], fake, capsys)
    assert code == 0 and [t["meta"]["id"] for t in json.loads(out)] == hashes[:4]
    code, out, _ = run(["list", "--state", "ACTIVE", "--json"], fake, capsys)
    assert [t["meta"]["id"] for t in json.loads(out)] == [hashes[0]]


def test_create_retries_a_broken_connection_with_the_same_key(capsys: Any) -> None:
    fake = FakeManager()
    client, _ = make_client(fake)
    inner = httpx.WSGITransport(app=client.app)
    keys: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])
        answer = inner.handle_request(request)  # NOTE: the server creates the task...
        if len(keys) < 3:
            raise httpx.ReadTimeout("the answer was lost", request=request)  # ...unseen
        return answer

    api = cli_client.ApiClient("http://testserver", transport=httpx.MockTransport(handle),
                               sleep=lambda seconds: None)
    task = api.create_task({"operation": "HASH"})
    assert len(keys) == 3 and len(set(keys)) == 1
    assert len(keys[0]) >= 16
    assert list(fake.tasks) == [task["meta"]["id"]]  # one task, however many tries
    other = api.create_task({"operation": "HASH"})
    assert other["meta"]["id"] != task["meta"]["id"] and len(set(keys)) == 2


def test_create_gives_up_after_its_retries(capsys: Any) -> None:
    tries: list[float] = []

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"code": 503, "message": "terminating"})

    api = cli_client.ApiClient("http://testserver", transport=httpx.MockTransport(handle),
                               sleep=tries.append)
    with pytest.raises(cli_client.ClientError, match="503: terminating") as raised:
        api.create_task({"operation": "HASH"})
    assert raised.value.code == cli_client.RET_API
    assert tries == list(cli_client.CREATE_RETRY_DELAYS)


def test_create_does_not_retry_a_refusal(capsys: Any) -> None:
    fake = FakeManager()
    client, _ = make_client(fake)
    inner = httpx.WSGITransport(app=client.app)
    sent: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return inner.handle_request(request)

    code, _, err = run(["create", "NOPE"], fake, capsys, httpx.MockTransport(handle))
    assert code == cli_client.RET_API and err.startswith("housekeeping: 409")
    assert len(sent) == 1
