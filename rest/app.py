"""Routes, and the one place where errors become HTTP answers.

Routes (``{id}`` is a task id)::

    GET  /api/v1/tasks              TaskCollection   list, a page (rest.listing)
    POST /api/v1/tasks              TaskCollection   create (Idempotency-Key)
    GET  /api/v1/tasks/{id}         TaskItem
    POST /api/v1/tasks/{id}/cancel  TaskCancel
    GET  /api/v1/tasks/{id}/log     TaskLogLines     JSON page, or SSE with ?follow=true
                                                     (rest.log_stream)
    GET  /api/v1/task-events        TaskEvents       SSE (rest.stream)
    GET  /api/v1/openapi.json       OpenApiDocument
    GET  /api/v1/operations         Operations       what the caller may create
    GET  /healthz                   Health           no authentication
    GET  /, /ui/, /ui/{name}        DashboardFiles   if options.dashboard (rest.dashboard)
    GET  /metrics                   MetricsEndpoint  if options.metrics (rest.metrics)

The supervisor's errors map to statuses in :data:`DOMAIN_ERRORS`; the REST
layer's own checks raise :class:`rest.errors.ApiError`. Both render as
``{"code", "message"}``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import falcon

from rest.auth import Guard
from rest.errors import ApiError, serialize_error
from rest.log_stream import TaskLogLines
from rest.openapi import OpenApiDocument
from rest.operations import Operations
from rest.resources import API_PREFIX, Health, TaskCancel, TaskCollection, TaskItem
from rest.stream import EventStreams, TaskEvents
from supervisor import (
    BackendUnavailable,
    IdempotencyConflict,
    InvalidAnimator,
    InvalidArguments,
    ManagerTerminated,
    QueueFull,
    TaskNotFound,
    UnsupportedOperation,
)

if TYPE_CHECKING:
    from rest.auth import AccessControl
    from rest.metrics import TaskMetrics
    from rest.resources import TaskManager

log = logging.getLogger("housekeeping.rest")

#: Seconds a client is asked to wait after 429 (queue full).
RETRY_AFTER_QUEUE_FULL = 1
#: Seconds a client is asked to wait after 503 because the backend (a cluster) is lost.
RETRY_AFTER_BACKEND = 5

#: Supervisor error -> (HTTP status, extra headers). Subclasses map like their base.
DOMAIN_ERRORS: dict[type[Exception], tuple[int, dict[str, str]]] = {
    InvalidArguments: (400, {}),
    InvalidAnimator: (400, {}),
    TaskNotFound: (404, {}),
    UnsupportedOperation: (409, {}),
    IdempotencyConflict: (422, {}),
    QueueFull: (429, {"Retry-After": str(RETRY_AFTER_QUEUE_FULL)}),
    ManagerTerminated: (503, {}),
    BackendUnavailable: (503, {"Retry-After": str(RETRY_AFTER_BACKEND)}),
}


class AlreadyRegistered(RuntimeError):
    """Raised when an app already has housekeeping's handlers (of this or another manager)."""


@dataclass(frozen=True)
class RestOptions:
    """Tunables of the REST layer."""

    #: Event streams open at once, task-event and followed-log streams together;
    #: each holds a server thread (waitress: keep it well below ``threads``). One
    #: more is answered 503.
    max_streams: int = 4
    #: Seconds of silence on an event stream before a keep-alive comment.
    keepalive: float = 15.0
    #: Path of the health check, or ``None`` not to route one (e.g. the host app has its own).
    health_path: str | None = "/healthz"
    # -- dashboard and metrics (issue 6) --
    #: Serve the dashboard page at ``/`` and ``/ui/`` (``housekeeping serve`` does).
    dashboard: bool = False
    #: Serve Prometheus metrics at ``/metrics`` (``housekeeping serve`` does).
    metrics: bool = False
    #: Bearer token that ``/metrics`` requires; ``None``: scrapes need no authentication.
    metrics_token: str | None = None


@dataclass(frozen=True)
class Handlers:
    """What :func:`register_handlers` set up; ``close()`` it when the server stops."""

    manager: TaskManager
    streams: EventStreams
    metrics: TaskMetrics | None = None

    def close(self) -> None:
        """End every open event stream and refuse new ones; stop the metrics."""
        self.streams.close()
        if self.metrics is not None:
            self.metrics.close()


