"""``GET /api/v1/tasks`` a page at a time (filters, ``Link``, ``X-Total-Count``) and
``POST /api/v1/tasks`` with an ``Idempotency-Key``, over a FakeManager."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from fakes import DummyAccessControl, FakeManager
from falcon import testing
from rest_support import OpenApiChecker, assert_error, bearer, make_client

TASKS = "/api/v1/tasks"
_LINK = re.compile(r'^<([^>]+)>; rel="next"$')


def fill(fake: FakeManager, count: int, operation: str = "HASH", **fields: Any) -> list[str]:
    return [fake.run_task({"operation": operation, **fields}) for _ in range(count)]


def ids(result: testing.Result) -> list[str]:
    return [task["meta"]["id"] for task in result.json]


def next_url(result: testing.Result) -> str | None:
    """The next page's path and query, from the Link header (None: the last page)."""
    link = result.headers.get("Link")
    if link is None:
        return None
    match = _LINK.match(link)
    assert match, link
    return match.group(1)


def walk(client: testing.TestClient, query: str, **kwargs: Any) -> list[list[str]]:
    """Every page's ids, following Link from ``GET /tasks?query``."""
    pages = []
    result = client.simulate_get(TASKS, query_string=query, **kwargs)
    while True:
        assert result.status_code == 200, result.json
        pages.append(ids(result))
        url = next_url(result)
        if url is None:
            return pages
        path, _, query = url.partition("?")
        result = client.simulate_get(path, query_string=query, **kwargs)


# -- pages ---------------------------------------------------------------------------------


def test_pages_follow_the_link_header_to_the_last() -> None:
    client, fake = make_client()
    made = fill(fake, 25)
    pages = walk(client, "limit=10")
    assert [len(page) for page in pages] == [10, 10, 5]
    assert [task_id for page in pages for task_id in page] == made


def test_a_last_page_that_is_exactly_full_has_no_link() -> None:
    client, fake = make_client()
    made = fill(fake, 20)
    assert walk(client, "limit=10") == [made[:10], made[10:]]
    assert "Link" not in client.simulate_get(TASKS, query_string="limit=20").headers
    assert "Link" in client.simulate_get(TASKS, query_string="limit=19").headers


def test_the_default_page_is_a_thousand_tasks() -> None:
    client, fake = make_client()
    fill(fake, 1001)
    result = client.simulate_get(TASKS)
    assert len(result.json) == 1000
    assert result.headers["X-Total-Count"] == "1001"
    url = next_url(result)
    assert url is not None and parse_qs(urlsplit(url).query)["after"] == [result.json[-1][
        "meta"]["id"]]
    assert len(client.simulate_get(TASKS, query_string="limit=10000").json) == 1001


def test_the_link_keeps_the_filters_and_replaces_after() -> None:
    client, fake = make_client()
    fill(fake, 4, "SLEEP")
    made = fill(fake, 6)
    first = client.simulate_get(TASKS, query_string=f"operation=HASH&state=NEW&state=ACTIVE"
                                                    f"&after={made[0]}&limit=2")
    assert ids(first) == made[1:3]
    url = next_url(first)
    assert url is not None and url.startswith(f"{TASKS}?")
    query = parse_qs(urlsplit(url).query)
    assert query == {"operation": ["HASH"], "state": ["NEW", "ACTIVE"], "limit": ["2"],
                     "after": [made[2]]}
    assert walk(client, "operation=HASH&state=NEW&limit=4") == [made[:4], made[4:]]


def test_filters_by_operation_state_and_object_id() -> None:
    client, fake = make_client()
    hashes = fill(fake, 3)
    sleeps = fill(fake, 3, "SLEEP", objectId="vol-9")
    fake.set_state(hashes[1], "ACTIVE")
    fake.set_state(sleeps[2], "FAILED", "boom")

    def listed(query: str) -> list[str]:
        result = client.simulate_get(TASKS, query_string=query)
        assert result.status_code == 200, result.json
        return ids(result)

    assert listed("operation=SLEEP") == sleeps
    assert listed("state=ACTIVE") == [hashes[1]]
    assert listed("state=ACTIVE&state=FAILED") == [hashes[1], sleeps[2]]
    assert listed("objectId=vol-9&state=NEW") == sleeps[:2]
    assert listed("objectId=nothing") == []
    counted = client.simulate_get(TASKS, query_string="operation=SLEEP&state=NEW")
    assert counted.headers["X-Total-Count"] == "2"
    for query in ("objectId=vol-9", f"after={hashes[0]}", "history=true"):
        assert "X-Total-Count" not in client.simulate_get(TASKS, query_string=query).headers


