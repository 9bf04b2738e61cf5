"""One task's captured output: the newest lines, bounded by bytes, readable and followable.

A task writes as fast as it likes, so nothing here works per line on the
write path. What the loop reads from a pipe becomes one :class:`Block`: the
complete lines of that read, as the bytes they came in (a ``\\n`` after
each), with the seq of its first line, its stream and the time of the read.
The block keeps the read's own bytes object, with offsets, so a read is not
copied again (nor when its oldest lines are dropped): counting its lines (one
``bytes.count``) is the only pass over it, and finding the rare line over
:data:`MAX_LINE_BYTES` takes one ``rfind`` per 16 KiB (such a read is cut line
by line, the slow way). Lines are made -- split, decoded with replacement --
only when somebody reads them:
:meth:`TaskLog.read` on the caller's thread, a follower on its own delivery
thread.

The bound is on memory: every block costs its bytes plus
:data:`BLOCK_OVERHEAD` (a task that writes one byte per ``write()`` must not
hold the supervisor's memory at fifty times its limit), and the oldest lines
are dropped, and counted, beyond ``limit``. A block is charged for the whole
read it keeps (the open line after its lines too); the only bytes held beyond
the charge are the dropped start of the oldest block, at most one read.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from supervisor.events import Subscriber
from supervisor.wire import utc_stamp

STREAMS = ("stdout", "stderr")
MAX_LINE_BYTES = 16 * 1024  #: a longer line is cut into lines of at most this
BLOCK_OVERHEAD = 64  #: bytes charged per stored block on top of its data

Line = dict[str, Any]
LineCallback = Callable[[Line], None]


class Block:
    """Complete lines of one stream from one read, each ending with ``\\n``: ``head``
    (the start of its first line, from earlier reads) then ``data[start:end]``."""

    __slots__ = ("count", "data", "end", "first", "head", "start", "stream", "time")

    def __init__(self, first: int, time: float, stream: int, data: bytes, count: int,
                 start: int = 0, end: int | None = None, head: bytes = b"") -> None:
        self.first = first  #: seq of its first line
        self.time = time
        self.stream = stream  #: index into STREAMS
        self.data = data
        self.count = count
        self.start = start
        self.end = len(data) if end is None else end
        self.head = head  #: no "\n" in it

    @property
    def length(self) -> int:
        """Bytes of its lines."""
        return len(self.head) + self.end - self.start

    @property
    def size(self) -> int:
        """What the block costs against the log's limit (and a follower's backlog):
        its lines, the open line after them that ``data`` also holds, the overhead."""
        return len(self.head) + len(self.data) - self.start + BLOCK_OVERHEAD

    def text(self) -> bytes:
        """Its lines as one bytes object (a copy, made only for a reader)."""
        if not self.head and not self.start and self.end == len(self.data):
            return self.data
        return self.head + self.data[self.start:self.end]

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    def lines(self, after: int = 0) -> Iterator[Line]:
        """Its lines as wire dicts, those with a seq above ``after``."""
        stamp, stream = utc_stamp(self.time), STREAMS[self.stream]
        texts = self.text().split(b"\n")
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
        cut = data.rfind(b"\n") + 1
        if (cut and len(data) - cut <= MAX_LINE_BYTES
                and len(partial) + data.find(b"\n") <= MAX_LINE_BYTES
                and not _has_long_line(data, cut)):
            # NOTE: the common case: whole lines, none too long. The block keeps
            # ``data`` itself; only the open line after them is copied.
            self._partial[stream] = data[cut:]
            return self._add(Block(self._next, now, stream, data, data.count(b"\n", 0, cut),
                                   end=cut, head=partial))
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
        if _has_long_line(data, len(data)):
            data = _cut_long_lines(data)
        return self._add(Block(self._next, now, stream, data, data.count(b"\n")))

    def _add(self, block: Block) -> int:
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
            if excess >= first.length:
                self._blocks.popleft()
                self._bytes -= first.size
                dropped += first.count
                continue
            # NOTE: drop its first lines up to the one that makes room, keep the
            # rest: only its start moves (no copy), and the shorter side is counted.
            data, head = first.data, len(first.head)
            cut = data.find(b"\n", first.start + max(0, excess - 1 - head), first.end) + 1
            if cut - first.start <= (first.end - first.start) // 2:
                gone = data.count(b"\n", first.start, cut)
            else:
                gone = first.count - data.count(b"\n", cut, first.end)
            rest = Block(first.first + gone, first.time, first.stream, data,
                         first.count - gone, cut, first.end)
            self._bytes -= head + cut - first.start
            dropped += gone
            if rest.count:
                self._blocks[0] = rest
            else:
                self._blocks.popleft()
                self._bytes -= rest.size
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


def _has_long_line(data: bytes, end: int) -> bool:
    """True if ``data[:end]`` holds more than MAX_LINE_BYTES bytes without a "\\n":
    each step looks at the next window of MAX_LINE_BYTES + 1 bytes for its last one."""
    pos = 0
    while pos + MAX_LINE_BYTES < end:
        newline = data.rfind(b"\n", pos, pos + MAX_LINE_BYTES + 1)
        if newline < 0:
            return True
        pos = newline + 1
    return False


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
