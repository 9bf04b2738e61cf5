"""``GET /api/v1/tasks/{id}/log``: a task's captured output, as one page or followed live.

Without ``follow`` the answer is the JSON of ``Manager.get_log``: lines with
a ``seq`` above ``after`` (default 0), at most ``limit`` (default
:data:`DEFAULT_PAGE`, at most :data:`MAX_PAGE`), and ``next``, the ``after``
of the next page.

With ``follow=true`` it is a ``text/event-stream`` that takes a slot of the
same bound as the task-event streams (:class:`rest.stream.EventStreams`)::

    Manager.subscribe_log(after=N) --deliver()--> LogStream mailbox --> client
        the kept lines above N, then each new one   id: <seq>
                                                    event: line
                                                    data: {"seq", "time", "stream", "text"}
        ... until the log is complete, or the task purged:
                                                    event: end
                                                    data: {"next": N, "dropped": D}

``after`` may also come as the ``Last-Event-ID`` header (what an
``EventSource`` sends when it reconnects), so a reconnect resumes after the
last line received. When the manager drops this stream's subscription because
the client read too slowly (``"behind"``), the stream subscribes again from
the last line it queued; a client sees a gap in ``seq`` only for lines the
log itself dropped meanwhile, and those are counted in ``dropped``. At server
shutdown the stream ends with a comment and no ``end``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from rest.errors import ApiError, encode_json
from rest.listing import flag_param as _flag_param
from rest.listing import single_param as _single_param
from rest.resources import check_task_id, not_found, send_json
from rest.stream import SseStream
from supervisor import TaskNotFound

if TYPE_CHECKING:
    from collections.abc import Callable

    import falcon

    from rest.auth import Guard
    from rest.stream import EventStreams

#: Lines in one page when the request names no ``limit``.
DEFAULT_PAGE = 1000
#: The largest ``limit`` a request may ask for.
MAX_PAGE = 10_000
#: Log lines written per chunk of a followed log at most.
LINES_PER_CHUNK = 64

#: The largest ``after`` (18 digits: every such number is a valid seq, and
#: int() of a hostile, very long parameter is never attempted).
MAX_AFTER = 10**18 - 1
_COUNT = re.compile(r"[0-9]{1,18}")


def format_line(line: dict[str, Any]) -> bytes:
    """Encode one log line as an SSE message whose id is its seq."""
    return b"id: %d\nevent: line\ndata: %s\n\n" % (line["seq"], encode_json(line))


def format_end(next_after: int, dropped: int) -> bytes:
    """The last SSE message of a log followed to its end."""
    return b"event: end\ndata: " + encode_json({"next": next_after, "dropped": dropped}) + b"\n\n"


class LogStream(SseStream):
    """One client following one task's log."""

    opening = b"retry: 3000\n: housekeeping task log\n\n"
    batch = LINES_PER_CHUNK

    def __init__(self, streams: EventStreams, task_id: str, dropped: int) -> None:
        """Create the stream; ``dropped`` is the log's count when it opened (the count
        the ``end`` message falls back to if the task is purged meanwhile)."""
        super().__init__(streams, streams.mailbox_size)
        self._manager = streams.manager
        self._task_id = task_id
        self._dropped = dropped

    def subscribe(self, after: int) -> Callable[[], None]:
        """Follow the log from the lines above ``after``; return the unsubscribe."""
        return self._manager.subscribe_log(self._task_id, self.deliver, after=after)

    def deliver(self, item: dict[str, Any]) -> None:
        """Take a line, or the last ``{"end", "next"}`` call, from the log's follower thread."""
        self.put(item)

    def render(self, item: dict[str, Any]) -> tuple[bytes, bool]:
        """A line; the end of the log; or, for a subscription that fell behind, nothing."""
        why = item.get("end")
        if why is None:
            return format_line(item), False
        if why == "behind":
            return self._resubscribe(item["next"])
        return self._end_message(item["next"]), True

    def _resubscribe(self, after: int) -> tuple[bytes, bool]:
        # NOTE: runs on the waitress thread, which alone (re)subscribes and later
        # closes; every line up to ``after`` is already in the mailbox, so the
        # new follower carries on without a gap.
        with self._cond:
            if self._ended:
                return b"", False
        try:
            self.unsubscribe = self.subscribe(after)
        except TaskNotFound:
            return self._end_message(after), True
        return b"", False

    def _end_message(self, next_after: int) -> bytes:
        try:
            self._dropped = self._manager.get_log(self._task_id, after=next_after,
                                                  limit=1)["dropped"]
        except TaskNotFound:
            pass  # NOTE: purged: the count from when the stream opened is the last known
        return format_end(next_after, self._dropped)


class TaskLogLines:
    """``/api/v1/tasks/{task_id}/log``: one page of the log, or the log followed (GET)."""

    def __init__(self, streams: EventStreams, guard: Guard) -> None:
        self._streams = streams
        self._manager = streams.manager
        self._guard = guard

    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        """Answer the log JSON, or with ``follow=true`` an event stream of it.

        Viewing is checked as for ``GET /tasks/{id}`` (404 for a task the
        caller may not view); malformed parameters answer 400 before the task
        is looked up, so they tell nothing about which ids exist.
        """
        subject = self._guard.authenticate(req)
        check_task_id(task_id)
        follow = _flag_param(req, "follow")
        after = _count_param(req, "after", least=0)
        # NOTE: checked with follow too, but a stream has no pages: it sends every line
        limit = _count_param(req, "limit", least=1, most=MAX_PAGE)
        if follow and after is None:
            after = _last_event_id(req)
        task = self._manager.get_snapshot(task_id)
        if not self._guard.allows("view", subject, task.operation):
            raise not_found(task_id)
        start = after or 0
        if not follow:
            send_json(resp, self._manager.get_log(task_id, after=start,
                                                  limit=limit or DEFAULT_PAGE))
            return
        dropped = self._manager.get_log(task_id, after=start, limit=1)["dropped"]
        stream = LogStream(self._streams, task_id, dropped)
        self._streams.admit(stream, lambda: stream.subscribe(start))
        stream.client_gone = req.env.get("waitress.client_disconnected")
        resp.content_type = "text/event-stream; charset=utf-8"
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("X-Accel-Buffering", "no")  # NOTE: tells nginx not to buffer it
        resp.stream = stream


def _count_param(req: falcon.Request, name: str, *, least: int,
                 most: int | None = None) -> int | None:
    """An integer parameter within bounds, None if absent (400 otherwise)."""
    text = _single_param(req, name)
    if text is None:
        return None
    bounds = f"from {least} to {most}" if most is not None else f">= {least}"
    if not _COUNT.fullmatch(text) or int(text) < least or (most is not None
                                                           and int(text) > most):
        raise ApiError(400, f"query parameter {name!r} must be an integer {bounds}")
    return int(text)


def _last_event_id(req: falcon.Request) -> int | None:
    """The ``Last-Event-ID`` header as an ``after``: the seq of the last line received."""
    text = req.get_header("Last-Event-ID")
    if text is None or not text.strip():
        return None
    if not _COUNT.fullmatch(text.strip()):
        raise ApiError(400, "Last-Event-ID must be the seq of a log line (an integer >= 0)")
    return int(text.strip())
