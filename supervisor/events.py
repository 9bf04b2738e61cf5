"""Change events: ordered fan-out to subscribers that can never stall the supervisor.

The manager publishes under its lock, so the order of events is the order of
changes. Publishing only appends the one shared, immutable
:class:`~supervisor.wire.ChangeEvent` to each subscriber's backlog; each
subscriber has its own delivery thread, so a slow or raising callback delays
nobody but itself. A plain subscriber gets the event as a fresh dict, built on
its own thread; a raw one (the REST layer's streams and metrics) gets the
shared object itself. A delivery thread takes its whole backlog at once and
is woken only when the backlog was empty, so a busy subscriber costs one
wake-up per batch, not per event. One that falls more than ``backlog``
events or ``backlog_bytes`` bytes behind (not counting the batch it is
delivering) is dropped: its backlog is discarded and it receives one last
event, ``{"method": "DROPPED", ...}``, telling it to start over.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from supervisor.wire import DROPPED, ChangeEvent

log = logging.getLogger("housekeeping.events")

Event = dict[str, Any]
Callback = Callable[[Event], None]
RawCallback = Callable[[ChangeEvent], None]


class Subscriber:
    """One callback, its backlog and its delivery thread.

    Subclasses say how one queued item reaches the callback (:meth:`deliver`).
    """

    def __init__(self, key: int, callback: Callable[[Any], None], backlog: int,
                 backlog_bytes: int, *, dropped: Any, name: str) -> None:
        self.key = key
        self.callback = callback
        self.backlog = backlog
        self.backlog_bytes = backlog_bytes
        self.queued_bytes = 0
        self.queue: deque[Any] = deque()  #: items with a ``size``
        self.cond = threading.Condition()
        self.closed = False
        self.dropped = False
        self._dropped_item = dropped  #: the last item of one that fell behind
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def preload(self, items: Iterable[Any]) -> None:
        """Queue items before the thread starts, outside the backlog's bounds."""
        self.queue.extend(items)

    def offer(self, item: Any) -> bool:
        """Queue an item; False if the subscriber fell too far behind (dropped)."""
        with self.cond:
            if self.closed:
                return True
            if (len(self.queue) >= self.backlog
                    or self.queued_bytes + item.size > self.backlog_bytes):
                self.queue.clear()
                self.queued_bytes = 0
                self.queue.append(self._dropped_item)
                self.dropped = True
                self.closed = True
                self.cond.notify()
                return False
            self.queue.append(item)
            self.queued_bytes += item.size
            if len(self.queue) == 1:
                # NOTE: the thread waits only on an empty backlog: one wake-up per
                # batch, not per event.
                self.cond.notify()
            return True

    def close(self) -> None:
        """Stop after delivering what is already queued."""
        with self.cond:
            self.closed = True
            self.cond.notify()

    def deliver(self, item: Any) -> None:
        """Hand one queued item to the callback (on the delivery thread)."""
        self.callback(item)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if not self.queue:
                    return
                # NOTE: the whole backlog at once: one lock round per batch
                batch, self.queue = self.queue, deque()
                self.queued_bytes = 0
            for item in batch:
                try:
                    self.deliver(item)
                except Exception:
                    log.exception("subscriber %d raised; item skipped", self.key)


class _EventSubscriber(Subscriber):
    """A subscriber of change events: the shared event itself if ``raw``, else a dict."""

    def __init__(self, key: int, callback: Callable[[Any], None], raw: bool,
                 backlog: int, backlog_bytes: int) -> None:
        super().__init__(key, callback, backlog, backlog_bytes, dropped=DROPPED,
                         name=f"housekeeping-subscriber-{key}")
        self.raw = raw

    def deliver(self, item: ChangeEvent) -> None:
        self.callback(item if self.raw else item.to_dict())


class EventHub:
    """Subscribers and the fan-out of events to them."""

    def __init__(self, backlog: int, backlog_bytes: int) -> None:
        self._backlog = backlog
        self._backlog_bytes = backlog_bytes
        self._subscribers: dict[int, _EventSubscriber] = {}
        self._keys = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """True if anybody listens (events need not be built otherwise)."""
        return bool(self._subscribers)

    def subscribe(self, callback: Callable[[Any], None], *, raw: bool = False,
                  ) -> Callable[[], None]:
        """Register ``callback`` (given dicts, or the shared events if ``raw``);
        return the function that unsubscribes it."""
        if not callable(callback):
            raise TypeError("callback must be callable")
        subscriber = _EventSubscriber(next(self._keys), callback, raw, self._backlog,
                                      self._backlog_bytes)
        with self._lock:
            self._subscribers[subscriber.key] = subscriber
        subscriber.start()

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.pop(subscriber.key, None)
            subscriber.close()

        return unsubscribe

    def publish(self, event: ChangeEvent) -> None:
        """Queue ``event`` for every subscriber, in order; never blocks on one."""
        with self._lock:
            subscribers = list(self._subscribers.values())
        for subscriber in subscribers:
            if not subscriber.offer(event):
                log.warning(
                    "subscriber %d fell more than %d events or %d bytes behind and was dropped",
                    subscriber.key, self._backlog, self._backlog_bytes,
                )
                with self._lock:
                    self._subscribers.pop(subscriber.key, None)

    def close(self, timeout: float) -> None:
        """Deliver what is queued (waiting up to ``timeout``), then stop every thread."""
        with self._lock:
            subscribers = list(self._subscribers.values())
            self._subscribers.clear()
        for subscriber in subscribers:
            subscriber.close()
        for subscriber in subscribers:
            subscriber.thread.join(timeout)
