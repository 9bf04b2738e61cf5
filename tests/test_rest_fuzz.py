"""Fuzz the REST API from its own OpenAPI document with schemathesis.

Every operation of ``/api/v1/openapi.json`` gets generated requests, valid and
invalid ones (all of schemathesis's phases but the stateful one), against

* a real ``housekeeping serve`` subprocess on loopback (demo animators on, a
  short purge delay), and
* the same Falcon app in-process (WSGI), with and without bearer tokens.

Each answer must be no 5xx, have a documented status, content type, headers
and body schema, reject what the document calls invalid with a 4xx, and give
every error as exactly ``{"code": <status>, "message": <text>}``.

The run is bounded and repeatable: a fixed seed, and
``HOUSEKEEPING_FUZZ_EXAMPLES`` examples per operation and mode (default 25;
``tox -e fuzz`` runs 500).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any, cast

import pytest
import schemathesis
from conftest import TIMEOUT
from fakes import DummyAccessControl, FakeManager
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_support import LiveServer
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.core.failures import FailureGroup, ServerError
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from rest import RestOptions, create_app
from supervisor import Manager
from workers import demo

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("HOUSEKEEPING_FUZZ_EXAMPLES", "25"))
SEED = 20261127
DOCUMENT = "/api/v1/openapi.json"
TASKS = "/api/v1/tasks"
EVENTS = "/api/v1/task-events"
#: Seconds an event stream is read before the fuzzer hangs up (it may never end).
STREAM_READ = 0.1
#: Examples per mode for the event stream: each costs STREAM_READ, and its only
#: input is one query string.
STREAM_EXAMPLES = min(EXAMPLES, 25)
#: Statuses that reject invalid input; 5xx is never one (not_a_server_error).
REJECTIONS = ["400", "401", "403", "404", "405", "409", "413", "415", "429"]


# -- checks ---------------------------------------------------------------------------


def error_form(ctx: CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every 4xx and 5xx is JSON, exactly ``{"code": <the status>, "message": <text>}``."""
    if response.status_code < 400:
        return
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.split(";")[0].strip() == "application/json", (
        f"{response.status_code} answered as {content_type!r}")
    body = json.loads(response.content)
    assert isinstance(body, dict) and set(body) == {"code", "message"}, body
    assert body["code"] == response.status_code, body
    assert isinstance(body["message"], str) and body["message"], body


def valid_input_is_accepted(
    ctx: CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """A request the document calls valid is never a 400 of the REST layer's own checks.

    The one 400 a valid body may get is the animator's verdict on ``args``
    (the document cannot know each operation's arguments), or nesting deeper
    than the documented limit (JSON Schema cannot express depth); a valid list
    request, an ``after`` that names no known task (documented: the schema
    cannot know the ids).
    """
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return
    message = str(json.loads(response.content).get("message", ""))
    assert (message.startswith(("args", "after: no task"))
            or "nested more than" in message), f"a valid request was rejected: {message!r}"


CHECKS: list[Any] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    unsupported_method,
    allow_header_conformance,
    ignored_auth,
    error_form,
    valid_input_is_accepted,
]


def fuzz_config(token: str | None = None) -> schemathesis.Config:
    """Bounded, repeatable generation: a fixed seed, EXAMPLES per operation and mode.

    With ``token``, schemathesis sends it as the bearer token (and also tries
    requests without it, which must be answered 401).
    """
    auth = {"auth": {"openapi": {"bearer": {"bearer": token}}}} if token else {}
    return schemathesis.Config.from_dict({
        **auth,
        "seed": SEED,
        "generation": {"mode": "all", "max-examples": EXAMPLES, "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        "checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}},
        # NOTE: an event stream is read until its first event or STREAM_READ seconds.
        "max-stream-events": 1,
        "operations": [{"include-path": EVENTS,
                        "generation": {"max-examples": STREAM_EXAMPLES}}],
    })


def call_kwargs(case: schemathesis.Case) -> dict[str, Any]:
    """Deadlines: a stream is read briefly (it never ends), anything else gets TIMEOUT."""
    if case.operation.path == EVENTS:
        return {"timeout": (TIMEOUT, STREAM_READ)}
    return {"timeout": TIMEOUT}


# -- a live server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    # NOTE: a stream the fuzzer hung up on keeps its slot until the server
    # notices (within a second); STREAM_READ apart, about ten are open at once.
    server = LiveServer("--purge-delay", "1", "--max-workers", "2", "--threads", "32",
                        "--max-streams", "24", "--log-level", "WARNING")
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def live_schema(live: LiveServer) -> Any:
    return schemathesis.openapi.from_url(live.api(DOCUMENT), config=fuzz_config(),
                                         timeout=TIMEOUT)


live_api = schemathesis.pytest.from_fixture("live_schema")


@live_api.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_live_server_answers_as_documented(case: schemathesis.Case, live: LiveServer) -> None:
    case.call_and_validate(base_url=live.url, checks=CHECKS, **call_kwargs(case))


