"""The pipes that carry a task process's stdout and stderr to the manager's loop.

Made with each warm process, before any task needs it: the write ends go to
the starter with the ``Spawn`` (the warm process makes them its fd 1 and 2,
and everything it starts inherits them), the read ends stay here, and the
loop reads them only once the process runs a task. Reading never blocks
(``O_NONBLOCK``), and each wake-up takes what the pipe holds, up to
:data:`READ_BYTES` a stream, so a task writing as fast as it can waits at
most one loop iteration for room.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable

from supervisor.tasklog import STREAMS

READ_BYTES = 256 * 1024  #: per read; also the pipes' size (F_SETPIPE_SZ) where allowed
_READS_PER_WAKE = 4  #: bounded, so that one busy task cannot hold the loop


class OutputPipes:
    """The stdout and stderr pipes of one task process."""

    def __init__(self) -> None:
        self.read_fds: list[int | None] = []
        self.write_fds: list[int] = []
        try:
            for _ in STREAMS:
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                self.read_fds.append(read_end)
                self.write_fds.append(write_end)
                os.set_blocking(read_end, False)
                with contextlib.suppress(OSError):  # NOTE: a user's pipe quota may refuse
                    fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, READ_BYTES)
        except OSError:
            self.close()
            raise
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_data: Callable[[str, bytes], None] | None = None
        self._on_closed: Callable[[], None] | None = None

    def handed_over(self) -> None:
        """The starter has its copies of the write ends: close ours (else no EOF)."""
        for fd in self.write_fds:
            os.close(fd)
        self.write_fds.clear()

    def watch(self, on_data: Callable[[str, bytes], None],
              on_closed: Callable[[], None]) -> None:
        """Read both pipes on the running loop: ``on_data(stream, bytes)`` for what
        comes, ``on_closed()`` once, when both reached EOF (or :meth:`give_up`)."""
        self._loop = asyncio.get_running_loop()
        self._on_data, self._on_closed = on_data, on_closed
        for index, fd in enumerate(self.read_fds):
            if fd is not None:
                self._loop.add_reader(fd, self._readable, index)

    @property
    def open(self) -> bool:
        """True while a pipe may still carry output."""
        return any(fd is not None for fd in self.read_fds)

    def _readable(self, index: int) -> None:
        fd = self.read_fds[index]
        assert fd is not None and self._on_data is not None
        for _ in range(_READS_PER_WAKE):
            try:
                data = os.read(fd, READ_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._close_one(index)
                return
            self._on_data(STREAMS[index], data)
            if len(data) < READ_BYTES:
                return  # NOTE: the pipe is (almost surely) empty now

    def drain(self) -> None:
        """Read what the pipes hold now (before giving up on them)."""
        for index, fd in enumerate(self.read_fds):
            if fd is not None and self._on_data is not None:
                self._readable(index)

    def give_up(self) -> None:
        """Stop reading even though a pipe is still open (a process outside the task's
        tree may hold a copy: its output no longer counts)."""
        self.drain()
        for index in range(len(self.read_fds)):
            self._close_one(index)

    def _close_one(self, index: int) -> None:
        fd = self.read_fds[index]
        if fd is None:
            return
        self.read_fds[index] = None
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(fd)
        os.close(fd)
        if not self.open and self._on_closed is not None:
            on_closed, self._on_closed = self._on_closed, None
            on_closed()

    def close(self) -> None:
        """Close every descriptor without reporting (the process never ran a task)."""
        self._on_closed = None
        for index in range(len(self.read_fds)):
            self._close_one(index)
        for fd in self.write_fds:
            os.close(fd)
        self.write_fds.clear()
