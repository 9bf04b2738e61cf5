"""``GET /api/v1/task-events``: the manager's change events as Server-Sent Events.

Each stream subscribes to the manager and owns a small mailbox::

    manager subscriber thread --deliver()--> mailbox --> waitress thread --> client
          (blocks while the mailbox is full,         (yields one SSE event
           so the manager's bounded backlog           per change, a comment
           fills and it drops a stuck client)         when idle)

A stream holds one waitress thread for its whole life, so their number is
bounded (:class:`EventStreams` answers 503 beyond it), idle streams send a
keep-alive comment (which also finds clients that went away), and
:meth:`EventStreams.close` ends every stream at shutdown.

Wire format: ``event: POST|PATCH|DELETE`` and ``data:`` the event JSON
(``{"method", "uri", "scope", "task"}``). A client that fell too far behind
gets a last ``event: DROPPED`` and the stream ends: reconnect, then re-read
the task list.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rest.errors import ApiError, encode_json
from rest.resources import operation_param

if TYPE_CHECKING:
    import falcon

    from rest.auth import Guard
    from rest.resources import TaskManager
    from supervisor.snapshot import ChangeEvent

log = logging.getLogger("housekeeping.rest")

#: What the client is told when the manager dropped its subscription.
DROPPED_MESSAGE = "this stream fell too far behind and lost events; reconnect and re-read the tasks"

#: Seconds between checks for a client that hung up, while a stream is idle.
DISCONNECT_POLL = 1.0

_OPENING = b"retry: 3000\n: housekeeping task events\n\n"
_KEEPALIVE = b": keep-alive\n\n"
_CLOSING = b": server shutting down\n\n"


def format_event(event: ChangeEvent) -> bytes:
    """Encode one change event as an SSE message (its JSON spliced from the snapshot)."""
    return b"".join((b"event: ", event.method.encode("ascii"), b"\ndata: ", event.json(),
                     b"\n\n"))


def format_dropped() -> bytes:
    """The last SSE message of a stream that fell too far behind."""
    body: dict[str, Any] = {"method": "DROPPED", "uri": "/tasks", "scope": {}, "task": None,
            "message": DROPPED_MESSAGE}
    return b"event: DROPPED\ndata: " + encode_json(body) + b"\n\n"


class EventStreams:
    """The open event streams of one app: opens them within a bound, ends them all."""

    def __init__(
        self,
        manager: TaskManager,
        guard: Guard,
        *,
        max_streams: int = 4,
        keepalive: float = 15.0,
        mailbox_size: int = 256,
    ) -> None:
        """Create the registry.

        Args:
            manager: the manager whose events are streamed.
            guard: decides which tasks a subject may view.
            max_streams: how many streams may be open at once (each holds a
                server thread); one more is answered 503.
            keepalive: seconds of silence after which a comment is sent.
            mailbox_size: events buffered per stream before delivery blocks.
        """
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        self.manager = manager
        self._guard = guard
        self.max_streams = max_streams
        self.keepalive = keepalive
        self._mailbox_size = mailbox_size
        self._lock = threading.Lock()
        self._open: set[EventStream] = set()
        self._closed = False

    @property
    def count(self) -> int:
        """The number of streams open now."""
        return len(self._open)

    def open(self, subject: Any, operation: str | None) -> EventStream:
        """Subscribe a new stream for ``subject``, filtered to ``operation``.

        Raises:
            ApiError: 503 when the server is shutting down or too many streams are open.
        """
        with self._lock:
            if self._closed:
                raise ApiError(503, "the server is shutting down")
            if len(self._open) >= self.max_streams:
                raise ApiError(
                    503,
                    f"too many event streams open (limit {self.max_streams}); retry later",
                    headers={"Retry-After": "5"},
                )
            stream = EventStream(self, subject, operation, self._mailbox_size)
            self._open.add(stream)
        try:
            stream.unsubscribe = self.manager.subscribe_changes(stream.deliver)
        except BaseException:
            self.release(stream)
            raise
        return stream

    def visible(self, subject: Any, operation: str | None, event: ChangeEvent) -> bool:
        """Tell whether ``event`` belongs on a stream of ``subject`` filtered to ``operation``."""
        task = event.task
        if task is None:
            return True
        if operation is not None and task.operation != operation:
            return False
        return self._guard.allows("view", subject, task.operation)

    def release(self, stream: EventStream) -> None:
        """Forget a stream that ended (called by the stream itself)."""
        with self._lock:
            self._open.discard(stream)

    def close(self) -> None:
        """End every open stream and refuse new ones (server shutdown)."""
        with self._lock:
            self._closed = True
            streams = list(self._open)
        for stream in streams:
            stream.end()


class EventStream:
    """One client's stream: the WSGI response iterable (waitress calls ``close``)."""

    def __init__(
        self, streams: EventStreams, subject: Any, operation: str | None, mailbox_size: int
    ) -> None:
        self._streams = streams
        self._subject = subject
        self._operation = operation
        self._mailbox: deque[ChangeEvent] = deque()
        self._mailbox_size = mailbox_size
        self._cond = threading.Condition()
        self._ended = False  # set by close() or end(); read under _cond
        self._closed = False
        self.unsubscribe: Callable[[], None] | None = None
        #: tells whether the client hung up (waitress's ``client_disconnected``), if known
        self.client_gone: Callable[[], bool] | None = None

    def deliver(self, event: ChangeEvent) -> None:
        """Take one event from the manager (its subscriber thread); filter and queue it."""
        if not self._streams.visible(self._subject, self._operation, event):
            return
        with self._cond:
            while len(self._mailbox) >= self._mailbox_size and not self._ended:
                self._cond.wait()
            if not self._ended:
                self._mailbox.append(event)
                self._cond.notify_all()

    def end(self) -> None:
        """Make the stream finish (its iterator says goodbye and stops)."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks()

    def _chunks(self) -> Iterator[bytes]:
        # NOTE: send something at once: waitress sends the headers with the first
        # chunk, and a client knows from it that it is subscribed.
        yield _OPENING
        keepalive = self._streams.keepalive
        # NOTE: a client that went away is noticed on the next write, or sooner
        # through waitress's client_disconnected check, polled while idle; either
        # way its slot comes back without waiting for the kernel to time out.
        poll = min(keepalive, DISCONNECT_POLL) if self.client_gone else keepalive
        last_write = time.monotonic()
        while True:
            event: ChangeEvent | None = None
            with self._cond:
                if not self._mailbox and not self._ended:
                    self._cond.wait(poll)
                if self._mailbox:
                    event = self._mailbox.popleft()
                    self._cond.notify_all()
                ended = self._ended
            if event is None and ended:
                yield _CLOSING
                return
            if event is None:
                if self.client_gone is not None and self.client_gone():
                    return
                if time.monotonic() - last_write < keepalive:
                    continue
                chunk = _KEEPALIVE
            elif event.method == "DROPPED":
                yield format_dropped()
                return
            else:
                chunk = format_event(event)
            yield chunk
            last_write = time.monotonic()

    def close(self) -> None:
        """Unsubscribe and free the slot; safe to call twice, and before iterating."""
        if self._closed:
            return
        self._closed = True
        self.end()
        if self.unsubscribe is not None:
            try:
                self.unsubscribe()
            except Exception:
                log.exception("unsubscribing an event stream failed")
        self._streams.release(self)


class TaskEvents:
    """``/api/v1/task-events``: the change stream (GET)."""

    def __init__(self, streams: EventStreams, guard: Guard) -> None:
        self.streams = streams
        self._guard = guard

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Open a ``text/event-stream`` of the changes to tasks the caller may view."""
        subject = self._guard.authenticate(req)
        resp.content_type = "text/event-stream; charset=utf-8"
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("X-Accel-Buffering", "no")  # NOTE: tells nginx not to buffer it
        stream = self.streams.open(subject, operation_param(req))
        stream.client_gone = req.env.get("waitress.client_disconnected")
        resp.stream = stream
