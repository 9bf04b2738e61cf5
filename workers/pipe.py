"""The task process's end of its pipe: whole frames, written and read blocking.

The frame is the protocol's (:data:`supervisor.protocol.FRAME_HEADER`, then
the payload), the format of ``multiprocessing.connection``. This is not that
module on purpose: it imports ``hmac`` and with it OpenSSL's libcrypto, and
every mapping in the starter is copied at each fork and torn down at each
exit (measured: a starter without OpenSSL and asyncio forks and reaps a
process in half the CPU time).
"""

from __future__ import annotations

import os
import select
from typing import Protocol

from supervisor.protocol import FRAME_HEADER, MAX_MESSAGE_BYTES


class Pipe(Protocol):
    """What :class:`~workers.TaskOps` needs of its transport: whole frames each way
    (:class:`TaskPipe` in a task process; an in-memory one in ``workers.testing``)."""

    def fileno(self) -> int: ...
    def send_bytes(self, payload: bytes) -> None: ...
    def recv_bytes(self) -> bytes: ...
    def poll(self, timeout: float = 0.0) -> bool: ...
    def close(self) -> None: ...


class TaskPipe:
    """Blocking, whole-frame reads and writes on a connected socket or pipe."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        """The descriptor.

        Raises:
            OSError: the pipe is closed.
        """
        if self._fd < 0:
            raise OSError("the task pipe is closed")
        return self._fd

    def send_bytes(self, payload: bytes) -> None:
        """Write one frame, all of it (a short write goes on where it stopped)."""
        view = memoryview(FRAME_HEADER.pack(len(payload)) + payload)
        fd = self.fileno()
        while view:
            view = view[os.write(fd, view):]

    def recv_bytes(self) -> bytes:
        """Read one frame's payload.

        Raises:
            EOFError: the other end closed the pipe.
            OSError: the frame is larger than the protocol allows, or a read failed.
        """
        (size,) = FRAME_HEADER.unpack(self._read(FRAME_HEADER.size))
        if not 0 <= size <= MAX_MESSAGE_BYTES:
            raise OSError(f"a frame of {size} bytes")
        return self._read(size)

    def poll(self, timeout: float = 0.0) -> bool:
        """True when a read would not block (data, or the other end closed)."""
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def close(self) -> None:
        """Close the descriptor (again: nothing)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _read(self, size: int) -> bytes:
        parts: list[bytes] = []
        fd = self.fileno()
        while size:
            chunk = os.read(fd, size)
            if not chunk:
                raise EOFError("the task pipe was closed")
            parts.append(chunk)
            size -= len(chunk)
        return b"".join(parts)
