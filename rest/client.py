"""``housekeeping tasks ...``: a command-line client of the REST API (httpx, rich).

Commands::

    tasks list [--operation OP] [--state S ...] [--object-id X] [--history] [--limit N] [--json]
    tasks get ID [--json]
    tasks create OP [--object-id X] [--args JSON] [--wait [--logs]] [--json]
    tasks cancel ID [--json]
    tasks watch [ID ...] [--operation OP]
    tasks logs ID [--follow] [--after N] [--json]

The server and the token come from ``--url`` / ``--token`` or the
``HOUSEKEEPING_URL`` / ``HOUSEKEEPING_TOKEN`` environment variables. Following
tasks (``watch``, ``create --wait``) reads the event stream; when the stream
breaks, the client reconnects and re-reads the tasks it follows (the server
keeps no event history, so there is no ``Last-Event-ID`` to resume from), and
merges what it gets by ``meta.version``. Following a log (``logs --follow``,
``create --wait --logs``) reads the log's own stream and, when it breaks or
the server drops it for being slow, reconnects with ``after=`` the last seq
seen, so no line is shown twice or skipped. Every failure ends with one line
on stderr and one of the ``RET_*`` codes, never a traceback.

``list`` reads page after page (each page's ``Link: rel="next"`` names the
``after`` of the next; only that id is taken from it, never a URL, so that
the token goes to no other server). ``create`` sends a fresh
``Idempotency-Key`` and, when the connection breaks or the server answers
502/503/504, sends the same request again with the same key: the server
answers a repeat with the task the first one made, so a retry never runs
the work twice.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import httpx

if TYPE_CHECKING:
    from rich.console import Console

# Exit codes of `housekeeping tasks`.
RET_OK = 0  # Done; a waited-for task SUCCEEDED.
RET_TASK_FAILED = 1  # A waited-for task ended FAILED.
RET_TASK_CANCELED = 2  # A waited-for task ended CANCELED (argparse also uses 2 for bad usage).
RET_CONNECTION = 8  # The server cannot be reached, or the connection broke and did not come back.
RET_AUTH = 9  # The server refused the credentials (401) or the action (403).
RET_API = 10  # The server answered another error (404 unknown task, 400, 409, 429, ...).
RET_INTERRUPTED = 130  # Stopped with Ctrl-C.

DEFAULT_URL = "http://127.0.0.1:8080"
# NOTE: rest.resources.API_PREFIX, not imported: that would import the supervisor
# package, which `housekeeping` must be able to start without (see rest.cli).
API_PREFIX = "/api/v1"
STATES = ("NEW", "ACTIVE", "WAITING", "CANCELED", "FAILED", "SUCCEEDED")
TERMINAL = frozenset({"CANCELED", "FAILED", "SUCCEEDED"})
_OUTCOME_CODES = {"SUCCEEDED": RET_OK, "FAILED": RET_TASK_FAILED, "CANCELED": RET_TASK_CANCELED}

#: Seconds the client keeps trying to get a broken event stream back.
RECONNECT_FOR = 30.0
#: Pauses between reconnection attempts, in seconds (the last one repeats).
RECONNECT_DELAYS = (0.2, 0.5, 1.0, 2.0, 3.0)

Task = dict[str, Any]
Event = dict[str, Any]
#: What :meth:`ApiClient.events` yields once the stream is open, before any event.
OPENED: Event = {"method": "OPENED"}

#: Lines asked for per ``GET /tasks/{id}/log`` page (the server allows up to 10,000).
LOG_PAGE = 1000
#: Tasks asked for per ``GET /tasks`` page (the server allows up to 10,000).
TASK_PAGE = 1000
#: Pauses before each retry of a create, in seconds (then it gives up).
CREATE_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0)
#: Statuses after which a create is sent again (with the same Idempotency-Key).
_RETRIED_STATUSES = frozenset({502, 503, 504})
#: Seconds ``create --wait --logs`` waits, once the task ended, for the end of its log.
LOG_DRAIN = 5.0


class ClientError(Exception):
    """Raised to end a client command with a one-line message and an exit code."""

    def __init__(self, code: int, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status  #: the HTTP status the server answered, if it did


class ApiClient:
    """The REST API over httpx; every failure becomes a :class:`ClientError`."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Talk to the server at ``url`` (``transport``, ``sleep``: test shims)."""
        headers = {"Accept": "application/json", "User-Agent": "housekeeping-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request and return the JSON answer.

        Raises:
            ClientError: the server is unreachable, or answered an error.
        """
        return self._json(self._send(method, path, **kwargs))

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, API_PREFIX + path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._connection_error(exc) from None
        if response.is_error:
            raise self._http_error(response)
        return response

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise ClientError(
                RET_API, f"{self.url} answered {response.status_code} but not with JSON "
                "(is it a housekeeping server?)") from None

    def list_tasks(self, operation: str | None = None, *, states: list[str] | None = None,
                   object_id: str | None = None, history: bool = False,
                   limit: int | None = None) -> list[Task]:
        """``GET /tasks``, page after page until the last (or ``limit`` tasks)."""
        params: list[tuple[str, str]] = [("operation", operation)] if operation else []
        params += [("state", state) for state in states or []]
        if object_id is not None:
            params.append(("objectId", object_id))
        if history:
            params.append(("history", "true"))
        tasks: list[Task] = []
        after = None
        while limit is None or len(tasks) < limit:
            page = TASK_PAGE if limit is None else min(TASK_PAGE, limit - len(tasks))
            query = [*params, ("limit", str(page))] + ([("after", after)] if after else [])
            response = self._send("GET", "/tasks", params=query)
            listed = self._json(response)
            if not isinstance(listed, list):
                raise ClientError(RET_API, f"{self.url} answered a list of tasks that is "
                                           "not a list")
            tasks += listed
            after = _next_after(response)
            if after is None or not listed:
                break
        return tasks

    def get_task(self, task_id: str) -> Task:
        """``GET /tasks/{id}``."""
        return dict(self.request("GET", f"/tasks/{_quote(task_id)}"))

    def create_task(self, body: dict[str, Any], idempotency_key: str | None = None) -> Task:
        """``POST /tasks`` with an ``Idempotency-Key`` (a fresh one by default), sent
        again with the same key while the connection breaks or the server answers
        502/503/504 (see :data:`CREATE_RETRY_DELAYS`)."""
        key = idempotency_key or secrets.token_urlsafe(24)
        headers = {"Idempotency-Key": key}
        for delay in (*CREATE_RETRY_DELAYS, None):
            try:
                return dict(self.request("POST", "/tasks", json=body, headers=headers))
            except ClientError as exc:
                retry = exc.code == RET_CONNECTION or exc.status in _RETRIED_STATUSES
                if not retry or delay is None:
                    raise
            self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def cancel_task(self, task_id: str) -> Task:
        """``POST /tasks/{id}/cancel``."""
        return dict(self.request("POST", f"/tasks/{_quote(task_id)}/cancel"))

    def get_log(self, task_id: str, after: int = 0, limit: int = LOG_PAGE) -> dict[str, Any]:
        """``GET /tasks/{id}/log``: one page of the task's log."""
        return dict(self.request("GET", f"/tasks/{_quote(task_id)}/log",
                                 params={"after": after, "limit": limit}))

    def events(self, operation: str | None = None) -> Generator[Event, None, None]:
        """Yield :data:`OPENED`, then each event of ``/task-events`` until the stream ends.

        Raises:
            ClientError: the stream could not be opened, or broke (``RET_CONNECTION``).
        """
        params = {"operation": operation} if operation else {}
        yield from self._stream("/task-events", params, parse_sse)

    def log_events(self, task_id: str, after: int = 0) -> Generator[Event, None, None]:
        """Yield :data:`OPENED`, then ``{"method": "line", "line": {...}}`` per log line
        and a last ``{"method": "end", "next", "dropped"}`` when the log is complete.

        The stream may also end without ``end`` (the server dropped a slow
        reader, or is shutting down): see :class:`LogFollower`.

        Raises:
            ClientError: the stream could not be opened, or broke (``RET_CONNECTION``).
        """
        params = {"follow": "true", "after": str(after)}
        yield from self._stream(f"/tasks/{_quote(task_id)}/log", params, parse_log_sse)

    def _stream(
        self, path: str, params: dict[str, str], parse: Callable[[Iterator[str]], Iterator[Event]]
    ) -> Generator[Event, None, None]:
        # NOTE: the server sends a keep-alive comment every 15 s; a read that waits
        # much longer than that means the connection is dead.
        timeout = httpx.Timeout(self._timeout, read=max(self._timeout, 45.0))
        try:
            with self._http.stream(
                "GET", API_PREFIX + path, params=params or None, timeout=timeout,
                headers={"Accept": "text/event-stream"},
            ) as response:
                if response.is_error:
                    response.read()
                    raise self._http_error(response)
                yield OPENED
                yield from parse(response.iter_lines())
        except httpx.HTTPError as exc:
            raise self._connection_error(exc) from None

    def _connection_error(self, exc: httpx.HTTPError) -> ClientError:
        detail = str(exc) or type(exc).__name__
        return ClientError(RET_CONNECTION, f"cannot reach {self.url}: {detail}")

    def _http_error(self, response: httpx.Response) -> ClientError:
        try:
            message = str(response.json()["message"])
        except (ValueError, KeyError, TypeError):
            message = response.reason_phrase or "error"
        status = response.status_code
        if status == 401:
            return ClientError(
                RET_AUTH, f"401 unauthorized: {message} (give --token or set HOUSEKEEPING_TOKEN)",
                status)
        if status == 403:
            return ClientError(RET_AUTH, f"403 forbidden: {message}", status)
        return ClientError(RET_API, f"{status}: {message}", status)


def _next_after(response: httpx.Response) -> str | None:
    """The ``after`` of the next page, from ``Link: <...>; rel="next"``; None on the last."""
    link = response.links.get("next")
    if not link:
        return None
    values = parse_qs(urlsplit(link.get("url", "")).query).get("after")
    return values[-1] if values else None


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Turn ``text/event-stream`` lines into events (``data`` parsed as JSON)."""
    for name, event in sse_messages(lines):
        event.setdefault("method", name)
        yield event


def parse_log_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Turn a log's ``text/event-stream`` lines into ``line`` and ``end`` events."""
    for name, data in sse_messages(lines):
        if name == "line":
            yield {"method": "line", "line": data}
        elif name == "end":
            yield {**data, "method": "end"}


def sse_messages(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(event name, data)`` per SSE message whose data is a JSON object."""
    name = ""
    data: list[str] = []
    for line in lines:
        line = line.rstrip("\r\n")
        if not line:
            if data:
                try:
                    value = json.loads("\n".join(data))
                except ValueError:
                    value = None
                if isinstance(value, dict):
                    yield name, value
            name, data = "", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)


class Reconnects:
    """When a followed stream broke: wait 0.2 s to 3 s (longer each try) before the
    next connection, and give up once it stayed broken for ``reconnect_for`` s."""

    def __init__(self, reconnect_for: float, sleep: Callable[[float], None],
                 clock: Callable[[], float]) -> None:
        self.reconnect_for = reconnect_for
        self._sleep = sleep
        self._clock = clock
        self.attempt = 0  #: tries since the last progress (the back-off's step)
        self.broken_since: float | None = None

    def failed(self, exc: ClientError, connections: int) -> str:
        """Why the stream broke, if it may be opened again; else ``exc`` raised.

        Raises:
            ClientError: ``exc`` itself: not a broken connection, or the stream
                never connected (nothing to resume: said at once).
        """
        if exc.code != RET_CONNECTION or connections == 0:
            raise exc
        return str(exc)

    def wait(self, last_error: str) -> None:
        """Back off before the next try.

        Raises:
            ClientError: broken for ``reconnect_for`` seconds (``last_error`` says why).
        """
        now = self._clock()
        self.broken_since = self.broken_since if self.broken_since is not None else now
        if now - self.broken_since >= self.reconnect_for:
            raise ClientError(
                RET_CONNECTION,
                f"{last_error}; gave up reconnecting after {self.reconnect_for:g} s")
        self._sleep(RECONNECT_DELAYS[min(self.attempt, len(RECONNECT_DELAYS) - 1)])
        self.attempt += 1


class Follower:
    """A view of some tasks (or all), kept current from the event stream.

    Open the stream, then (re)read the tasks, then apply events; each copy of a
    task replaces the one held only if its ``meta.version`` is newer, so the
    order in which the list and the events arrive does not matter.
    """

    def __init__(
        self,
        api: ApiClient,
        ids: list[str] | None = None,
        *,
        operation: str | None = None,
        on_change: Callable[[Task], None] = lambda task: None,
        on_delete: Callable[[str], None] = lambda task_id: None,
        reconnect_for: float = RECONNECT_FOR,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Follow ``ids`` (``None``: every task, optionally of ``operation``).

        ``sleep`` and ``clock`` are test shims.
        """
        self.api = api
        self.ids = list(dict.fromkeys(ids)) if ids else None
        self.operation = operation
        self.tasks: dict[str, Task] = {}
        self.connections = 0
        self._on_change = on_change
        self._on_delete = on_delete
        self._reconnects = Reconnects(reconnect_for, sleep, clock)

    def done(self) -> bool:
        """Tell whether every followed id reached a terminal state (never, for "all")."""
        return self.ids is not None and all(
            self.tasks.get(task_id, {}).get("state") in TERMINAL for task_id in self.ids)

    def run(self) -> None:
        """Follow until :meth:`done` (forever for "all"), reconnecting when the stream breaks.

        Raises:
            ClientError: the first connection failed, a followed task does not
                exist, the credentials are refused, or the stream stayed broken
                for ``reconnect_for`` seconds.
        """
        reconnects = self._reconnects
        while True:
            stream = self.api.events(self.operation)
            try:
                for event in stream:
                    if event is OPENED:
                        self.connections += 1
                        reconnects.attempt, reconnects.broken_since = 0, None
                        self._reread()
                    elif event.get("method") == "DROPPED":
                        break  # NOTE: it fell behind and lost events: reconnect, re-read
                    else:
                        self._apply(event)
                    if self.done():
                        return
            except ClientError as exc:
                last_error = reconnects.failed(exc, self.connections)
            else:
                last_error = "the event stream ended"
            finally:
                stream.close()  # NOTE: closes the connection now, not when collected
            reconnects.wait(last_error)

    def _reread(self) -> None:
        if self.ids is None:
            listed = self.api.list_tasks(self.operation)
            for task in listed:
                self._merge(task)
            current = {task["meta"]["id"] for task in listed}
            for task_id in [t for t in self.tasks if t not in current]:
                self._forget(task_id)
            return
        for task_id in self.ids:
            if self.tasks.get(task_id, {}).get("state") in TERMINAL:
                continue
            try:
                self._merge(self.api.get_task(task_id))
            except ClientError as exc:
                if exc.code == RET_API and exc.args[0].startswith("404") and task_id in self.tasks:
                    raise ClientError(
                        RET_API, f"task {task_id} was purged before its outcome was seen"
                    ) from None
                if exc.code == RET_API and exc.args[0].startswith("404"):
                    raise ClientError(RET_API, f"task {task_id} not found") from None
                raise

    def _apply(self, event: Event) -> None:
        task = event.get("task")
        if not isinstance(task, dict):
            return
        task_id = str(task.get("meta", {}).get("id"))
        if self.ids is not None and task_id not in self.ids:
            return
        if event.get("method") == "DELETE":
            if self.ids is None:
                self._forget(task_id)
            return
        self._merge(task)

    def _merge(self, task: Task) -> None:
        task_id = str(task["meta"]["id"])
        known = self.tasks.get(task_id)
        if known is not None and known["meta"]["version"] >= task["meta"]["version"]:
            return
        self.tasks[task_id] = task
        self._on_change(task)

    def _forget(self, task_id: str) -> None:
        if self.tasks.pop(task_id, None) is not None:
            self._on_delete(task_id)


def outcome_code(tasks: list[Task]) -> int:
    """The exit code for finished tasks: 1 if any FAILED, else 2 if any CANCELED, else 0."""
    codes = {_OUTCOME_CODES.get(str(task.get("state")), RET_API) for task in tasks}
    for code in (RET_API, RET_TASK_FAILED, RET_TASK_CANCELED):
        if code in codes:
            return code
    return RET_OK


# -- command line ------------------------------------------------------------------------


def add_tasks_parser(commands: Any) -> None:
    """Add ``tasks`` and its subcommands to the ``housekeeping`` subparsers ``commands``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=os.environ.get("HOUSEKEEPING_URL") or DEFAULT_URL,
        help="server URL (default: $HOUSEKEEPING_URL or %(default)s)")
    common.add_argument(
        "--token", default=os.environ.get("HOUSEKEEPING_TOKEN") or None,
        help="bearer token (default: $HOUSEKEEPING_TOKEN; the variable keeps it out of ps)")
    common.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for an answer (default: %(default)s)")
    tasks = commands.add_parser(
        "tasks", help="list, create, cancel and watch tasks of a running server")
    sub = tasks.add_subparsers(dest="tasks_command", metavar="COMMAND", required=True)
    show_json = {"action": "store_true", "help": "print the API's JSON instead of a table"}

    listing = sub.add_parser("list", parents=[common],
                             help="list tasks (every page), in creation order")
    listing.add_argument("--operation", metavar="OP", help="only tasks of this operation")
    listing.add_argument("--state", choices=STATES, type=str.upper, action="append",
                         help="only tasks in S; repeat for any of several states")
    listing.add_argument("--object-id", metavar="X", help="only tasks with this objectId")
    listing.add_argument("--history", action="store_true",
                         help="with a journal on the server: also the recorded tasks no "
                              "longer in its table")
    listing.add_argument("--limit", type=_positive_arg, metavar="N",
                         help="at most N tasks (default: all)")
    listing.add_argument("--json", **show_json)

    get = sub.add_parser("get", parents=[common], help="show one task")
    get.add_argument("id")
    get.add_argument("--json", **show_json)

    create = sub.add_parser("create", parents=[common], help="create a task")
    create.add_argument("operation", metavar="OP")
    create.add_argument("--object-id", metavar="X")
    create.add_argument("--args", metavar="JSON", help='arguments object, e.g. \'{"seconds": 5}\'')
    create.add_argument("--wait", action="store_true",
                        help="follow it with a progress bar; exit 0 SUCCEEDED, 1 FAILED, "
                             "2 CANCELED")
    create.add_argument("--logs", action="store_true",
                        help="with --wait (implied): show the task's log above the bar")
    create.add_argument("--json", **show_json)

    cancel = sub.add_parser("cancel", parents=[common], help="ask a task to stop")
    cancel.add_argument("id")
    cancel.add_argument("--json", **show_json)

    watch = sub.add_parser(
        "watch", parents=[common],
        help="live progress bars of the given tasks (until they end) or of all tasks")
    watch.add_argument("ids", nargs="*", metavar="ID")
    watch.add_argument("--operation", metavar="OP", help="without IDs: only this operation")

    logs = sub.add_parser(
        "logs", parents=[common],
        help="print a task's output: TIME STREAM TEXT per line (stdout and stderr)")
    logs.add_argument("id")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="keep printing until the task's log ends; exit 0 SUCCEEDED, "
                           "1 FAILED, 2 CANCELED")
    logs.add_argument("--after", type=_seq_arg, default=0, metavar="N",
                      help="only the lines after seq N (default: %(default)s, all)")
    logs.add_argument("--json", action="store_true",
                      help="print each line as the API's JSON, one per line")


def run_tasks_command(
    args: argparse.Namespace,
    *,
    transport: httpx.BaseTransport | None = None,
    console: Console | None = None,
    err: Any = None,
) -> int:
    """Run one ``housekeeping tasks`` subcommand and return its exit code.

    Args:
        args: the parsed command line.
        transport: test shim: an httpx transport (e.g. over a WSGI app).
        console: where tables and bars go (default: stdout).
        err: where the one-line error goes (default: stderr).
    """
    from rich.console import Console

    err = err if err is not None else sys.stderr
    if console is None:
        console = Console(highlight=False)
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console.width = 200  # NOTE: piped output: do not cut the table to 80 columns
    api = ApiClient(args.url, args.token, timeout=args.timeout, transport=transport)
    try:
        return _COMMANDS[args.tasks_command](api, args, console)
    except ClientError as exc:
        print(f"housekeeping: {exc}", file=err)
        return exc.code
    except KeyboardInterrupt:
        print("housekeeping: interrupted", file=err)
        return RET_INTERRUPTED
    finally:
        api.close()


def _print_json(console: Console, value: Any) -> None:
    # NOTE: json.dumps escapes control characters, so this is safe for a terminal.
    console.file.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    console.file.flush()


def _list(api: ApiClient, args: argparse.Namespace, console: Console) -> int:
    tasks = api.list_tasks(args.operation, states=args.state, object_id=args.object_id,
                           history=args.history, limit=args.limit)
    if args.json:
        _print_json(console, tasks)
    elif tasks:
        from rest.client_render import tasks_table

        console.print(tasks_table(tasks))
    else:
        console.print("no tasks")
    return RET_OK


def _get(api: ApiClient, args: argparse.Namespace, console: Console) -> int:
    task = api.get_task(args.id)
    if args.json:
        _print_json(console, task)
    else:
        from rest.client_render import task_details

        console.print(task_details(task))
    return RET_OK


def _create(api: ApiClient, args: argparse.Namespace, console: Console) -> int:
    if args.logs and args.json:
        raise ClientError(RET_API, "--logs shows the log above the bar and cannot be combined "
                          "with --json; use `housekeeping tasks logs ID --json`")
    body: dict[str, Any] = {"operation": args.operation}
    if args.object_id is not None:
        body["objectId"] = args.object_id
    if args.args is not None:
        try:
            body["args"] = json.loads(args.args)
        except ValueError as exc:
            raise ClientError(RET_API, f"--args is not valid JSON: {exc}") from None
        if not isinstance(body["args"], dict):
            raise ClientError(RET_API, "--args must be a JSON object, e.g. '{\"seconds\": 5}'")
    task = api.create_task(body)
    task_id = str(task["meta"]["id"])
    if not (args.wait or args.logs):
        if args.json:
            _print_json(console, task)
        else:
            from rest.client_render import tasks_table

            console.print(tasks_table([task]))
        return RET_OK
    return _follow(api, [task_id], console, json_out=args.json, logs=args.logs)


def _cancel(api: ApiClient, args: argparse.Namespace, console: Console) -> int:
    task = api.cancel_task(args.id)
    if args.json:
        _print_json(console, task)
    else:
        from rest.client_render import tasks_table

        console.print(tasks_table([task]))
    return RET_OK


def _watch(api: ApiClient, args: argparse.Namespace, console: Console) -> int:
    if args.ids:
        return _follow(api, args.ids, console)
    from rest.client_render import LiveBars

    with LiveBars(console) as bars:
        follower = Follower(api, None, operation=args.operation,
                            on_change=bars.show, on_delete=bars.hide)
        follower.run()
    return RET_OK  # pragma: no cover - following every task ends only by Ctrl-C or an error


def _follow(api: ApiClient, ids: list[str], console: Console, *, json_out: bool = False,
            logs: bool = False) -> int:
    from rest.client_logs import LogTail, note_dropped
    from rest.client_render import LiveBars, LogPrinter, clean, reason

    with LiveBars(console) as bars:
        tail = LogTail(api, ids[0], LogPrinter(console, above=bars).show) if logs else None
        if tail is not None:
            tail.start()
        follower = Follower(api, ids, on_change=bars.show)
        try:
            follower.run()
            # NOTE: a log completes once the task's pipes close, just after it ended.
            ended = tail.finish(LOG_DRAIN) if tail is not None else True
        finally:
            if tail is not None:
                tail.finish(0)
    if tail is not None:
        if tail.error is not None:
            print(f"housekeeping: the task's log: {tail.error}", file=sys.stderr)
        elif not ended:
            print(f"housekeeping: the task's log did not end within {LOG_DRAIN:g} s of the "
                  "task; see `housekeeping tasks logs ID`", file=sys.stderr)
        note_dropped(tail.follower.dropped, 0)
    tasks = [follower.tasks[task_id] for task_id in follower.ids or []]
    for task in tasks:
        if json_out:
            _print_json(console, task)
            continue
        line = f"{clean(task['meta']['id'], 128)} {task['state']}"
        if task["state"] == "SUCCEEDED":
            line += " " + clean(json.dumps(task.get("result"), ensure_ascii=False), 300)
        else:
            line += f": {reason(task)}"
        console.file.write(line + "\n")
    console.file.flush()
    return outcome_code(tasks)


def _logs(api: ApiClient, args: argparse.Namespace, console: Console) -> int:
    from rest.client_logs import LogFollower, not_found, note_dropped, read_log
    from rest.client_render import LogPrinter

    printer = LogPrinter(console, json_out=args.json)
    if not args.follow:
        page = read_log(api, args.id, args.after, printer.show)
        note_dropped(page.get("dropped"), args.after)
        return RET_OK
    follower = LogFollower(api, args.id, after=args.after, on_line=printer.show)
    follower.run()
    note_dropped(follower.dropped, args.after)
    try:
        task = api.get_task(args.id)
    except ClientError as exc:
        if not_found(exc):
            raise ClientError(
                RET_API, f"task {args.id} was purged before its outcome was seen") from None
        raise
    return outcome_code([task])


def _positive_arg(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seq_arg(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _quote(task_id: str) -> str:
    from urllib.parse import quote

    return quote(task_id, safe="")


_COMMANDS: dict[str, Callable[[ApiClient, argparse.Namespace, Console], int]] = {
    "list": _list,
    "get": _get,
    "create": _create,
    "cancel": _cancel,
    "watch": _watch,
    "logs": _logs,
}
