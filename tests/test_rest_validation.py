"""Validation of the create body: every branch answers 4xx naming the field; fuzzing never 5xx."""

from __future__ import annotations

import json
from typing import Any

import pytest
from falcon import testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_support import assert_error, make_client

from rest.errors import ApiError
from rest.validation import MAX_BODY_BYTES, MAX_DEPTH, check_create, decode_json, parse_create
from supervisor.task import ParsedCreate

TASKS = "/api/v1/tasks"
JSON_HEADERS = {"Content-Type": "application/json"}


def post_raw(client: testing.TestClient, body: bytes, **headers: str) -> testing.Result:
    return client.simulate_post(TASKS, body=body, headers={**JSON_HEADERS, **headers})


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ([], "JSON object"),
        ("SLEEP", "JSON object"),
        (None, "JSON object"),
        ({}, "operation is required"),
        ({"operation": 7}, "operation must be"),
        ({"operation": ""}, "operation must be"),
        ({"operation": "X" * 129}, "operation must be"),
        ({"operation": None}, "operation must be"),
        ({"operation": "SLEEP", "objectId": 5}, "objectId"),
        ({"operation": "SLEEP", "objectId": "x" * 129}, "objectId"),
        ({"operation": "SLEEP", "serviceStates": []}, "serviceStates"),
        ({"operation": "SLEEP", "serviceStates": "up"}, "serviceStates"),
        ({"operation": "SLEEP", "args": [1]}, "args"),
        ({"operation": "SLEEP", "args": 3}, "args"),
        ({"operation": "SLEEP", "colour": "red"}, "unknown field 'colour'"),
        ({"operation": "SLEEP", "x" * 500: 1}, "unknown field 'xxxx"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(body: Any, fragment: str) -> None:
    client, fake = make_client()
    result = post_raw(client, json.dumps(body).encode())
    message = assert_error(result.status_code, result.json, 400, fragment)
    assert len(message) < 300
    assert fake.created == []


@pytest.mark.parametrize("field", ["meta", "state", "cancelRequested", "progress", "messages",
                                   "result"])
def test_read_only_fields_are_400(field: str) -> None:
    client, _ = make_client()
    result = client.simulate_post(TASKS, json={"operation": "SLEEP", field: None})
    assert_error(result.status_code, result.json, 400, f"{field} is read-only")


def test_null_optional_fields_mean_absent() -> None:
    client, fake = make_client()
    body = {"operation": "HASH", "objectId": None, "serviceStates": None, "args": None}
    result = client.simulate_post(TASKS, json=body)
    assert result.status_code == 201 and "objectId" not in result.json
    assert fake.created == [body]


def test_exactly_128_characters_are_fine() -> None:
    client, _ = make_client()
    result = client.simulate_post(TASKS, json={"operation": "HASH", "objectId": "o" * 128})
    assert result.status_code == 201


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b'{"operation": "SLEEP",}', "not valid JSON"),
        (b'{"operation": "HASH", "args": {"n": NaN}}', "NaN"),
        (b'{"operation": "HASH", "args": {"n": -Infinity}}', "Infinity"),
        (b'{"operation": "HASH", "args": {"n": 1' + b"0" * 5000 + b"}}", "not valid JSON"),
        (b"\xff\xfe{}", "UTF-8"),
        ('{"operation": "HASH"}'.encode("utf-16"), "UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested"),
    ],
)
def test_bodies_that_are_not_json_are_400(body: bytes, fragment: str) -> None:
    client, _ = make_client()
    result = post_raw(client, body)
    assert_error(result.status_code, result.json, 400, fragment)


def test_nesting_is_bounded_per_field() -> None:
    client, _ = make_client()
    deep: Any = 1
    for _ in range(MAX_DEPTH - 1):
        deep = {"d": deep}
    assert client.simulate_post(TASKS, json={"operation": "HASH", "args": deep}).status_code == 201
    result = client.simulate_post(TASKS, json={"operation": "HASH", "args": {"d": deep}})
    assert_error(result.status_code, result.json, 400, "args is nested")
    result = client.simulate_post(TASKS, json={"operation": "HASH", "serviceStates": {"d": [deep]}})
    assert_error(result.status_code, result.json, 400, "serviceStates is nested")


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1",
     "multipart/form-data; boundary=x", "application/jsonx"],
)
def test_wrong_content_type_is_415(content_type: str | None) -> None:
    client, _ = make_client()
    headers = {"Content-Type": content_type} if content_type else {}
    result = client.simulate_post(TASKS, body=b'{"operation": "HASH"}', headers=headers)
    assert_error(result.status_code, result.json, 415, "Content-Type" if content_type is None
                 or "charset" not in content_type else "UTF-8")


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON",
                                          "application/json; charset=UTF-8",
                                          "application/merge-patch+json"])
def test_json_content_types_are_accepted(content_type: str) -> None:
    client, _ = make_client()
    result = client.simulate_post(TASKS, body=b'{"operation": "HASH"}',
                                  headers={"Content-Type": content_type})
    assert result.status_code == 201


def test_body_over_1_mib_is_413_from_content_length_without_reading() -> None:
    class Unreadable:
        def read(self, size: int = -1) -> bytes:
            raise AssertionError("the body was read")

    client, _ = make_client()
    env = testing.create_environ(TASKS, method="POST", headers={
        **JSON_HEADERS, "Content-Length": str(MAX_BODY_BYTES + 1)})
    env["wsgi.input"] = Unreadable()
    answer = _call(client.app, env)
    assert answer[0].startswith("413")
    assert_error(413, json.loads(answer[1]), 413, str(MAX_BODY_BYTES))