def create_app(
    manager: TaskManager,
    access_control: AccessControl | None = None,
    *,
    options: RestOptions | None = None,
) -> falcon.App[Any, Any]:
    """Create a Falcon app that serves the REST API of ``manager``.

    Args:
        manager: the ``supervisor.Manager`` to expose.
        access_control: who may do what; ``None`` means no authentication.
        options: tunables (event streams, health path).

    Returns:
        The WSGI app; every error it answers is ``{"code", "message"}``.
    """
    app = falcon.App()
    install_error_handling(app)
    register_handlers(app, manager, access_control, options=options)
    return app


def register_handlers(
    app: falcon.App[Any, Any],
    manager: TaskManager,
    access_control: AccessControl | None = None,
    *,
    options: RestOptions | None = None,
) -> Handlers:
    """Add the REST API of ``manager`` to an existing Falcon app.

    The supervisor's errors are mapped on ``app`` (only those types). Call
    :func:`install_error_handling` too if Falcon's own errors (unknown route,
    wrong method) and unexpected ones should also answer ``{"code", "message"}``.

    Args:
        app: the host app.
        manager: the ``supervisor.Manager`` to expose.
        access_control: who may do what; ``None`` means no authentication.
        options: tunables (event streams, health path).

    Returns:
        The handlers; close them on shutdown to end open event streams.

    Raises:
        AlreadyRegistered: the app already serves a manager's tasks.
    """
    # NOTE: Falcon 4 apps take neither new attributes nor weak references, so
    # the route itself is the record of an earlier registration.
    if app._router.find(f"{API_PREFIX}/tasks") is not None:
        raise AlreadyRegistered(f"this app already serves tasks at {API_PREFIX}/tasks")
    options = options or RestOptions()
    guard = Guard(access_control)
    streams = EventStreams(
        manager, guard, max_streams=options.max_streams, keepalive=options.keepalive
    )
    app.add_route(f"{API_PREFIX}/tasks", TaskCollection(manager, guard))
    app.add_route(f"{API_PREFIX}/tasks/{{task_id}}", TaskItem(manager, guard))
    app.add_route(f"{API_PREFIX}/tasks/{{task_id}}/cancel", TaskCancel(manager, guard))
    app.add_route(f"{API_PREFIX}/tasks/{{task_id}}/log", TaskLogLines(streams, guard))
    app.add_route(f"{API_PREFIX}/task-events", TaskEvents(streams, guard))
    app.add_route(f"{API_PREFIX}/openapi.json", OpenApiDocument(auth=guard.enabled))
    if options.health_path:
        app.add_route(options.health_path, Health(manager, lambda: streams.count))
    # -- operations, dashboard and metrics (issue 6) --
    app.add_route(f"{API_PREFIX}/operations", Operations(manager, guard))
    if options.dashboard:
        from rest.dashboard import add_dashboard_routes

        add_dashboard_routes(app)
    metrics = None
    if options.metrics:
        from rest.metrics import MetricsEndpoint, TaskMetrics

        metrics = TaskMetrics(manager, open_streams=lambda: streams.count)
        app.add_route("/metrics", MetricsEndpoint(metrics, options.metrics_token))
    # -- end of issue 6 --
    app.add_error_handler(tuple(DOMAIN_ERRORS), _domain_error)
    return Handlers(manager, streams, metrics)


def handlers_of(app: falcon.App[Any, Any]) -> Handlers | None:
    """Return the handlers registered in ``app``, or ``None``."""
    found = app._router.find(f"{API_PREFIX}/task-events")
    resource = found[0] if found else None
    if isinstance(resource, TaskEvents):
        return Handlers(resource.streams.manager, resource.streams)
    return None


def install_error_handling(app: falcon.App[Any, Any]) -> None:
    """Make every error of ``app`` answer ``{"code", "message"}``.

    Unexpected exceptions answer 500 with a generic message; their traceback
    goes to the log, never to the client.
    """
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, _unexpected_error)


def _domain_error(
    req: falcon.Request, resp: falcon.Response, error: Exception, params: dict[str, Any]
) -> None:
    for kind in type(error).__mro__:
        if kind in DOMAIN_ERRORS:
            status, headers = DOMAIN_ERRORS[kind]
            raise ApiError(status, str(error) or type(error).__name__, headers=headers or None)
    raise error  # pragma: no cover - registered only for DOMAIN_ERRORS


def _unexpected_error(
    req: falcon.Request, resp: falcon.Response, error: Exception, params: dict[str, Any]
) -> None:
    log.error("%s %s failed", req.method, req.path, exc_info=error)
    raise ApiError(500, "internal server error; see the server log")
