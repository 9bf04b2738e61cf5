"""The OpenAPI 3.1 document of the REST API, served at ``/api/v1/openapi.json``.

The document depends on one fact of the app: whether access control is on.
With it, protected operations declare the bearer scheme and their 401/403
answers; without it, they declare neither, because neither can happen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rest.errors import JSON_TYPE, encode_json
from rest.listing import DEFAULT_LIMIT, MAX_LIMIT
from rest.log_stream import DEFAULT_PAGE, MAX_AFTER, MAX_PAGE
from rest.resources import API_PREFIX
from rest.validation import MAX_BODY_BYTES, MAX_DEPTH, MAX_NAME_LENGTH
from supervisor.idempotency import KEY_PATTERN
from supervisor.outcome import OutcomeKind

if TYPE_CHECKING:
    import falcon

Schema = dict[str, Any]

_STATES = ["NEW", "ACTIVE", "WAITING", "CANCELED", "FAILED", "SUCCEEDED"]

_ERRORS: dict[str, str] = {
    "400": "The request is malformed; the message names the field or the problem.",
    "401": "Credentials are missing or not valid.",
    "403": "The caller may not do this to tasks of this operation.",
    "404": "No such task (unknown, purged, or for cancel: already finished), or one the "
           "caller may not view (the same answer, so that ids cannot be probed).",
    "409": "No animator is registered for the operation.",
    "422": "The Idempotency-Key was used before with another request body (within 24 h).",
    "413": f"The request body is larger than {MAX_BODY_BYTES} bytes.",
    "415": "The request body is not declared as UTF-8 JSON (Content-Type).",
    "429": "The queue of waiting tasks is full; retry after the given delay.",
    "503": "The server is shutting down, too many event streams are open, or the "
           "backend cannot take tasks now (say, its Dask scheduler is unreachable).",
    "500": "An unexpected error; details are in the server log only.",
}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema) -> Schema:
    return {JSON_TYPE: {"schema": schema}}


def _error(code: str) -> Schema:
    return {"$ref": f"#/components/responses/Error{code}"}


_STRING_128: Schema = {"type": "string", "maxLength": MAX_NAME_LENGTH}
_COUNT: Schema = {"type": "integer", "minimum": 0}
_TIME: Schema = {"type": "string", "format": "date-time"}
_OPERATION_FILTER: Schema = {
    "name": "operation",
    "in": "query",
    "required": False,
    "description": "Only tasks of this operation; absent or empty means all.",
    "schema": {"type": "string"},
}
_ID_PATTERN = f"^[A-Za-z0-9_-]{{1,{MAX_NAME_LENGTH}}}$"
_LIST_PARAMETERS: list[Schema] = [
    _OPERATION_FILTER,
    {"name": "state", "in": "query", "required": False, "style": "form", "explode": True,
     "description": "Only tasks in this state; repeat it for any of several states "
                    "(state=NEW&state=ACTIVE).",
     "schema": {"type": "array", "items": {"$ref": "#/components/schemas/TaskState"}}},
    {"name": "objectId", "in": "query", "required": False,
     "description": "Only tasks with this objectId.",
     "schema": {"type": "string", "maxLength": MAX_NAME_LENGTH}},
    {"name": "after", "in": "query", "required": False,
     "description": "Only tasks created after the task with this id (the last one of the "
                    "previous page; the Link header carries it). 400 if no such task is "
                    "known.",
     "schema": {"type": "string", "pattern": _ID_PATTERN}},
    {"name": "limit", "in": "query", "required": False,
     "description": "At most this many tasks in the page.",
     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                "default": DEFAULT_LIMIT}},
    {"name": "history", "in": "query", "required": False,
     "description": "true: with a journal, also the recorded tasks no longer in the "
                    "in-memory table (purged, or from before a restart).",
     "schema": {"type": "boolean", "default": False}},
]
_LIST_HEADERS: Schema = {
    "Link": {"required": False,
             "description": 'The next page: <URL with after=the last task of this page>; '
                            'rel="next". Absent on the last page, also when it is exactly '
                            "full.",
             "schema": {"type": "string"}},
    "X-Total-Count": {"required": False,
                      "description": "On a first page (no after), without objectId and "
                                     "history: how many tasks in the table match the "
                                     "filters and the caller may view.",
                      "schema": {"type": "integer", "minimum": 0}},
}
_IDEMPOTENCY_KEY: Schema = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "Makes a retried create safe: the same key with the same body within "
                   "24 h answers 200 with the task the first request made (and "
                   "Idempotent-Replayed: true), creating nothing; with another body, 422.",
    "schema": {"type": "string", "pattern": f"^{KEY_PATTERN.pattern}$"},
}
_TASK_ID: Schema = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "The task's meta.id.",
    "schema": {"type": "string", "pattern": f"^[A-Za-z0-9_-]{{1,{MAX_NAME_LENGTH}}}$"},
}

_LOG_PARAMETERS: list[Schema] = [
    {"name": "after", "in": "query", "required": False,
     "description": "Only lines with a larger seq (seq counts from 1); the `next` of the "
                    "previous answer. With follow, the Last-Event-ID header stands for it "
                    "when it is absent.",
     "schema": {"type": "integer", "minimum": 0, "maximum": MAX_AFTER, "default": 0}},
    {"name": "limit", "in": "query", "required": False,
     "description": "At most this many lines in the page (a followed log has no "
                    "pages: with follow it is checked, then not used).",
     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE}},
    {"name": "follow", "in": "query", "required": False,
     "description": "true: answer a text/event-stream that follows the log to its end.",
     "schema": {"type": "boolean", "default": False}},
    {"name": "Last-Event-ID", "in": "header", "required": False,
     "description": "With follow and no `after`: the seq of the last line received (what an "
                    "EventSource sends when it reconnects).",
     "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}},
]

_SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "required": ["code", "message"],
        "additionalProperties": False,
        "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
    },
    "TaskState": {"type": "string", "enum": _STATES},
    "TaskMeta": {
        "type": "object",
        "required": ["id", "objType", "version", "timeCreated", "timeModified"],
        "properties": {
            "id": {"type": "string", "pattern": f"^[A-Za-z0-9_-]{{1,{MAX_NAME_LENGTH}}}$"},
            "objType": {"const": "Task"},
            "version": {"type": "integer", "minimum": 1},
            "timeCreated": _TIME,
            "timeModified": _TIME,
        },
    },
    "Progress": {
        "type": "object",
        "properties": {
            "percentComplete": {"type": "integer", "minimum": 0, "maximum": 100},
            "totalBytes": _COUNT,
            "offsetBytes": _COUNT,
            "transferredBytes": _COUNT,
            "timestamp": _TIME,
        },
    },
    "Outcome": {
        "description": "How a terminal task ended, as data (present once it is terminal). "
                       "kind: returned (SUCCEEDED); canceled-queued, canceled-honoured, "
                       "canceled-killed (after the cancel grace), canceled-terminate (the "
                       "supervisor stopped) (CANCELED); exception (errorType names it), "
                       "failed-by-animator, crash (exited or killed by a signal without a "
                       "report), timeout, memory, cpu, result (not JSON or too large), "
                       "protocol, lost (its starter, worker or supervisor went away) (FAILED). "
                       "exitCode and signal are the task process's exit status as its reaper "
                       "saw it (one of them, or neither when none is known).",
        "type": "object",
        "required": ["kind", "message", "exitCode", "signal", "errorType"],
        "properties": {
            "kind": {"type": "string", "enum": [kind.value for kind in OutcomeKind]},
            "message": {"type": "string"},
            "exitCode": {"type": ["integer", "null"]},
            "signal": {"type": ["string", "null"], "examples": ["SIGSEGV"]},
            "errorType": {"type": ["string", "null"], "examples": ["ValueError"]},
        },
    },
    "Usage": {
        "description": "What a task that ran cost: the kernel's accounting (wait4) of its "
                       "task process and every descendant reaped for it; wall time from "
                       "the hand-over to its exit. Present once a task that ran is terminal.",
        "type": "object",
        "required": ["cpuUserSeconds", "cpuSystemSeconds", "maxRssBytes", "wallSeconds"],
        "properties": {
            "cpuUserSeconds": {"type": "number", "minimum": 0},
            "cpuSystemSeconds": {"type": "number", "minimum": 0},
            "maxRssBytes": {"type": "integer", "minimum": 0},
            "wallSeconds": {"type": "number", "minimum": 0},
        },
    },
    "Task": {
        "type": "object",
        "required": ["meta", "operation", "serviceStates", "args", "state",
                     "cancelRequested", "messages", "result"],
        "properties": {
            "meta": _ref("TaskMeta"),
            "operation": {"type": "string"},
            "objectId": _STRING_128,
            "serviceStates": {"type": "object"},
            "args": {"type": "object"},
            "state": _ref("TaskState"),
            "cancelRequested": {"type": "boolean"},
            "progress": _ref("Progress"),
            "messages": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["time", "message"],
                    "properties": {"time": _TIME, "message": {"type": "string"}},
                },
            },
            "result": {"description": "What execute() returned (any JSON); null until then."},
            "outcome": _ref("Outcome"),
            "usage": _ref("Usage"),
        },
    },
    "PurgedTask": {
        "description": "Answered instead of the task when it already ended and was purged "
                       "(only with a purge delay of 0); the request itself succeeded.",
        "type": "object",
        "required": ["meta", "operation", "purged"],
        "properties": {
            "meta": {"type": "object", "required": ["id"],
                     "properties": {"id": {"type": "string"}, "objType": {"const": "Task"}}},
            "operation": {"type": "string"},
            "purged": {"const": True},
        },
    },
    "CancelAcknowledged": {
        "description": "Answered to a caller that may cancel the task's operation but not "
                       "view it: only the id and the fact that the cancel was asked for.",
        "type": "object",
        "required": ["meta", "cancelRequested"],
        "properties": {
            "meta": {"type": "object", "required": ["id"],
                     "properties": {"id": {"type": "string"}}},
            "cancelRequested": {"const": True},
        },
    },
    "TaskCreate": {
        "type": "object",
        "required": ["operation"],
        "additionalProperties": False,
        "description": "Read-only task fields (meta, state, ...) and unknown fields are "
                       "rejected with 400; null means the same as an absent field. "
                       f"Objects may nest at most {MAX_DEPTH} levels.",
        "properties": {
            "operation": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_LENGTH},
            "objectId": {"type": ["string", "null"], "maxLength": MAX_NAME_LENGTH},
            "serviceStates": {"type": ["object", "null"],
                              "description": "Opaque to the supervisor."},
            "args": {"type": ["object", "null"],
                     "description": "Checked by the operation's animator."},
        },
    },
    "TaskEvent": {
        "description": "The data of one SSE event (event: POST, PATCH or DELETE).",
        "type": "object",
        "required": ["method", "uri", "scope", "task"],
        "properties": {
            "method": {"enum": ["POST", "PATCH", "DELETE"]},
            "uri": {"type": "string"},
            "scope": {"type": "object"},
            "task": _ref("Task"),
        },
    },
    "DroppedEvent": {
        "description": "The data of the last SSE event (event: DROPPED) of a stream that fell "
                       "too far behind: reconnect and re-read the tasks.",
        "type": "object",
        "required": ["method", "task", "message"],
        "properties": {
            "method": {"const": "DROPPED"},
            "task": {"type": "null"},
            "message": {"type": "string"},
        },
    },
    "LogLine": {
        "description": "One line a task's processes wrote (split at a newline and at 16 KiB; "
                       "bytes that are not UTF-8 replaced by U+FFFD). Also the data of each "
                       "`event: line` of a followed log, whose `id:` is the seq.",
        "type": "object",
        "required": ["seq", "time", "stream", "text"],
        "additionalProperties": False,
        "properties": {
            "seq": {"type": "integer", "minimum": 1},
            "time": _TIME,
            "stream": {"enum": ["stdout", "stderr"]},
            "text": {"type": "string"},
        },
    },
    "TaskLog": {
        "description": "A page of a task's log: its newest output is kept within the "
                       "server's log limit, older lines are dropped and counted.",
        "type": "object",
        "required": ["lines", "next", "dropped", "complete"],
        "additionalProperties": False,
        "properties": {
            "lines": {"type": "array", "items": _ref("LogLine")},
            "next": {"type": "integer", "minimum": 0,
                     "description": "The `after` of the next page (the request's `after` "
                                    "when there is nothing new)."},
            "dropped": {**_COUNT, "description": "Lines discarded so far."},
            "complete": {"type": "boolean",
                         "description": "The task is terminal, its output ended, and this "
                                        "page reaches the end of the log."},
        },
    },
    "LogEnd": {
        "description": "The data of the last event (event: end) of a followed log: the log "
                       "is complete, or the task was purged.",
        "type": "object",
        "required": ["next", "dropped"],
        "additionalProperties": False,
        "properties": {"next": _COUNT, "dropped": _COUNT},
    },
    "Sandbox": {
        "type": "object",
        "description": "How the kernel confines the operation's task processes, as in effect.",
        "required": ["privatePids", "privateNetwork", "user", "maxProcesses",
                     "maxCpuSeconds", "maxOpenFiles"],
        "properties": {
            "privatePids": {"type": "boolean"},
            "privateNetwork": {"type": "boolean"},
            "user": {"type": ["string", "integer", "null"],
                     "description": "A user name, a uid, \"dynamic\", or null (the server's)."},
            "maxProcesses": {"type": ["integer", "null"]},
            "maxCpuSeconds": {"type": ["number", "null"]},
            "maxOpenFiles": {"type": ["integer", "null"]},
        },
        "additionalProperties": False,
    },
    "Operation": {
        "type": "object",
        "required": ["operation", "timeout", "maxMemory", "sandbox"],
        "properties": {
            "operation": {"type": "string"},
            "timeout": {"type": ["number", "null"], "description": "Wall-clock seconds."},
            "maxMemory": {"type": ["integer", "null"], "description": "Bytes of address space."},
            "sandbox": {"$ref": "#/components/schemas/Sandbox"},
        },
        "additionalProperties": False,
    },
    "Health": {
        "type": "object",
        "required": ["status", "operations", "containment", "eventStreams"],
        "properties": {
            "status": {"const": "ok"},
            "operations": {"type": "array", "items": {"type": "string"}},
            "containment": {"enum": ["pid-namespace", "subreaper"],
                            "description": "How task trees are held by default."},
            "eventStreams": {"type": "integer", "minimum": 0,
                             "description": "Event streams open now."},
            "journal": {"type": "string",
                        "description": "With a journal only: \"ok\", or what is wrong "
                                       "with it (the last write's error, or changes "
                                       "dropped). The server serves either way."},
        },
        "additionalProperties": {"type": "integer", "minimum": 0,
                                 "description": "The number of tasks in a state (in the "
                                                "in-memory table)."},
    },
}


def _responses() -> dict[str, Schema]:
    responses: dict[str, Schema] = {}
    retry_after = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                   "schema": {"type": "integer"}}}
    for code, text in _ERRORS.items():
        response: Schema = {"description": text, "content": _json(_ref("Error"))}
        if code == "401":
            response["headers"] = {"WWW-Authenticate": {
                "description": 'Bearer realm="housekeeping", with error="invalid_token" '
                               "when a token was given but is not valid.",
                "schema": {"type": "string"}}}
        elif code == "429":
            response["headers"] = retry_after
        elif code == "503":
            response["headers"] = {"Retry-After": {**retry_after["Retry-After"],
                                                   "description": "Sent when the event stream "
                                                   "limit is reached or the backend is "
                                                   "unavailable."}}
        responses[f"Error{code}"] = response
    return responses


def build_document(*, auth: bool) -> dict[str, Any]:
    """Build the document.

    Args:
        auth: whether the app authenticates requests (access control on).

    Returns:
        The OpenAPI 3.1 document as a JSON-ready dict.
    """

    def operation(op_id: str, summary: str, ok: dict[str, Schema], errors: list[str],
                  *, protected: bool = True, **extra: Any) -> Schema:
        codes = [c for c in errors if (auth and protected) or c not in ("401", "403")]
        result: Schema = {"operationId": op_id, "summary": summary, **extra,
                          "responses": {**ok, **{c: _error(c) for c in [*codes, "500"]}}}
        if auth and not protected:
            result["security"] = []
        return result

    task_or_stub = {"anyOf": [_ref("Task"), _ref("PurgedTask")]}
    events = (
        "One SSE event per change to a task the caller may view, in order: `event:` is "
        "POST, PATCH or DELETE and `data:` a TaskEvent. Comments (`: keep-alive`) are "
        "sent when idle. A client that fell too far behind receives `event: DROPPED` "
        "(data: DroppedEvent) and the stream ends."
    )
    log_stream = (
        "Without follow: a TaskLog. With follow=true: a text/event-stream that sends "
        "every kept line after `after`, then each new line, as `id: <seq>`, `event: line`, "
        "`data:` a LogLine; then `event: end` (data: LogEnd) once the log is complete or "
        "the task was purged, and the stream closes. Comments (`: keep-alive`) are sent "
        "when idle; a stream closed without `end` (server shutdown) can be resumed with "
        "Last-Event-ID. It counts against the same limit as the task-event streams."
    )
    paths: dict[str, Schema] = {
        f"{API_PREFIX}/tasks": {
            "get": operation(
                "listTasks", "List a page of the tasks the caller may view, in creation "
                             "order.",
                {"200": {"description": "The page's tasks.",
                         "headers": _LIST_HEADERS,
                         "content": _json({"type": "array", "items": _ref("Task")})}},
                ["400", "401"], parameters=_LIST_PARAMETERS),
            "post": operation(
                "createTask", "Create a task.",
                {"201": {"description": "The task, queued (NEW) or already running.",
                         "headers": {"Location": {"description": "The task's URL path.",
                                                  "schema": {"type": "string"}}},
                         "content": _json(task_or_stub)},
                 "200": {"description": "A repeat of an earlier create with the same "
                                        "Idempotency-Key and body: the task it made, as "
                                        "it is now.",
                         "headers": {
                             "Location": {"description": "The task's URL path.",
                                          "schema": {"type": "string"}},
                             "Idempotent-Replayed": {"description": "true",
                                                     "schema": {"const": "true"}}},
                         "content": _json(task_or_stub)}},
                ["400", "401", "403", "409", "413", "415", "422", "429", "503"],
                parameters=[_IDEMPOTENCY_KEY],
                requestBody={"required": True, "content": _json(_ref("TaskCreate"))}),
        },
        f"{API_PREFIX}/tasks/{{id}}": {
            "get": operation(
                "getTask", "Fetch one task.",
                {"200": {"description": "The task.", "content": _json(_ref("Task"))}},
                ["401", "403", "404"], parameters=[_TASK_ID]),
        },
        f"{API_PREFIX}/tasks/{{id}}/cancel": {
            "post": operation(
                "cancelTask", "Ask a task to stop; canceling a canceling task is a no-op.",
                {"200": {"description": "The task, with cancelRequested true (to a caller "
                                        "that may not view it: only its id and "
                                        "cancelRequested).",
                         "content": _json({"anyOf": [_ref("Task"), _ref("PurgedTask"),
                                                     _ref("CancelAcknowledged")]})}},
                ["401", "403", "404", "503"], parameters=[_TASK_ID]),
        },
        f"{API_PREFIX}/tasks/{{id}}/log": {
            "get": operation(
                "getTaskLog",
                "Read a task's captured output (stdout, stderr, logging), a page at a time, "
                "or follow it live.",
                {"200": {"description": log_stream,
                         "content": {**_json(_ref("TaskLog")),
                                     "text/event-stream": {"schema": {"type": "string"}}}}},
                ["400", "401", "403", "404", "503"],
                parameters=[_TASK_ID, *_LOG_PARAMETERS]),
        },
        f"{API_PREFIX}/task-events": {
            "get": operation(
                "streamTaskEvents", "Stream changes to tasks as Server-Sent Events.",
                {"200": {"description": events,
                         "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
                ["401", "503"], parameters=[_OPERATION_FILTER]),
        },
        f"{API_PREFIX}/operations": {
            "get": operation(
                "listOperations",
                "List the registered operations the caller may create tasks of (sorted by "
                "name), with their limits and sandbox as in effect.",
                {"200": {"description": "The operations.",
                         "content": _json({"type": "array", "items": {
                             "$ref": "#/components/schemas/Operation"}})}},
                ["401"]),
        },
        f"{API_PREFIX}/openapi.json": {
            "get": operation(
                "getOpenApi", "This document.",
                {"200": {"description": "The OpenAPI document.",
                         "content": _json({"type": "object"})}},
                [], protected=False),
        },
        "/healthz": {
            "get": operation(
                "getHealth",
                "Liveness, registered operations, task counts by state, open event streams.",
                {"200": {"description": "The server is up.", "content": _json(_ref("Health"))}},
                [], protected=False),
        },
    }
    components: dict[str, Any] = {"schemas": _SCHEMAS, "responses": _responses()}
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "housekeeping",
            "version": "1",
            "description": "In-memory tasks, each run in a child process of its own. "
                           'Every error is {"code": <status>, "message": <text>}.',
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": components,
    }
    if auth:
        components["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "A token listed (as its SHA-256 digest) in the server's token file."}}
        document["security"] = [{"bearer": []}]
    return document


class OpenApiDocument:
    """``/api/v1/openapi.json``: the document, encoded once (GET, no authentication)."""

    def __init__(self, *, auth: bool) -> None:
        self._body = encode_json(build_document(auth=auth))

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Return the OpenAPI document."""
        resp.content_type = JSON_TYPE
        resp.data = self._body