def test_body_of_exactly_1_mib_is_read() -> None:
    client, _ = make_client()
    padding = MAX_BODY_BYTES - len(b'{"operation": "HASH", "args": {"p": ""}}')
    body = b'{"operation": "HASH", "args": {"p": "' + b"x" * padding + b'"}}'
    assert len(body) == MAX_BODY_BYTES
    assert post_raw(client, body).status_code == 201
    result = post_raw(client, body + b" ")
    assert_error(result.status_code, result.json, 413)


def test_chunked_body_reads_at_most_limit_plus_one() -> None:
    class Endless:
        def __init__(self) -> None:
            self.given = 0

        def read(self, size: int = -1) -> bytes:
            assert size > 0
            self.given += size
            return b" " * size

    client, _ = make_client()
    env = testing.create_environ(TASKS, method="POST", headers=JSON_HEADERS)
    env.pop("CONTENT_LENGTH", None)
    env["wsgi.input_terminated"] = True
    stream = Endless()
    env["wsgi.input"] = stream
    status, body = _call(client.app, env)
    assert status.startswith("413"), body
    assert stream.given == MAX_BODY_BYTES + 1


@pytest.mark.parametrize("length", ["-5", "ten"])
def test_bad_content_length_is_400(length: str) -> None:
    client, _ = make_client()
    env = testing.create_environ(TASKS, method="POST", body=b"{}", headers=JSON_HEADERS)
    env["CONTENT_LENGTH"] = length
    status, body = _call(client.app, env)
    assert status.startswith("400")
    assert set(json.loads(body)) == {"code", "message"}


def test_pure_checks() -> None:
    assert check_create({"operation": "A", "args": {}}) == {"operation": "A", "args": {}}
    assert decode_json(b'{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}


# -- properties ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(["operation", "objectId", "serviceStates", "args", "meta",
                               "state", "result", "progress"]) | st.text(max_size=12)
bodies = json_values | st.dictionaries(field_names, json_values, max_size=5)
bodies |= st.fixed_dictionaries(
    {"operation": st.sampled_from(["SLEEP", "HASH", "NOPE", ""]) | json_values},
    optional={"objectId": st.text(max_size=140) | json_values,
              "serviceStates": json_values, "args": json_values
              | st.fixed_dictionaries({"seconds": json_values})},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies)
def test_random_json_bodies_never_give_5xx(body: Any) -> None:
    client, _ = make_client()
    result = post_raw(client, json.dumps(body).encode())
    assert result.status_code in (201, 400, 409), result.text
    if result.status_code == 201:
        assert result.json["operation"] == body["operation"]
    else:
        assert set(result.json) == {"code", "message"}


formats = st.sampled_from([
    {"separators": (",", ":")}, {}, {"indent": 2}, {"ensure_ascii": False},
    {"separators": (" ,  ", " :\t")},
])


def parsed(text: str) -> Any:
    """What parse_create makes of ``text``: the create dict, or the error's status and message."""
    req = testing.create_req(method="POST", path=TASKS, body=text.encode(), headers=JSON_HEADERS)
    try:
        return parse_create(req)
    except ApiError as exc:
        return (exc.status_code, exc.message)


@settings(max_examples=300, deadline=None)
@given(body=bodies, style=formats)
def test_parsing_once_with_spans_is_json_loads(body: Any, style: dict[str, Any]) -> None:
    """The body is parsed once, keeping the text of args and serviceStates: the result is
    exactly what json.loads and check_create give, and the kept text is strict JSON of the
    same value, on one line (it is spliced into SSE data lines)."""
    text = json.dumps(body, **style)
    got = parsed(text)
    try:
        expected: Any = check_create(decode_json(text))
    except ApiError as exc:
        expected = (exc.status_code, exc.message)
    assert got == expected
    if isinstance(got, ParsedCreate):
        for name, part in got.json_text.items():
            assert b"\n" not in part and b"\r" not in part
            assert json.loads(part) == got[name]
        if style.get("indent") is None:  # one-line bodies: every object field's text is kept
            assert set(got.json_text) == {n for n in ("serviceStates", "args")
                                          if isinstance(got.get(n), dict)}


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_bytes_never_give_5xx(raw: bytes) -> None:
    client, _ = make_client()
    result = post_raw(client, raw)
    assert result.status_code in (201, 400, 409), result.text


@settings(max_examples=200, deadline=None)
@given(body=st.dictionaries(field_names, json_values, min_size=1, max_size=4))
def test_every_400_names_a_field(body: dict[str, Any]) -> None:
    client, _ = make_client()
    result = client.simulate_post(TASKS, json=body)
    if result.status_code == 400:
        message = result.json["message"]
        assert any(name in message for name in ("operation", "objectId", "serviceStates",
                                                "args", "unknown field", "read-only")), message


def _call(app: Any, env: dict[str, Any]) -> tuple[str, bytes]:
    """Call the WSGI app with a prepared environ; return the status and the body."""
    seen: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        seen.append(status)

    body = b"".join(app(env, start_response))
    return seen[0], body


@pytest.mark.parametrize("body", [
    b'{"operation": "SLEEP", "args": {"x": 1e400}}',
    b'{"operation": "SLEEP", "args": {"x":\n-1e400}}',
    b'{"operation": "SLEEP", "serviceStates": {"x": 1E999}}',
])
def test_numbers_beyond_a_float_are_refused(body: bytes) -> None:
    """1e400 parses to infinity, which is no JSON: 400 on one line or several."""
    client, fake = make_client()
    result = post_raw(client, body)
    assert_error(result.status_code, result.json, 400, "out of range")
    assert fake.created == []
