"""``GET /api/v1/operations``: the registered operations the caller may create."""

from __future__ import annotations

from fakes import DummyAccessControl, FakeManager, accept_anything
from rest_support import OpenApiChecker, assert_error, bearer, make_client

from rest.openapi import build_document

OPERATIONS = "/api/v1/operations"


def _control() -> DummyAccessControl:
    return DummyAccessControl({
        "ops": {"view": {"*"}, "create": {"*"}, "cancel": {"*"}},
        "sleeper": {"view": {"*"}, "create": {"SLEEP"}},
        "viewer": {"view": {"*"}},
    })


def test_lists_every_registered_operation_sorted_without_auth() -> None:
    manager = FakeManager({"ZIP": accept_anything, "COPY": accept_anything})
    client, _ = make_client(manager)
    result = client.simulate_get(OPERATIONS)
    assert result.status_code == 200
    assert result.json == ["COPY", "ZIP"]


def test_lists_only_what_the_caller_may_create() -> None:
    client, _ = make_client(access_control=_control())
    answers = {
        name: client.simulate_get(OPERATIONS, headers=bearer(name)).json
        for name in ("ops", "sleeper", "viewer")
    }
    assert answers == {"ops": ["HASH", "SLEEP"], "sleeper": ["SLEEP"], "viewer": []}


def test_needs_credentials_when_auth_is_on() -> None:
    client, _ = make_client(access_control=_control())
    result = client.simulate_get(OPERATIONS)
    assert_error(result.status_code, result.json, 401)
    assert result.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = client.simulate_get(OPERATIONS, headers=bearer("nobody"))
    assert_error(wrong.status_code, wrong.json, 401)


def test_answers_match_the_openapi_document() -> None:
    for auth in (False, True):
        document = build_document(auth=auth)
        assert OPERATIONS in document["paths"]
        operation = document["paths"][OPERATIONS]["get"]
        assert operation["operationId"] == "listOperations"
        assert ("401" in operation["responses"]) is auth
    checker = OpenApiChecker(build_document(auth=True))
    client, _ = make_client(access_control=_control())
    for headers in (bearer("sleeper"), {}):
        result = client.simulate_get(OPERATIONS, headers=headers)
        checker.check(OPERATIONS, "GET", result.status_code, result.headers, result.json)
