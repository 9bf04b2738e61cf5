"""REST resources over a FakeManager: every status code of the spec table, and the error form."""

from __future__ import annotations

import logging
from typing import Any

import falcon
import pytest
from fakes import FakeManager
from falcon import testing
from rest_support import assert_error, make_client

from rest import AlreadyRegistered, create_app, handlers_of, register_handlers
from rest.app import install_error_handling
from supervisor import BackendUnavailable

TASKS = "/api/v1/tasks"


def post_task(client: testing.TestClient, body: Any, **kwargs: Any) -> testing.Result:
    return client.simulate_post(TASKS, json=body, **kwargs)


# -- POST /api/v1/tasks ------------------------------------------------------------------


def test_create_answers_201_with_the_task_and_its_location() -> None:
    client, fake = make_client()
    result = post_task(client, {"operation": "SLEEP", "objectId": "vol-1",
                                "serviceStates": {"a": "b"}, "args": {"seconds": 2}})
    assert result.status_code == 201
    task = result.json
    assert task["state"] == "NEW" and task["operation"] == "SLEEP"
    assert task["objectId"] == "vol-1" and task["args"] == {"seconds": 2}
    assert result.headers["Location"] == f"{TASKS}/{task['meta']['id']}"
    assert result.headers["Content-Type"] == "application/json"
    assert fake.created == [{"operation": "SLEEP", "objectId": "vol-1",
                             "serviceStates": {"a": "b"}, "args": {"seconds": 2}}]


def test_create_passes_only_the_posted_fields() -> None:
    client, fake = make_client()
    assert post_task(client, {"operation": "HASH"}).status_code == 201
    assert fake.created == [{"operation": "HASH"}]


def test_unsupported_operation_is_409() -> None:
    client, _ = make_client()
    result = post_task(client, {"operation": "NOPE"})
    assert_error(result.status_code, result.json, 409, "NOPE")


def test_animator_validate_message_comes_back_in_400() -> None:
    client, fake = make_client()
    result = post_task(client, {"operation": "SLEEP", "args": {"seconds": "soon"}})
    assert_error(result.status_code, result.json, 400, "args.seconds must be an integer")
    assert fake.created == []


@pytest.mark.parametrize("exc", [ValueError("seconds out of range"), KeyError("seconds")])
def test_any_exception_from_validate_is_400(exc: Exception) -> None:
    def validate(create: dict[str, Any]) -> None:
        raise exc

    client, _ = make_client(FakeManager({"OP": validate}))
    result = post_task(client, {"operation": "OP"})
    assert_error(result.status_code, result.json, 400, "seconds")


def test_queue_full_is_429_with_retry_after() -> None:
    client, fake = make_client()
    fake.queue_full = True
    result = post_task(client, {"operation": "HASH"})
    assert_error(result.status_code, result.json, 429, "queue full")
    assert int(result.headers["Retry-After"]) >= 1


def test_terminating_manager_is_503() -> None:
    client, fake = make_client()
    fake.terminated = True
    result = post_task(client, {"operation": "HASH"})
    assert_error(result.status_code, result.json, 503)


def test_unavailable_backend_is_503_with_retry_after() -> None:
    client, fake = make_client()
    fake.broken["run_task"] = BackendUnavailable("the Dask scheduler at tcp://x:1 is unreachable")
    result = post_task(client, {"operation": "HASH"})
    assert_error(result.status_code, result.json, 503, "unreachable")
    assert int(result.headers["Retry-After"]) >= 1


def test_task_purged_before_the_answer_is_still_201() -> None:
    client, fake = make_client()
    fake.purge_at_once = True
    result = post_task(client, {"operation": "HASH"})
    assert result.status_code == 201
    assert result.json == {"meta": {"id": "HASH000001", "objType": "Task"},
                           "operation": "HASH", "purged": True}
    assert result.headers["Location"] == f"{TASKS}/HASH000001"


# -- GET /api/v1/tasks -------------------------------------------------------------------


def test_list_in_creation_order_and_filtered_by_operation() -> None:
    client, fake = make_client()
    ids = [fake.run_task({"operation": op}) for op in ("HASH", "SLEEP", "HASH")]
    everything = client.simulate_get(TASKS)
    assert everything.status_code == 200
    assert [t["meta"]["id"] for t in everything.json] == ids
    hashes = client.simulate_get(TASKS, params={"operation": "HASH"}).json
    assert [t["meta"]["id"] for t in hashes] == [ids[0], ids[2]]
    assert [t["meta"]["id"] for t in client.simulate_get(TASKS + "?operation=").json] == ids
    assert client.simulate_get(TASKS, params={"operation": "OTHER"}).json == []


# -- GET /api/v1/tasks/{id} --------------------------------------------------------------


def test_get_one_task() -> None:
    client, fake = make_client()
    task_id = fake.run_task({"operation": "HASH"})
    fake.set_state(task_id, "ACTIVE")
    result = client.simulate_get(f"{TASKS}/{task_id}")
    assert result.status_code == 200
    assert result.json["state"] == "ACTIVE" and result.json["meta"]["version"] == 2


def test_get_unknown_task_is_404() -> None:
    client, _ = make_client()
    result = client.simulate_get(f"{TASKS}/HASH999999")
    assert_error(result.status_code, result.json, 404, "HASH999999")


# -- POST /api/v1/tasks/{id}/cancel ------------------------------------------------------


