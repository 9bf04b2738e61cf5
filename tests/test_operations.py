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
    assert [entry["operation"] for entry in result.json] == ["COPY", "ZIP"]
    assert set(result.json[0]) == {"operation", "timeout", "maxMemory", "sandbox"}


def test_lists_only_what_the_caller_may_create() -> None:
    client, _ = make_client(access_control=_control())
    answers = {
        name: [entry["operation"] for entry in
               client.simulate_get(OPERATIONS, headers=bearer(name)).json]
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


def test_a_real_server_shows_each_operations_sandbox_and_its_containment() -> None:
    """``housekeeping serve --run-as dynamic --max-processes 50 --max-cpu-seconds 30``:
    the flags are the default sandbox of every operation; /healthz names the containment."""
    import os

    from conftest import PRIVATE_PIDS_OFF
    from rest_support import LiveServer

    from supervisor.sandbox import pid_namespaces_permitted

    if os.geteuid() != 0:
        return _refused_without_root()
    flags = ["--run-as", "dynamic", "--max-processes", "50", "--max-cpu-seconds", "30",
             "--max-open-files", "256", "--private-network"]
    if not pid_namespaces_permitted():
        flags.remove("--private-network")
    server = LiveServer(*flags).start()
    try:
        private = pid_namespaces_permitted() and not PRIVATE_PIDS_OFF
        operations = server.get(OPERATIONS).json()
        assert [entry["operation"] for entry in operations] == ["HASH", "SLEEP"]
        assert operations[0]["sandbox"] == {
            "privatePids": private, "privateNetwork": pid_namespaces_permitted(),
            "user": "dynamic", "maxProcesses": 50, "maxCpuSeconds": 30.0, "maxOpenFiles": 256}
        health = server.get("/healthz").json()
        assert health["containment"] == ("pid-namespace" if private else "subreaper")
        assert "containment: " + health["containment"] in server.log()
    finally:
        server.stop()


def _refused_without_root() -> None:
    from rest_support import LiveServer

    code, _, err = LiveServer("--run-as", "dynamic").run_to_exit()
    assert code == 2 and "must run as root" in err, err
