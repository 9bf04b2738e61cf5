"""One task's captured output: the newest lines, bounded by bytes, readable and followable.

A task writes as fast as it likes, so nothing here works per line on the
write path. What the loop reads from a pipe becomes one :class:`Block`: the
complete lines of that read, as the bytes they came in (a ``\\n`` after
each), with the seq of its first line, its stream and the time of the read.
Counting lines is ``bytes.count``; a regular expression finds the rare line
over :data:`MAX_LINE_BYTES` (then that block is cut line by line). Lines are
made -- split, decoded with replacement -- only when somebody reads them:
:meth:`TaskLog.read` on the caller's thread, a follower on its own delivery
thread.

The bound is on memory: every block costs its bytes plus
:data:`BLOCK_OVERHEAD` (a task that writes one byte per ``write()`` must not
hold the supervisor's memory at fifty times its limit), and the oldest lines
are dropped, and counted, beyond ``limit``.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from supervisor.events import Subscriber
from supervisor.task import utc_stamp

STREAMS = ("stdout", "stderr")
MAX_LINE_BYTES = 16 * 1024  #: a longer line is cut into lines of at most this
BLOCK_OVERHEAD = 64  #: bytes charged per stored block on top of its data
_LONG_LINE = re.compile(rb"[^\n]{%d}" % (MAX_LINE_BYTES + 1))

Line = dict[str, Any]
LineCallback = Callable[[Line], None]


class Block:
    """Complete lines of one stream from one read, each ending with ``\\n``."""

    __slots__ = ("count", "data", "first", "stream", "time")

    def __init__(self, first: int, time: float, stream: int, data: bytes, count: int) -> None:
        self.first = first  #: seq of its first line
        self.time = time
        self.stream = stream  #: index into STREAMS
        self.data = data
        self.count = count

    @property
    def size(self) -> int:
        """What the block costs against the log's limit (and a follower's backlog)."""
        return len(self.data) + BLOCK_OVERHEAD

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    def lines(self, after: int = 0) -> Iterator[Line]:
        """Its lines as wire dicts, those with a seq above ``after``."""
        stamp, stream = utc_stamp(self.time), STREAMS[self.stream]
        texts = self.data.split(b"\n")
        texts.pop()  # NOTE: after the last "\n"
        skip = max(0, after - self.first + 1)
        for offset in range(skip, self.count):
            yield {"seq": self.first + offset, "time": stamp, "stream": stream,
                   "text": texts[offset].decode("utf-8", "replace")}


class _End:
    """The last thing a follower is handed: why it gets nothing more."""

    __slots__ = ("why",)
    size = 0

    def __init__(self, why: str) -> None:
        self.why = why


BEHIND = _End("behind")


class _Follower(Subscriber):
    """A subscriber of one task's log: blocks in, one line dict per call out."""

    def __init__(self, key: int, callback: LineCallback, after: int,
                 backlog: int, backlog_bytes: int) -> None:
        super().__init__(key, callback, backlog, backlog_bytes, dropped=BEHIND,
                         name=f"housekeeping-log-follower-{key}")
        self.after = after  #: seq of the last line delivered (or skipped)

    def deliver(self, item: Any) -> None:
        if isinstance(item, _End):
            self.callback({"end": item.why, "next": self.after})
            return
        for line in item.lines(self.after):
            self.callback(line)
            self.after = line["seq"]


