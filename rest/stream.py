"""Server-Sent Event streams: the task-event stream, and the machinery every stream shares.

Each stream subscribes to the manager and owns a small mailbox::

    manager subscriber thread --put()--> mailbox --> waitress thread --> client
          (blocks while the mailbox is full,      (yields SSE messages as
           so the manager's bounded backlog        they come, a comment
           fills and it drops a stuck client)      when idle)

A stream holds one waitress thread for its whole life, so their number is
bounded (:class:`EventStreams` answers 503 beyond it, for task-event and
task-log streams together), idle streams send a keep-alive comment (which
also finds clients that went away), and :meth:`EventStreams.close` ends every
stream at shutdown. :class:`SseStream` is that shared part; a kind of stream
says only how one mailbox item is written (``render``).

``/api/v1/task-events`` wire format: ``event: POST|PATCH|DELETE`` and
``data:`` the event JSON (``{"method", "uri", "scope", "task"}``). A client
that fell too far behind gets a last ``event: DROPPED`` and the stream ends:
reconnect, then re-read the task list. The log stream is in
:mod:`rest.log_stream`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from rest.errors import ApiError, encode_json
from rest.resources import operation_param

if TYPE_CHECKING:
    import falcon

    from rest.auth import Guard
    from rest.resources import TaskManager
    from supervisor.wire import ChangeEvent

log = logging.getLogger("housekeeping.rest")

#: What the client is told when the manager dropped its subscription.
DROPPED_MESSAGE = "this stream fell too far behind and lost events; reconnect and re-read the tasks"

#: Seconds between checks for a client that hung up, while a stream is idle.
DISCONNECT_POLL = 1.0

_OPENING = b"retry: 3000\n: housekeeping task events\n\n"
_KEEPALIVE = b": keep-alive\n\n"
_CLOSING = b": server shutting down\n\n"

S = TypeVar("S", bound="SseStream")


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
    """The open streams of one app (task events and task logs): opens them within one
    bound, ends them all."""

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
            mailbox_size: items buffered per stream before delivery blocks.
        """
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        self.manager = manager
        self._guard = guard
        self.max_streams = max_streams
        self.keepalive = keepalive
        self.mailbox_size = mailbox_size
        self._lock = threading.Lock()
        self._open: set[SseStream] = set()
        self._closed = False

    @property
    def count(self) -> int:
        """The number of streams open now."""
        return len(self._open)

    def open(self, subject: Any, operation: str | None) -> EventStream:
        """Subscribe a new task-event stream for ``subject``, filtered to ``operation``.

        Raises:
            ApiError: 503 when the server is shutting down or too many streams are open.
        """
        stream = EventStream(self, subject, operation, self.mailbox_size)
        return self.admit(stream, lambda: self.manager.subscribe_changes(stream.deliver))

    def admit(self, stream: S, subscribe: Callable[[], Callable[[], None]]) -> S:
        """Take a slot for ``stream``, then subscribe it (``subscribe`` returns the
        unsubscribe); the slot comes back if subscribing raises.

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
            self._open.add(stream)
        try:
            stream.unsubscribe = subscribe()
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

    def release(self, stream: SseStream) -> None:
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


class SseStream:
    """One client's stream: the WSGI response iterable (waitress calls ``close``).

    A subscriber thread hands items to :meth:`put`; the waitress thread takes
    up to :attr:`batch` of them at a time and writes what :meth:`render` makes
    of them as one chunk.
    """

    #: the first chunk: the reconnect delay and a comment
    opening = _OPENING
    #: mailbox items written per chunk at most
    batch = 1

    def __init__(self, streams: EventStreams, mailbox_size: int) -> None:
        self._streams = streams
        self._mailbox: deque[Any] = deque()
        self._mailbox_size = mailbox_size
        self._cond = threading.Condition()
        self._ended = False  # set by close() or end(); read under _cond
        self._closed = False
        self.unsubscribe: Callable[[], None] | None = None
        #: tells whether the client hung up (waitress's ``client_disconnected``), if known
        self.client_gone: Callable[[], bool] | None = None

    def put(self, item: Any) -> None:
        """Queue one item, waiting while the mailbox is full (dropped once the stream ended)."""
        with self._cond:
            while len(self._mailbox) >= self._mailbox_size and not self._ended:
                self._cond.wait()
            if not self._ended:
                self._mailbox.append(item)
                self._cond.notify_all()

    def render(self, item: Any) -> tuple[bytes, bool]:
        """Return the SSE bytes of one item, and whether the stream ends after it."""
        raise NotImplementedError

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
        yield self.opening
        keepalive = self._streams.keepalive
        # NOTE: a client that went away is noticed on the next write, or sooner
        # through waitress's client_disconnected check, polled while idle; either
        # way its slot comes back without waiting for the kernel to time out.
        poll = min(keepalive, DISCONNECT_POLL) if self.client_gone else keepalive
        last_write = time.monotonic()
        while True:
            items: list[Any] = []
            with self._cond:
                if not self._mailbox and not self._ended:
                    self._cond.wait(poll)
                while self._mailbox and len(items) < self.batch:
                    items.append(self._mailbox.popleft())
                if items:
                    self._cond.notify_all()
                ended = self._ended
            if not items:
                if ended:
                    yield _CLOSING
                    return
                if self.client_gone is not None and self.client_gone():
                    return
                if time.monotonic() - last_write < keepalive:
                    continue
                yield _KEEPALIVE
                last_write = time.monotonic()
                continue
            chunks: list[bytes] = []
            last = False
            for item in items:
                chunk, last = self.render(item)
                chunks.append(chunk)
                if last:
                    break
            chunk = b"".join(chunks)
            if chunk:
                yield chunk
                last_write = time.monotonic()
            if last:
                return

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


class EventStream(SseStream):
    """One client's stream of change events."""

    def __init__(
        self, streams: EventStreams, subject: Any, operation: str | None, mailbox_size: int
    ) -> None:
        super().__init__(streams, mailbox_size)
        self._subject = subject
        self._operation = operation

    def deliver(self, event: ChangeEvent) -> None:
        """Take one event from the manager (its subscriber thread); filter and queue it."""
        if self._streams.visible(self._subject, self._operation, event):
            self.put(event)

    def render(self, item: ChangeEvent) -> tuple[bytes, bool]:
        """One change event; a DROPPED one is the last."""
        if item.method == "DROPPED":
            return format_dropped(), True
        return format_event(item), False


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