def test_cancel_running_task_is_200_with_cancel_requested() -> None:
    client, fake = make_client()
    task_id = fake.run_task({"operation": "HASH"})
    fake.set_state(task_id, "ACTIVE")
    result = client.simulate_post(f"{TASKS}/{task_id}/cancel")
    assert result.status_code == 200
    assert result.json["cancelRequested"] is True and result.json["state"] == "ACTIVE"
    again = client.simulate_post(f"{TASKS}/{task_id}/cancel")
    assert again.status_code == 200 and again.json["meta"]["version"] == result.json["meta"][
        "version"]


def test_cancel_queued_task_cancels_it_at_once() -> None:
    client, fake = make_client()
    task_id = fake.run_task({"operation": "HASH"})
    result = client.simulate_post(f"{TASKS}/{task_id}/cancel")
    assert result.status_code == 200 and result.json["state"] == "CANCELED"


def test_cancel_unknown_or_finished_task_is_404() -> None:
    client, fake = make_client()
    assert_error(*_status_body(client.simulate_post(f"{TASKS}/NOPE000001/cancel")), 404)
    task_id = fake.run_task({"operation": "HASH"})
    fake.set_state(task_id, "SUCCEEDED")
    result = client.simulate_post(f"{TASKS}/{task_id}/cancel")
    assert_error(result.status_code, result.json, 404, "already finished")


def test_cancel_of_a_task_purged_at_once_is_200() -> None:
    client, fake = make_client()
    task_id = fake.run_task({"operation": "HASH"})
    fake.purge_at_once = True
    result = client.simulate_post(f"{TASKS}/{task_id}/cancel")
    assert result.status_code == 200 and result.json["purged"] is True


# -- health, Falcon's own errors, 500 ---------------------------------------------------


def test_healthz_reports_counts_and_operations() -> None:
    client, fake = make_client()
    fake.run_task({"operation": "HASH"})
    result = client.simulate_get("/healthz")
    assert result.status_code == 200
    assert result.json["status"] == "ok" and result.json["NEW"] == 1
    assert result.json["operations"] == ["HASH", "SLEEP"]
    assert result.json["eventStreams"] == 0


def test_unknown_route_is_404_in_the_error_form() -> None:
    client, _ = make_client()
    result = client.simulate_get("/api/v1/nothing-here")
    assert_error(result.status_code, result.json, 404, "Not Found")


@pytest.mark.parametrize(("method", "path"), [("DELETE", TASKS), ("PUT", f"{TASKS}/X1"),
                                              ("GET", f"{TASKS}/X1/cancel"),
                                              ("POST", "/healthz")])
def test_wrong_method_is_405_in_the_error_form(method: str, path: str) -> None:
    client, _ = make_client()
    result = client.simulate_request(method, path)
    assert_error(result.status_code, result.json, 405)
    assert "Allow" in result.headers


def test_error_form_ignores_accept() -> None:
    client, _ = make_client()
    result = client.simulate_get(f"{TASKS}/X1", headers={"Accept": "text/html"})
    assert_error(result.status_code, result.json, 404)


def test_unexpected_error_is_500_without_traceback_and_logged_with_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, fake = make_client()
    fake.broken["list_tasks"] = RuntimeError("secret internal detail")
    with caplog.at_level(logging.ERROR, logger="housekeeping.rest"):
        result = client.simulate_get(TASKS)
    message = assert_error(result.status_code, result.json, 500)
    assert "secret" not in result.text and "Traceback" not in result.text
    assert "internal" in message
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and "secret internal detail" in caplog.text
    assert "Traceback" in caplog.text


# -- embedding ---------------------------------------------------------------------------


class HostResource:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"host": True}


def test_register_handlers_into_a_host_app() -> None:
    app = falcon.App()
    app.add_route("/mine", HostResource())
    fake = FakeManager()
    handlers = register_handlers(app, fake, None)
    assert handlers_of(app) == handlers
    client = testing.TestClient(app)
    assert client.simulate_get("/mine").json == {"host": True}
    assert client.simulate_post(TASKS, json={"operation": "HASH"}).status_code == 201
    # NOTE: without install_error_handling our own errors keep their form anyway
    result = client.simulate_get(f"{TASKS}/NOPE")
    assert_error(result.status_code, result.json, 404)
    result = client.simulate_post(TASKS, json={"operation": "NOPE"})
    assert_error(result.status_code, result.json, 409)


def test_second_manager_on_the_same_app_is_an_error() -> None:
    app = create_app(FakeManager())
    with pytest.raises(AlreadyRegistered):
        register_handlers(app, FakeManager(), None)
    host = falcon.App()
    register_handlers(host, FakeManager(), None)
    with pytest.raises(AlreadyRegistered):
        register_handlers(host, FakeManager(), None)


def test_health_path_can_be_left_to_the_host() -> None:
    from rest import RestOptions

    app = falcon.App()
    install_error_handling(app)
    register_handlers(app, FakeManager(), None, options=RestOptions(health_path=None))
    result = testing.TestClient(app).simulate_get("/healthz")
    assert_error(result.status_code, result.json, 404)


def test_handlers_of_an_app_without_them_is_none() -> None:
    assert handlers_of(falcon.App()) is None


def _status_body(result: testing.Result) -> tuple[int, Any]:
    return result.status_code, result.json