class TaskLog:
    """The captured output of one task (fed on the manager's loop, read from any thread).

    Args:
        limit: bytes kept (with :data:`BLOCK_OVERHEAD` per block); older lines drop.
        backlog, backlog_bytes: a follower further behind than this is dropped.
    """

    def __init__(self, limit: int, backlog: int, backlog_bytes: int) -> None:
        self.limit = limit
        self._backlog, self._backlog_bytes = backlog, backlog_bytes
        self._lock = threading.Lock()
        self._blocks: deque[Block] = deque()
        self._bytes = 0
        self._next = 1  #: seq of the next line
        self._partial = [b"", b""]  #: the open line of each stream
        self.dropped = 0  #: lines discarded so far
        self.closed = False  #: every pipe of the task reached EOF (or was given up)
        self._followers: dict[int, _Follower] = {}
        self._keys = 0

    # -- the write side (the manager's loop) ---------------------------------

    def feed(self, stream: int, data: bytes, now: float) -> int:
        """Take what one read of ``stream`` returned; return the lines dropped for room."""
        partial = self._partial[stream]
        if partial:
            data = partial + data
        cut = data.rfind(b"\n") + 1
        complete, rest = data[:cut], data[cut:]
        while len(rest) > MAX_LINE_BYTES:  # NOTE: no newline in sight: cut it anyway
            piece = _utf8_prefix(rest, MAX_LINE_BYTES)
            complete += piece + b"\n"
            rest = rest[len(piece):]
        self._partial[stream] = rest
        return self._append(stream, complete, now) if complete else 0

    def flush(self, stream: int, now: float) -> int:
        """The stream ended: its open line, if any, becomes a line."""
        rest, self._partial[stream] = self._partial[stream], b""
        return self._append(stream, rest + b"\n", now) if rest else 0

    def append_lines(self, stream: int, texts: list[str], now: float) -> int:
        """Take lines already split elsewhere (a remote worker's); return lines dropped."""
        data = "".join(text.replace("\n", " ") + "\n" for text in texts).encode(
            "utf-8", "replace")
        return self._append(stream, data, now) if data else 0

    def close(self, terminal: bool) -> None:
        """No more output will come; followers end if the task is ``terminal`` too."""
        self.closed = True
        if terminal:
            self.end("complete")

    def end(self, why: str) -> None:
        """Hand every follower its last call (``{"end": why, "next": N}``) and forget them."""
        with self._lock:
            followers = list(self._followers.values())
            self._followers.clear()
        for follower in followers:
            follower.offer(_End(why))
            follower.close()

    def _append(self, stream: int, data: bytes, now: float) -> int:
        if _LONG_LINE.search(data) is not None:
            data = _cut_long_lines(data)
        block = Block(self._next, now, stream, data, data.count(b"\n"))
        with self._lock:
            self._next += block.count
            self._blocks.append(block)
            self._bytes += block.size
            dropped = self._trim()
            followers = list(self._followers.values())
        for follower in followers:
            if not follower.offer(block):
                with self._lock:
                    self._followers.pop(follower.key, None)
        return dropped

    def _trim(self) -> int:
        """Drop the oldest lines until the log fits its limit; return how many."""
        dropped = 0
        while self._bytes > self.limit and self._blocks:
            first = self._blocks[0]
            excess = self._bytes - self.limit
            if excess >= len(first.data):
                self._blocks.popleft()
                self._bytes -= first.size
                dropped += first.count
                continue
            # NOTE: drop its first lines up to the one that makes room, keep the rest.
            cut = first.data.find(b"\n", max(0, excess - 1)) + 1
            gone = first.data.count(b"\n", 0, cut)
            self._blocks[0] = Block(first.first + gone, first.time, first.stream,
                                    first.data[cut:], first.count - gone)
            self._bytes -= cut
            dropped += gone
            if not self._blocks[0].count:
                self._blocks.popleft()
                self._bytes -= BLOCK_OVERHEAD
        self.dropped += dropped
        return dropped

    # -- the read side (any thread) ------------------------------------------

    @property
    def size(self) -> int:
        """Bytes held, as counted against the limit."""
        return self._bytes

    @property
    def next_seq(self) -> int:
        """The seq the next line will have."""
        return self._next

    def read(self, after: int = 0, limit: int | None = None) -> tuple[list[Line], int]:
        """The stored lines with a seq above ``after`` (at most ``limit``), and the
        ``after`` to pass next time."""
        with self._lock:
            blocks = [block for block in self._blocks if block.last > after]
        lines: list[Line] = []
        for block in blocks:
            for line in block.lines(after):
                if limit is not None and len(lines) >= limit:
                    return lines, lines[-1]["seq"]
                lines.append(line)
        return lines, (lines[-1]["seq"] if lines else max(after, 0))

    def follow(self, callback: LineCallback, after: int | None) -> Callable[[], None]:
        """Deliver lines to ``callback`` on a thread of its own: those stored with a
        seq above ``after`` first (none if ``after`` is None), then each new one.
        Returns the function that stops it."""
        with self._lock:
            self._keys += 1
            start = self._next - 1 if after is None else max(0, after)
            follower = _Follower(self._keys, callback, start, self._backlog,
                                 self._backlog_bytes)
            # NOTE: the stored lines do not count against its backlog: they are
            # bounded by the log's own limit.
            follower.preload(block for block in self._blocks if block.last > start)
            self._followers[follower.key] = follower
        follower.start()

        def stop() -> None:
            with self._lock:
                self._followers.pop(follower.key, None)
            follower.close()

        return stop


def _utf8_prefix(data: bytes, size: int) -> bytes:
    """The first ``size`` bytes of ``data``, less a UTF-8 sequence cut in two."""
    end = size
    while end > size - 4 and end > 0 and data[end] & 0xC0 == 0x80:
        end -= 1
    return data[:end] if end > size - 4 and end > 0 else data[:size]


def _cut_long_lines(data: bytes) -> bytes:
    """Cut every line of ``data`` longer than MAX_LINE_BYTES into lines of at most it."""
    out = []
    for line in data.split(b"\n")[:-1]:
        while len(line) > MAX_LINE_BYTES:
            piece = _utf8_prefix(line, MAX_LINE_BYTES)
            out.append(piece)
            line = line[len(piece):]
        out.append(line)
    return b"\n".join(out) + b"\n"
