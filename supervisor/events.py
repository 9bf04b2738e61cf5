"""Change events: ordered fan-out to subscribers that can never stall the supervisor.

The manager publishes under its lock, so the order of events is the order of
changes. Publishing only appends to each subscriber's bounded backlog; each
subscriber has its own delivery thread, so a slow or raising callback delays
nobody but itself. One that falls more than ``backlog`` events behind is
dropped: its backlog is discarded and it receives one last event,
``{"method": "DROPPED", ...}``, telling it to start over.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("housekeeping.events")

Event = dict[str, Any]
Callback = Callable[[Event], None]

DROPPED_EVENT: Event = {"method": "DROPPED", "uri": "/tasks", "scope": {}, "task": None}


class _Subscriber:
    """One callback, its backlog and its delivery thread."""

    def __init__(self, key: int, callback: Callback, backlog: int) -> None:
        self.key = key
        self.callback = callback
        self.backlog = backlog
        self.queue: deque[Event] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.dropped = False
        self.thread = threading.Thread(
            target=self._deliver, name=f"housekeeping-subscriber-{key}", daemon=True
        )

    def offer(self, event: Event) -> bool:
        """Queue an event; False if the subscriber fell too far behind (dropped)."""
        with self.cond:
            if self.closed:
                return True
            if len(self.queue) >= self.backlog:
                self.queue.clear()
                self.queue.append(DROPPED_EVENT)
                self.dropped = True
                self.closed = True
                self.cond.notify()
                return False
            self.queue.append(event)
            self.cond.notify()
            return True

    def close(self) -> None:
        """Stop after delivering what is already queued."""
        with self.cond:
            self.closed = True
            self.cond.notify()

    def _deliver(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if not self.queue:
                    return
                event = self.queue.popleft()
            try:
                self.callback(event)
            except Exception:
                log.exception("subscriber %d raised; event skipped", self.key)


class EventHub:
    """Subscribers and the fan-out of events to them."""

    def __init__(self, backlog: int) -> None:
        self._backlog = backlog
        self._subscribers: dict[int, _Subscriber] = {}
        self._keys = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """True if anybody listens (events need not be built otherwise)."""
        return bool(self._subscribers)

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Register ``callback``; return the function that unsubscribes it."""
        if not callable(callback):
            raise TypeError("callback must be callable")
        subscriber = _Subscriber(next(self._keys), callback, self._backlog)
        with self._lock:
            self._subscribers[subscriber.key] = subscriber
        subscriber.thread.start()

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.pop(subscriber.key, None)
            subscriber.close()

        return unsubscribe

    def publish(self, event: Event) -> None:
        """Queue ``event`` for every subscriber, in order; never blocks on one."""
        with self._lock:
            subscribers = list(self._subscribers.values())
        for subscriber in subscribers:
            if not subscriber.offer(event):
                log.warning(
                    "subscriber %d fell more than %d events behind and was dropped",
                    subscriber.key, self._backlog,
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