def test_live_server_survived_the_fuzzing(live: LiveServer) -> None:
    # NOTE: runs after the fuzz test of the same module: the server still
    # answers, and nothing it logged says a request failed inside it.
    assert live.proc is not None and live.proc.poll() is None, live.log()
    assert live.get("/healthz").json()["status"] == "ok"
    log = live.log()
    assert "Traceback" not in log and " failed" not in log, log[-4000:]


# -- real tasks, checked against the document ---------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers() | st.text()
                | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=12,
)
creations = st.fixed_dictionaries(
    {"operation": st.just("SLEEP")},
    optional={
        "objectId": st.none() | st.text(max_size=128),
        "serviceStates": st.none() | st.dictionaries(st.text(), json_values, max_size=3),
        "args": st.fixed_dictionaries({"seconds": st.sampled_from([0, 0.01, 30])}),
    },
)


@settings(max_examples=max(5, EXAMPLES // 5), deadline=None, derandomize=True,
          database=None, suppress_health_check=list(HealthCheck))
@given(body=creations, cancel=st.booleans())
def test_real_tasks_match_the_document(live_schema: Any, live: LiveServer,
                                       body: dict[str, Any], cancel: bool) -> None:
    """Tasks the fuzzer cannot make (it does not know the operations): created, read, canceled."""
    def run(path: str, method: str, **case: Any) -> Any:
        made = live_schema[path][method].Case(**case)
        return made.call_and_validate(base_url=live.url, checks=CHECKS, timeout=TIMEOUT)

    created = run(TASKS, "POST", body=body, media_type="application/json")
    assert created.status_code == 201, created.text
    task_id = json.loads(created.content)["meta"]["id"]
    run(TASKS, "GET", query={"operation": "SLEEP"})
    fetched = run(f"{TASKS}/{{id}}", "GET", path_parameters={"id": task_id})
    assert fetched.status_code in (200, 404), fetched.text  # 404: ended and purged
    if cancel:
        canceled = run(f"{TASKS}/{{id}}/cancel", "POST", path_parameters={"id": task_id})
        assert canceled.status_code in (200, 404), canceled.text


# -- in-process --------------------------------------------------------------------------

TOKENS = {
    "ops": {"view": {"*"}, "create": {"*"}, "cancel": {"*"}},
    "viewer": {"view": {"SLEEP"}},
}


@pytest.fixture(scope="module")
def real_manager() -> Iterator[Manager]:
    """A real manager with the demo animators, in this process, for the in-process app."""
    real = Manager(purge_delay=1.0, cancel_grace=0.5, max_workers=2)
    demo.register(real)
    try:
        yield real
    finally:
        real.terminate()


@pytest.fixture(scope="module", params=["open", "ops", "viewer"])
def caller(request: pytest.FixtureRequest) -> str:
    """Who calls the in-process app: nobody in particular (no auth), or a token."""
    return str(request.param)


@pytest.fixture(scope="module")
def app_schema(caller: str, real_manager: Manager) -> Any:
    """The app in-process: no auth, or tokens with the caller ``ops`` or ``viewer``."""
    control = None if caller == "open" else DummyAccessControl(TOKENS)
    # NOTE: a short keep-alive, so that a stream without events still yields
    # often enough for the fuzzer to hang up after STREAM_READ seconds.
    app = create_app(real_manager, control, options=RestOptions(keepalive=0.05, max_streams=64))
    token = None if caller == "open" else caller
    return schemathesis.openapi.from_wsgi(DOCUMENT, app, config=fuzz_config(token))


app_api = schemathesis.pytest.from_fixture("app_schema")


@app_api.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_app_answers_as_documented(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS, **call_kwargs(case))


# -- the fuzzer itself -----------------------------------------------------------------


def test_the_checks_catch_undocumented_answers() -> None:
    """The checks fail on a 5xx and on an error in another form (a green run means something)."""
    fake = FakeManager()
    fake.broken["list_tasks"] = RuntimeError("boom")
    schema = schemathesis.openapi.from_wsgi(DOCUMENT, create_app(fake), config=fuzz_config())
    case = schema[TASKS]["GET"].Case()
    with pytest.raises(FailureGroup) as caught:
        case.call_and_validate(checks=CHECKS, timeout=TIMEOUT)
    assert [type(failure) for failure in caught.value.exceptions] == [ServerError]
    response = case.call(timeout=TIMEOUT)
    response.content = b'{"error": "boom"}'
    with pytest.raises(AssertionError):
        error_form(cast(Any, None), response, case)


class LetsAnyoneIn(DummyAccessControl):
    """An access control with a hole: no credentials at all pass as ``ops``."""

    def authenticate(self, req: Any) -> str | None:
        return super().authenticate(req) if req.get_header("Authorization") else "ops"


def test_the_checks_catch_a_hole_in_authentication() -> None:
    app = create_app(FakeManager(), LetsAnyoneIn(TOKENS))
    schema = schemathesis.openapi.from_wsgi(DOCUMENT, app, config=fuzz_config("ops"))
    case = schema[TASKS]["GET"].Case()
    with pytest.raises(FailureGroup) as caught:
        case.call_and_validate(checks=CHECKS, timeout=TIMEOUT)
    assert "without authentication" in str(caught.value)
