"""Task logs for ``housekeeping tasks logs`` and ``create --wait --logs``: paging
through a log, following its stream, and resuming where a stream ended.

A stream that breaks, or that the server ends because this reader fell
behind, is opened again with ``after=`` the newest seq shown, so no line is
shown twice or skipped.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from rest.client import (
    LOG_PAGE,
    OPENED,
    RECONNECT_FOR,
    RET_API,
    ApiClient,
    ClientError,
    Reconnects,
)


def read_log(
    api: ApiClient, task_id: str, after: int = 0,
    on_line: Callable[[dict[str, Any]], None] = lambda line: None,
) -> dict[str, Any]:
    """Show the task's log lines after ``after``, page by page, up to its end so far.

    Returns:
        The last page (its ``next``, ``dropped`` and ``complete``).

    Raises:
        ClientError: as :meth:`ApiClient.request`.
    """
    while True:
        page = api.get_log(task_id, after)
        lines = page.get("lines")
        lines = lines if isinstance(lines, list) else []
        for line in lines:
            seq = _seq(line)
            if seq is not None and seq > after:
                on_line(line)
        after_next = page.get("next")
        # NOTE: a short page reached the end so far; a task that writes faster
        # than pages come is shown up to then, as `tail` would, not forever.
        if (page.get("complete") is True or len(lines) < LOG_PAGE
                or not isinstance(after_next, int) or after_next <= after):
            return page
        after = after_next


class LogFollower:
    """One task's log followed live until it ends, resumed wherever a stream ended.

    Each stream is opened with ``after=`` the newest seq shown, so a stream
    that broke, or that the server ended because this reader fell behind,
    goes on without repeating or skipping a line. Lines the server discarded
    to keep its bound are never shown; :attr:`dropped` counts them.
    """

    def __init__(
        self,
        api: ApiClient,
        task_id: str,
        *,
        after: int = 0,
        on_line: Callable[[dict[str, Any]], None] = lambda line: None,
        reconnect_for: float = RECONNECT_FOR,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Follow the lines after ``after`` (``sleep`` and ``clock`` are test shims)."""
        self.api = api
        self.task_id = task_id
        self.next = after  #: the newest seq shown (the ``after`` of the next stream)
        self.dropped = 0  #: lines the server dropped, from the log's ``end``
        self.connections = 0
        self._on_line = on_line
        self._reconnects = Reconnects(reconnect_for, sleep, clock)

    def run(self) -> None:
        """Show every line until the log's ``end``, reconnecting when a stream ends early.

        Raises:
            ClientError: the first connection failed, the task does not exist
                or was purged, the credentials are refused, or the stream
                stayed broken for ``reconnect_for`` seconds.
        """
        reconnects = self._reconnects
        while True:
            stream = self.api.log_events(self.task_id, self.next)
            try:
                for event in stream:
                    if event is OPENED:
                        self.connections += 1
                        reconnects.broken_since = None
                    elif event.get("method") == "line" and self._line(event.get("line")):
                        # NOTE: only a new line resets the back-off: a stream that
                        # opens and ends at once is retried ever more slowly
                        reconnects.attempt = 0
                    elif event.get("method") == "end":
                        dropped = event.get("dropped")
                        self.dropped = dropped if isinstance(dropped, int) else self.dropped
                        return
            except ClientError as exc:
                if self.connections and not_found(exc):
                    raise ClientError(
                        RET_API, f"task {self.task_id} was purged before its log ended"
                    ) from None
                last_error = reconnects.failed(exc, self.connections)
            else:
                # NOTE: no `end`: the server dropped this reader for being slow, or
                # is shutting down; the next stream starts after the last line shown.
                last_error = "the log stream ended"
            finally:
                stream.close()
            reconnects.wait(last_error)

    def _line(self, line: Any) -> bool:
        """Show ``line`` unless it was shown already; tell whether it was new."""
        seq = _seq(line)
        if seq is None or seq <= self.next:
            return False
        self.next = seq
        self._on_line(line)
        return True


class LogTail:
    """A :class:`LogFollower` on a thread of its own, for ``create --wait --logs``.

    The main thread follows the task's events (its bar) while this one
    prints its log lines above the bar; once the task ended, :meth:`finish`
    waits a little for the log's end and then lets nothing more through.
    """

    def __init__(self, api: ApiClient, task_id: str,
                 on_line: Callable[[dict[str, Any]], None]) -> None:
        """Follow ``task_id``'s log from its first line; call :meth:`start`."""
        self.follower = LogFollower(api, task_id, on_line=self._show)
        self.error: str | None = None  #: why the log could not be followed to its end
        self._on_line = on_line
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="log-tail", daemon=True)

    def start(self) -> None:
        """Start following."""
        self._thread.start()

    def finish(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the log's end, then show no more lines.

        Returns:
            True if the log was followed to its end (or failed: see :attr:`error`).
        """
        self._thread.join(timeout)
        with self._lock:
            self._stopped = True
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            self.follower.run()
        except ClientError as exc:
            self.error = str(exc)
        except Exception as exc:  # NOTE: a thread's error must not vanish unseen
            self.error = f"{type(exc).__name__}: {exc}"

    def _show(self, line: dict[str, Any]) -> None:
        with self._lock:
            if not self._stopped:
                self._on_line(line)


def _seq(line: Any) -> int | None:
    """The ``seq`` of a line from the server, or None if it is not a line."""
    seq = line.get("seq") if isinstance(line, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def not_found(exc: ClientError) -> bool:
    """True for the server's 404 (an unknown or purged task)."""
    return exc.code == RET_API and exc.args[0].startswith("404")


def note_dropped(dropped: Any, after: int, err: Any = None) -> None:
    """Say on stderr how many of the lines asked for (those after ``after``) were dropped.

    The server drops a log's oldest lines, so lines ``1..dropped`` are gone.
    """
    missed = dropped - after if isinstance(dropped, int) else 0
    if missed > 0:
        lines = "line" if missed == 1 else "lines"
        print(f"housekeeping: {missed} older {lines} of this log were dropped (the server "
              "keeps the newest --log-limit bytes of each task)",
              file=err if err is not None else sys.stderr)
