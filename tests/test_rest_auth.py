"""Access control: the token file, bearer authentication, and the 401/403 matrix over HTTP."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeManager
from falcon import testing
from rest_support import assert_error, bearer, make_client

from rest import TokenAccessControl, TokenFileError
from rest.auth import hash_token, parse_token_document
from rest.cli import RET_OK, RET_USAGE, CommandError, build_parser, hash_token_command

TASKS = "/api/v1/tasks"
TOKENS = {"ops-token": "ops", "dash-token": "dashboard", "hash-token": "hasher"}


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_document() -> dict[str, Any]:
    return {"tokens": [
        {"sha256": digest("ops-token"), "subject": "ops",
         "view": ["*"], "create": ["HASH", "SLEEP"], "cancel": ["*"]},
        {"sha256": digest("dash-token"), "subject": "dashboard", "view": ["*"]},
        {"sha256": digest("hash-token").upper(), "subject": "hasher",
         "view": ["HASH"], "create": ["HASH"], "cancel": ["HASH"]},
        {"sha256": digest("reaper-token"), "subject": "reaper", "cancel": ["SLEEP"]},
    ]}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(token_document()))
    return path


@pytest.fixture
def secured(token_file: Path) -> tuple[testing.TestClient, FakeManager]:
    return make_client(access_control=TokenAccessControl.from_file(token_file))


# -- the token file ----------------------------------------------------------------


def test_hash_token_is_sha256_hex() -> None:
    assert hash_token("s3cret") == hashlib.sha256(b"s3cret").hexdigest()


def test_token_file_loads(token_file: Path) -> None:
    control = TokenAccessControl.from_file(token_file)
    req = testing.create_req(headers=bearer("dash-token"))
    subject = control.authenticate(req)
    assert subject is not None and subject.name == "dashboard"
    assert control.can_view(subject, "ANY") and not control.can_create(subject, "HASH")
    assert not control.can_cancel(subject, "HASH")


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ([], '"tokens"'),
        ({"tokens": [], "extra": 1}, '"tokens"'),
        ({"tokens": {}}, "tokens must be a list"),
        ({"tokens": ["x"]}, "tokens[0] must be an object"),
        ({"tokens": [{"subject": "a"}]}, "tokens[0].sha256"),
        ({"tokens": [{"sha256": "abc", "subject": "a"}]}, "tokens[0].sha256"),
        ({"tokens": [{"sha256": "g" * 64, "subject": "a"}]}, "tokens[0].sha256"),
        ({"tokens": [{"sha256": "a" * 64, "subject": ""}]}, "tokens[0].subject"),
        ({"tokens": [{"sha256": "a" * 64, "subject": "a", "view": "*"}]}, "tokens[0].view"),
        ({"tokens": [{"sha256": "a" * 64, "subject": "a", "create": [1]}]}, "tokens[0].create"),
        ({"tokens": [{"sha256": "a" * 64, "subject": "a", "cancle": []}]}, "'cancle'"),
        ({"tokens": [{"sha256": "a" * 64, "subject": "a"},
                     {"sha256": "A" * 64, "subject": "b"}]}, "tokens[1].sha256 repeats"),
    ],
)
def test_malformed_token_documents_name_the_problem(document: Any, problem: str) -> None:
    with pytest.raises(TokenFileError, match=r"tokens\.json: ") as caught:
        parse_token_document(document, "tokens.json")
    assert problem in str(caught.value)


def test_unreadable_or_invalid_token_file(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read"):
        TokenAccessControl.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{tokens: []}")
    with pytest.raises(TokenFileError, match="not valid JSON"):
        TokenAccessControl.from_file(bad)


@pytest.mark.parametrize("header", ["Bearer ops-token", "bearer ops-token", "BEARER  ops-token ",
                                    " Bearer ops-token"])
def test_bearer_header_variants(token_file: Path, header: str) -> None:
    control = TokenAccessControl.from_file(token_file)
    subject = control.authenticate(testing.create_req(headers={"Authorization": header}))
    assert subject is not None and subject.name == "ops"


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic b3BzLXRva2Vu",
                                    "Bearer ops-token2", "Token ops-token"])
def test_bad_credentials_authenticate_to_none(token_file: Path, header: str | None) -> None:
    control = TokenAccessControl.from_file(token_file)
    headers = {"Authorization": header} if header is not None else {}
    assert control.authenticate(testing.create_req(headers=headers)) is None


def test_every_entry_is_compared_in_constant_time(
    token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    control = TokenAccessControl.from_file(token_file)
    assert control.authenticate(testing.create_req(headers=bearer("ops-token"))) is not None
    assert len(calls) == len(token_document()["tokens"])  # no early exit on the first match


# -- HTTP: 401 ---------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [
    ("GET", TASKS), ("POST", TASKS), ("GET", f"{TASKS}/HASH000001"),
    ("POST", f"{TASKS}/HASH000001/cancel"), ("GET", "/api/v1/task-events"),
])
def test_missing_or_wrong_credentials_are_401_with_bearer_challenge(
    secured: tuple[testing.TestClient, FakeManager], method: str, path: str
) -> None:
    client, fake = secured
    fake.run_task({"operation": "HASH"})
    missing = client.simulate_request(method, path, json={"operation": "HASH"})
    assert_error(missing.status_code, missing.json, 401)
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="housekeeping"'
    wrong = client.simulate_request(method, path, json={"operation": "HASH"},
                                    headers=bearer("nope"))
    assert_error(wrong.status_code, wrong.json, 401)
    assert wrong.headers["WWW-Authenticate"].startswith("Bearer ")
    assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    assert len(fake.tasks) == 1


def test_health_and_openapi_need_no_credentials(
    secured: tuple[testing.TestClient, FakeManager],
) -> None:
    client, _ = secured
    assert client.simulate_get("/healthz").status_code == 200
    assert client.simulate_get("/api/v1/openapi.json").status_code == 200


# -- HTTP: 403 and filtering ------------------------------------------------------------


def test_auth_matrix(secured: tuple[testing.TestClient, FakeManager]) -> None:
    client, fake = secured
    hash_id = fake.run_task({"operation": "HASH"})
    sleep_id = fake.run_task({"operation": "SLEEP"})

    def status(method: str, path: str, token: str, body: Any = None) -> int:
        return client.simulate_request(method, path, json=body, headers=bearer(token)).status_code

    create_hash, create_sleep = {"operation": "HASH"}, {"operation": "SLEEP"}
    # ops: everything
    assert status("POST", TASKS, "ops-token", create_sleep) == 201
    assert status("GET", f"{TASKS}/{sleep_id}", "ops-token") == 200
    # dashboard: view only
    assert status("GET", f"{TASKS}/{hash_id}", "dash-token") == 200
    assert status("POST", TASKS, "dash-token", create_hash) == 403
    assert status("POST", f"{TASKS}/{hash_id}/cancel", "dash-token") == 403
    # hasher: HASH only
    assert status("POST", TASKS, "hash-token", create_hash) == 201
    assert status("POST", TASKS, "hash-token", create_sleep) == 403
    # a task the subject may not view looks like an unknown id, on GET and cancel
    assert status("GET", f"{TASKS}/{sleep_id}", "hash-token") == 404
    assert status("POST", f"{TASKS}/{sleep_id}/cancel", "hash-token") == 404
    assert status("POST", f"{TASKS}/{hash_id}/cancel", "hash-token") == 200
    assert fake.tasks[sleep_id]["cancelRequested"] is False
    # unknown ids stay 404 for whoever may ask
    assert status("GET", f"{TASKS}/HASH999999", "hash-token") == 404

    forbidden = client.simulate_post(TASKS, json=create_sleep, headers=bearer("hash-token"))
    assert_error(forbidden.status_code, forbidden.json, 403, "create", "SLEEP")


def test_a_hidden_task_is_indistinguishable_from_an_unknown_id(
    secured: tuple[testing.TestClient, FakeManager],
) -> None:
    client, fake = secured
    sleep_id = fake.run_task({"operation": "SLEEP"})
    unknown_id = "SLEEP999999"
    for path in ("", "/cancel"):
        method = "POST" if path else "GET"
        hidden = client.simulate_request(method, f"{TASKS}/{sleep_id}{path}",
                                         headers=bearer("hash-token"))
        unknown = client.simulate_request(method, f"{TASKS}/{unknown_id}{path}",
                                          headers=bearer("hash-token"))
        assert hidden.status_code == unknown.status_code == 404
        assert hidden.json["message"].replace(sleep_id, unknown_id) == unknown.json["message"]


def test_cancel_without_view_answers_only_the_id(
    secured: tuple[testing.TestClient, FakeManager],
) -> None:
    client, fake = secured
    sleep_id = fake.run_task({"operation": "SLEEP", "args": {"secret": "s3"}})
    answer = client.simulate_post(f"{TASKS}/{sleep_id}/cancel", headers=bearer("reaper-token"))
    assert answer.status_code == 200
    assert answer.json == {"meta": {"id": sleep_id}, "cancelRequested": True}
    assert fake.tasks[sleep_id]["cancelRequested"] is True
    assert client.simulate_get(f"{TASKS}/{sleep_id}",
                               headers=bearer("reaper-token")).status_code == 404


def test_list_shows_only_what_the_subject_may_view(
    secured: tuple[testing.TestClient, FakeManager],
) -> None:
    client, fake = secured
    ids = [fake.run_task({"operation": op}) for op in ("HASH", "SLEEP", "HASH")]
    seen = client.simulate_get(TASKS, headers=bearer("hash-token")).json
    assert [t["meta"]["id"] for t in seen] == [ids[0], ids[2]]
    everything = client.simulate_get(TASKS, headers=bearer("dash-token")).json
    assert [t["meta"]["id"] for t in everything] == ids
    only_sleep = client.simulate_get(TASKS, params={"operation": "SLEEP"},
                                     headers=bearer("hash-token")).json
    assert only_sleep == []


def test_body_errors_come_after_authentication(
    secured: tuple[testing.TestClient, FakeManager],
) -> None:
    client, _ = secured
    result = client.simulate_post(TASKS, body=b"not json", headers={"Content-Type": "text/plain"})
    assert result.status_code == 401
    result = client.simulate_post(TASKS, json={"operation": "HASH", "state": "NEW"},
                                  headers=bearer("dash-token"))
    assert_error(result.status_code, result.json, 400, "state")


# -- housekeeping hash-token -------------------------------------------------------------


class FakeStdin(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_hash_token_command_reads_stdin() -> None:
    out = io.StringIO()
    args = build_parser().parse_args(["hash-token"])
    assert hash_token_command(args, FakeStdin("s3cret\n"), out) == RET_OK
    assert out.getvalue().strip() == digest("s3cret")


def test_hash_token_command_generates_a_usable_pair(tmp_path: Path) -> None:
    out = io.StringIO()
    args = build_parser().parse_args(["hash-token", "--generate"])
    assert hash_token_command(args, FakeStdin(""), out) == RET_OK
    lines = dict(line.split(":", 1) for line in out.getvalue().splitlines())
    token, sha = lines["token"].strip(), lines["sha256"].strip()
    assert len(token) >= 32 and sha == digest(token)
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"tokens": [{"sha256": sha, "subject": "me", "view": ["*"]}]}))
    client, _ = make_client(access_control=TokenAccessControl.from_file(path))
    assert client.simulate_get(TASKS, headers=bearer(token)).status_code == 200


def test_hash_token_command_refuses_an_empty_token() -> None:
    args = build_parser().parse_args(["hash-token"])
    with pytest.raises(CommandError) as caught:
        hash_token_command(args, FakeStdin("\n"), io.StringIO())
    assert caught.value.code == RET_USAGE
