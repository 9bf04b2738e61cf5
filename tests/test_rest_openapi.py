"""The OpenAPI document: valid, complete, and true to the answers the app really gives."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fakes import DummyAccessControl, FakeManager
from openapi_spec_validator import validate
from rest_support import OpenApiChecker, bearer, make_client

from rest.openapi import build_document

TASKS = "/api/v1/tasks"


@pytest.mark.parametrize("auth", [False, True])
def test_document_is_valid_openapi_3_1(auth: bool) -> None:
    document = build_document(auth=auth)
    validate(document)
    assert document["openapi"].startswith("3.1")
    assert document["servers"] == [{"url": "/"}]
    assert all(path.startswith("/") for path in document["paths"])


def test_served_document_matches_the_app_routes() -> None:
    client, _ = make_client()
    document = client.simulate_get("/api/v1/openapi.json").json
    assert document == build_document(auth=False)
    routes = set()
    for node in _walk(client.app._router._roots):
        routes.add(re.sub(r"\{[^}]+\}", "{id}", node.uri_template))
    assert routes == set(document["paths"])


def test_auth_is_described_only_when_on() -> None:
    open_doc, secured = build_document(auth=False), build_document(auth=True)
    assert "security" not in open_doc and "securitySchemes" not in open_doc["components"]
    assert secured["security"] == [{"bearer": []}]
    assert secured["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, methods in secured["paths"].items():
        for operation in methods.values():
            public = path in ("/healthz", "/api/v1/openapi.json")
            assert (operation.get("security") == []) == public
            assert ("401" in operation["responses"]) != public
            assert "401" not in open_doc["paths"][path][next(iter(methods))]["responses"]


def test_every_error_response_uses_the_error_schema() -> None:
    document = build_document(auth=True)
    for name, response in document["components"]["responses"].items():
        assert name.startswith("Error")
        assert response["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"}


def test_real_answers_match_their_schemas() -> None:
    control = DummyAccessControl({
        "ops": {"view": {"*"}, "create": {"*"}, "cancel": {"*"}},
        "viewer": {"view": {"*"}},
    })
    fake = FakeManager()
    client, _ = make_client(fake, control)
    checker = OpenApiChecker(client.simulate_get("/api/v1/openapi.json").json)
    ops, viewer = bearer("ops"), bearer("viewer")
    item, cancel = f"{TASKS}/{{id}}", f"{TASKS}/{{id}}/cancel"

    def call(template: str, method: str, path: str, **kwargs: Any) -> Any:
        result = client.simulate_request(method, path, **kwargs)
        checker.check(template, method, result.status_code, result.headers, result.json)
        return result

    created = call(TASKS, "POST", TASKS, json={"operation": "SLEEP", "objectId": "o",
                                               "args": {"seconds": 1}}, headers=ops)
    assert created.status_code == 201
    task_id = created.json["meta"]["id"]
    fake.set_state(task_id, "ACTIVE")
    fake.tasks[task_id]["progress"] = {"percentComplete": 40, "totalBytes": 10,
                                       "offsetBytes": 4, "transferredBytes": 4,
                                       "timestamp": "2026-11-27T18:00:01.000001Z"}
    statuses = {
        call(TASKS, "GET", TASKS, headers=viewer).status_code,
        call(TASKS, "GET", TASKS).status_code,
        call(item, "GET", f"{TASKS}/{task_id}", headers=viewer).status_code,
        call(item, "GET", f"{TASKS}/NOPE", headers=viewer).status_code,
        call(cancel, "POST", f"{TASKS}/{task_id}/cancel", headers=viewer).status_code,
        call(cancel, "POST", f"{TASKS}/{task_id}/cancel", headers=ops).status_code,
        call(cancel, "POST", f"{TASKS}/NOPE/cancel", headers=ops).status_code,
        call(TASKS, "POST", TASKS, json={"operation": "SLEEP", "state": "x"},
             headers=ops).status_code,
        call(TASKS, "POST", TASKS, json={"operation": "NOPE"}, headers=ops).status_code,
        call(TASKS, "POST", TASKS, body=b"x", headers={**ops, "Content-Type": "text/plain"}
             ).status_code,
        call(TASKS, "POST", TASKS, body=b"x" * (1024 * 1024 + 1),
             headers={**ops, "Content-Type": "application/json"}).status_code,
        call(TASKS, "POST", TASKS, json={"operation": "HASH"}, headers=viewer).status_code,
        call("/healthz", "GET", "/healthz").status_code,
        call("/api/v1/task-events", "GET", "/api/v1/task-events").status_code,
    }
    fake.queue_full = True
    statuses.add(call(TASKS, "POST", TASKS, json={"operation": "HASH"}, headers=ops).status_code)
    fake.queue_full, fake.terminated = False, True
    statuses.add(call(TASKS, "POST", TASKS, json={"operation": "HASH"}, headers=ops).status_code)
    fake.terminated, fake.purge_at_once = False, True
    statuses.add(call(TASKS, "POST", TASKS, json={"operation": "HASH"}, headers=ops).status_code)
    fake.broken["list_tasks"] = RuntimeError("boom")
    statuses.add(call(TASKS, "GET", TASKS, headers=ops).status_code)
    assert statuses == {200, 201, 400, 401, 403, 404, 409, 413, 415, 429, 500, 503}


def test_an_event_matches_the_event_schema() -> None:
    from openapi_schema_validator import OAS31Validator

    document = build_document(auth=False)
    fake = FakeManager()
    seen: list[dict[str, Any]] = []
    fake.subscribe(seen.append)
    task_id = fake.run_task({"operation": "HASH"})
    fake.set_state(task_id, "FAILED", "ValueError: bad")
    fake.purge(task_id)
    schema = {"$ref": "#/components/schemas/TaskEvent", "components": document["components"]}
    for event in seen:
        OAS31Validator(schema).validate(event)
    dropped = {"$ref": "#/components/schemas/DroppedEvent", "components": document["components"]}
    OAS31Validator(dropped).validate({"method": "DROPPED", "uri": "/tasks", "scope": {},
                                      "task": None, "message": "reconnect"})


def test_log_answers_match_their_schemas() -> None:
    from openapi_schema_validator import OAS31Validator
    from test_rest_logs import following

    control = DummyAccessControl({"viewer": {"view": {"*"}}, "hasher": {"view": {"HASH"}}})
    fake = FakeManager()
    client, _ = make_client(fake, control, max_streams=1)
    document = client.simulate_get("/api/v1/openapi.json").json
    checker = OpenApiChecker(document)
    log = f"{TASKS}/{{id}}/log"
    task_id = fake.run_task({"operation": "SLEEP"})
    fake.write_log(task_id, "stdout", "out")
    fake.write_log(task_id, "stderr", "err \ufffd")

    def call(path: str, query: str = "", token: str | None = "viewer") -> int:
        result = client.simulate_get(path, query_string=query,
                                     headers=bearer(token) if token else {})
        checker.check(log, "GET", result.status_code, result.headers, result.json)
        return result.status_code

    path = f"{TASKS}/{task_id}/log"
    statuses = {call(path), call(path, "after=1&limit=1"), call(path, "limit=0"),
                call(path, token=None), call(path, token="hasher"), call(f"{TASKS}/NOPE/log")}
    reader = following(client.app, task_id, headers=bearer("viewer"))
    statuses.add(call(path, "follow=true"))  # the one slot is taken
    assert statuses == {200, 400, 401, 404, 503}
    spec = checker.response_spec(log, "GET", 200)
    assert set(spec["content"]) == {"application/json", "text/event-stream"}
    fake.set_state(task_id, "SUCCEEDED")
    fake.end_log(task_id)
    messages = [m for m in reader.rest() if "event" in m]
    reader.close()
    schemas = {"line": "LogLine", "end": "LogEnd"}
    assert [m["event"] for m in messages] == ["line", "line", "end"]
    for message in messages:
        schema = {"$ref": f"#/components/schemas/{schemas[message['event']]}",
                  "components": document["components"]}
        OAS31Validator(schema).validate(message["data"])
    names = {p["name"] for p in document["paths"][log]["get"]["parameters"]}
    assert names == {"id", "after", "limit", "follow", "Last-Event-ID"}


def _walk(nodes: list[Any]) -> Any:
    for node in nodes:
        if node.resource is not None:
            yield node
        yield from _walk(node.children)
