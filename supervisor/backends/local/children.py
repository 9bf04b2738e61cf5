"""The parent's handles on its helper processes: the starter and each task process.

::

    Manager (threads: callers, loop)          starter (1 thread)        task process
    ─────────────────────────────────         ──────────────────        ────────────
    StarterProcess ── SEQPACKET socket ──────▶ fork on Spawn ──fork──▶ Ready, waits
                    ◀── Exited(pid, code) ───  reaps, kills orphans
    ChildProcess ──────── socketpair (fd passed with SCM_RIGHTS) ─────▶ Start / Cancel
                 ◀─────── Progress, StateChanged, Note, Finished ──────
                 pidfd: readable when the task process has exited

Frames on a task pipe use ``multiprocessing.connection``'s format (a 4-byte
big-endian length, then the payload), so the child can use a plain
``Connection``. The parent reads them without ever blocking: a child that
writes half a frame, or garbage, must not stall the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

from supervisor.backends.local.capture import OutputPipes
from supervisor.protocol import (
    FRAME_HEADER,
    MAX_MESSAGE_BYTES,
    Exited,
    Finished,
    Ping,
    Pong,
    Preload,
    ProtocolError,
    Spawn,
    SpawnFailed,
    Stop,
    check_report,
    decode,
    encode,
    frame,
)

if TYPE_CHECKING:
    from supervisor.outcome import Outcome, Usage

log = logging.getLogger("housekeeping.children")

DATA, EMPTY, EOF = "data", "empty", "eof"  #: what one read of a task pipe saw
#: The namespaces a warm process is forked into: (private_pids, private_network).
Shape = tuple[bool, bool]
_STARTER_BOOT = (
    "import sys, json; sys.path[:] = json.loads(sys.argv[3]); "
    "from workers.starter import main; sys.exit(main())"
)


class StarterProcess:
    """The parent's side of the starter: start it, ask it to fork, hear of exits."""

    def __init__(self) -> None:
        self.popen: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.pidfd: int | None = None

    @property
    def pid(self) -> int | None:
        """The starter's pid, once started."""
        return self.popen.pid if self.popen else None

    def start(self) -> None:
        """Start the starter with a fresh interpreter (fork + exec: safe with threads)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", _STARTER_BOOT, str(theirs.fileno()),
                 str(os.getpid()), json.dumps(sys.path)],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            theirs.close()
        self.sock = ours
        self.pidfd = os.pidfd_open(self.popen.pid)

    def spawn(self, token: int, output: OutputPipes, private_pids: bool = False,
              private_network: bool = False) -> socket.socket:
        """Ask for one warm process; return the parent's end of its pipe.

        ``token`` comes back in a :class:`SpawnFailed` if the fork fails, and
        in the :class:`Exited` of the process. The write ends of ``output``
        become its stdout and stderr.
        """
        assert self.sock is not None
        parent_end, child_end = socket.socketpair()
        request = Spawn(token, private_pids, private_network)
        try:
            socket.send_fds(self.sock, [encode(request)],
                            [child_end.fileno(), *output.write_fds])
        except OSError:
            parent_end.close()
            raise
        finally:
            child_end.close()
        output.handed_over()
        # NOTE: never blocking, in both directions: a task process that stops
        # reading (or is stopped) must not stall the loop, nor a half frame.
        parent_end.setblocking(False)
        return parent_end

    def ping(self, seq: int) -> None:
        """Ask the starter to answer ``Pong(seq)`` (its liveness check)."""
        assert self.sock is not None
        self.sock.send(encode(Ping(seq)))

    def preload(self, modules: tuple[str, ...], main_path: str | None = None) -> None:
        """Have the starter import animator modules (and the main script), so later
        forks inherit them."""
        assert self.sock is not None
        self.sock.send(encode(Preload(modules, tuple(sys.path), main_path)))

    def read(self) -> Exited | SpawnFailed | Pong | None:
        """Read one report; None means the starter closed its socket."""
        assert self.sock is not None
        try:
            data = self.sock.recv(1 << 16)
        except OSError:
            return None
        if not data:
            return None
        message = decode(data)
        if not isinstance(message, Exited | SpawnFailed | Pong):
            raise ProtocolError(f"unexpected message from the starter: {message!r}"[:200])
        return message

    def request_stop(self) -> None:
        """Ask the starter to kill everything below it and exit."""
        if self.sock is not None:
            try:
                self.sock.send(encode(Stop()))
            except OSError:
                pass

    def close(self) -> int | None:
        """Reap the (exited or killed) starter and close its descriptors."""
        code = None
        if self.popen is not None:
            try:
                code = self.popen.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                code = self.popen.wait()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        return code


class ChildProcess:
    """One task process as the parent sees it: its pipe, pidfd and fate."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.outbox = bytearray()  #: frames not yet taken by the pipe
        self.writing = False  #: the loop waits for the pipe to take :attr:`outbox`
        self.token = 0  #: names this process's Spawn request to the starter
        self.shape: Shape = (False, False)  #: the namespaces it was forked into
        self.dynamic_uid: int | None = None  #: taken from the pool for its task
        self.max_cpu_seconds: float | None = None
        self.reading = True  #: False after EOF or a protocol error
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.init_pidfd: int | None = None  #: of the init in front of it, in a PID namespace
        self.task_id: str | None = None
        self.final: Finished | None = None  #: the child's final report, if any
        self.forced: Outcome | None = None  #: outcome chosen by a kill
        self.started_at = 0.0  #: time.monotonic() of the hand-over
        self.exited_at: float | None = None  #: time.monotonic() when its pidfd fired
        self.usage: Usage | None = None  #: its reaper's rusage (wall time still 0)
        self.exited = False  #: the pidfd said the process is gone
        self.reaped = False  #: the starter reaped it and killed its orphans
        self.exitcode: int | None = None
        self.timers: list[asyncio.TimerHandle] = []
        self.max_memory: int | None = None
        self.output: OutputPipes | None = None  #: its stdout and stderr

    @property
    def killing(self) -> bool:
        """True once the supervisor decided to kill this tree."""
        return self.forced is not None

    def send(self, message: object) -> bool:
        """Queue one frame and write what the pipe takes now, never blocking.

        Returns:
            True if everything queued is written; False if some waits in
            :attr:`outbox` (the caller writes it with :meth:`flush` once the
            pipe is writable).

        Raises:
            OSError: the pipe is broken (the process is gone).
        """
        self.outbox += frame(message)
        return self.flush()

    def flush(self) -> bool:
        """Write as much of :attr:`outbox` as the pipe takes now; True when it is empty."""
        while self.outbox:
            try:
                sent = self.sock.send(self.outbox)
            except (BlockingIOError, InterruptedError):
                return False
            del self.outbox[:sent]
        return True

    def read_frames(self) -> tuple[list[object], str, ProtocolError | None]:
        """Read one chunk without blocking.

        Returns:
            The whole messages read, what the read saw (``DATA``, ``EMPTY`` --
            nothing there now -- or ``EOF``), and the protocol error that ended
            the parse, if any (the messages before it still count). A caller
            draining the pipe stops at EMPTY too: a grandchild holding a copy
            of the pipe open must not keep it waiting for an EOF.
        """
        seen = DATA
        try:
            data = self.sock.recv(1 << 16)
            if not data:
                seen = EOF
            self.buffer += data
        except (BlockingIOError, InterruptedError):
            seen = EMPTY
        except OSError:
            seen = EOF
        messages: list[object] = []
        buffer, offset = self.buffer, 0
        try:
            while len(buffer) - offset >= FRAME_HEADER.size:
                (size,) = FRAME_HEADER.unpack_from(buffer, offset)
                if size < 0 or size > MAX_MESSAGE_BYTES:
                    raise ProtocolError(f"bad frame length {size}")
                end = offset + FRAME_HEADER.size + size
                if len(buffer) < end:
                    break
                frame = bytes(buffer[offset + FRAME_HEADER.size:end])
                messages.append(check_report(decode(frame)))
                offset = end
        except Exception as exc:  # NOTE: whatever a frame does, it never raises on the loop
            buffer.clear()
            if not isinstance(exc, ProtocolError):
                exc = ProtocolError(f"bad frame: {type(exc).__name__}: {exc}"[:300])
            return messages, seen, exc
        # NOTE: one cut per read, not per frame (a chunk may hold thousands).
        del buffer[:offset]
        return messages, seen, None

    def close(self) -> None:
        """Close the pipe and the pidfd; cancel timers."""
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()
        if self.writing:
            self.writing = False
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_writer(self.sock.fileno())
        self.sock.close()
        for fd in (self.pidfd, self.init_pidfd):
            if fd is not None:
                os.close(fd)
        self.pidfd = self.init_pidfd = None