@pytest.mark.parametrize(("query", "words"), [
    ("limit=0", "limit"), ("limit=10001", "limit"), ("limit=ten", "limit"),
    ("limit=1&limit=2", "more than once"), ("state=DONE", "state"),
    ("after=no%20such", "after"), ("after=HASH999999", "no task"),
    ("objectId=" + "x" * 129, "objectId"), ("history=yes", "history"),
])
def test_malformed_list_parameters_are_400(query: str, words: str) -> None:
    client, fake = make_client()
    fill(fake, 2)
    result = client.simulate_get(TASKS, query_string=query)
    assert_error(result.status_code, result.json, 400, words)


def test_pages_hold_only_tasks_the_caller_may_view() -> None:
    control = DummyAccessControl({"viewer": {"view": {"SLEEP"}}})
    client, fake = make_client(access_control=control)
    visible = []
    for _ in range(6):
        fill(fake, 3)  # NOTE: runs of tasks the viewer may not see, between its own
        visible += fill(fake, 1, "SLEEP")
    fill(fake, 3)
    pages = walk(client, "limit=2", headers=bearer("viewer"))
    assert pages == [visible[0:2], visible[2:4], visible[4:6]]
    first = client.simulate_get(TASKS, query_string="limit=2", headers=bearer("viewer"))
    assert first.headers["X-Total-Count"] == "6"


# -- idempotent creates ----------------------------------------------------------------------


def test_the_same_key_and_body_answers_200_with_the_first_task() -> None:
    client, fake = make_client()
    checker = OpenApiChecker(client.simulate_get("/api/v1/openapi.json").json)
    body = {"operation": "SLEEP", "args": {"seconds": 1}}
    headers = {"Idempotency-Key": "order-42.retry_1"}
    first = client.simulate_post(TASKS, json=body, headers=headers)
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    checker.check(TASKS, "POST", 201, first.headers, first.json)
    fake.set_state(first.json["meta"]["id"], "ACTIVE")
    for _ in range(3):
        again = client.simulate_post(TASKS, json=body, headers=headers)
        assert again.status_code == 200
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.headers["Location"] == first.headers["Location"]
        assert again.json["meta"]["id"] == first.json["meta"]["id"]
        assert again.json["state"] == "ACTIVE"  # the task as it is now
        checker.check(TASKS, "POST", 200, again.headers, again.json)
    assert len(fake.tasks) == 1
    other = client.simulate_post(TASKS, json=body, headers={"Idempotency-Key": "another"})
    assert other.status_code == 201 and len(fake.tasks) == 2


def test_the_same_key_with_another_body_is_422() -> None:
    client, fake = make_client()
    checker = OpenApiChecker(client.simulate_get("/api/v1/openapi.json").json)
    headers = {"Idempotency-Key": "k"}
    assert client.simulate_post(TASKS, json={"operation": "HASH"},
                                headers=headers).status_code == 201
    result = client.simulate_post(TASKS, json={"operation": "HASH", "objectId": "x"},
                                  headers=headers)
    assert_error(result.status_code, result.json, 422, "idempotency key")
    checker.check(TASKS, "POST", 422, result.headers, result.json)
    assert len(fake.tasks) == 1


@pytest.mark.parametrize("key", ["", "x" * 129, "two words", "ü", "a/b"])
def test_a_malformed_idempotency_key_is_400(key: str) -> None:
    client, fake = make_client()
    result = client.simulate_post(TASKS, json={"operation": "HASH"},
                                  headers={"Idempotency-Key": key})
    assert_error(result.status_code, result.json, 400, "Idempotency-Key")
    assert fake.tasks == {}


# -- /healthz --------------------------------------------------------------------------------


def test_health_reports_the_journal_only_when_there_is_one() -> None:
    client, fake = make_client()
    assert "journal" not in client.simulate_get("/healthz").json
    fake.journal_status = "cannot write: database or disk is full"
    health = client.simulate_get("/healthz").json
    assert health["status"] == "ok" and health["journal"] == fake.journal_status
