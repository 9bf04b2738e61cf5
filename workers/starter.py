"""The starter: a small single-threaded process that forks every task process.

The parent runs threads (its event loop, a web server), and forking a
threaded process is unsafe, so the parent starts this process once with a
fresh interpreter (``subprocess``, i.e. fork + exec) and asks it for warm
processes over a ``SOCK_SEQPACKET`` socket, passing each one's pipe end with
``SCM_RIGHTS``. The starter:

* forks warm processes on request (``Spawn``) after ``gc.freeze()``, with the
  animator modules already imported (``Preload``);
* is a child subreaper: when a task process dies, whatever it left behind is
  re-parented here, and since every direct child of the starter is known,
  any other child is such an orphan and is killed at once, before the
  starter reports ``Exited`` -- so ``Exited`` means the whole tree is gone;
* dies with the supervisor: ``PR_SET_PDEATHSIG`` (SIGTERM) and EOF on its
  socket both make it kill everything below it and exit.
"""

from __future__ import annotations

import gc
import importlib
import os
import selectors
import signal
import socket
import sys

from supervisor.linux import (
    PR_SET_CHILD_SUBREAPER,
    PR_SET_PDEATHSIG,
    children_of,
    descendants_of,
    prctl,
)
from supervisor.protocol import (
    Exited,
    Ping,
    Pong,
    Preload,
    ProtocolError,
    Spawn,
    SpawnFailed,
    Stop,
    decode,
    encode,
)
from workers.child import run_warm_process

EXIT_OK = 0  # stopped on request or because the supervisor went away
EXIT_ORPHANED = 3  # the supervisor was already gone when the starter came up


def _kill(pids: list[int]) -> None:
    # NOTE: descendants first, so that no parent among them reacts to a
    # child's death by starting another one.
    for pid in reversed(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class ParentGone(Exception):
    """The supervisor closed its end of the socket: time to clean up and go."""


class Starter:
    """The starter's state: its socket, its known children, its reaping."""

    def __init__(self, sock: socket.socket, private_fds: tuple[int, ...] = ()) -> None:
        self.sock = sock
        self.private_fds = private_fds  #: closed in every forked child
        self.known: set[int] = set()
        self.exits: list[Exited] = []

    def spawn(self, fd: int, token: int = 0) -> None:
        """Fork one warm process on pipe end ``fd``; report a failed fork, never die of it."""
        try:
            pid = os.fork()
        except OSError as exc:
            # NOTE: EAGAIN or ENOMEM (a task may exhaust the process limit); the
            # parent retries with back-off, and the tasks running now go on.
            os.close(fd)
            self.send(SpawnFailed(token, f"{type(exc).__name__}: {exc}"))
            return
        if pid == 0:
            code = 70
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_DFL)
                self.sock.close()
                for private in self.private_fds:
                    os.close(private)
                code = run_warm_process(fd)
            finally:
                os._exit(code)
        os.close(fd)
        self.known.add(pid)

    def reap(self) -> None:
        """Reap every child that exited; kill the orphans of task processes."""
        reaped_known = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in self.known:
                self.known.discard(pid)
                self.exits.append(Exited(pid, _exitcode(status)))
                reaped_known = True
        if reaped_known:
            self.kill_orphans()
        exits, self.exits = self.exits, []
        for exited in exits:
            self.send(exited)

    def send(self, message: object) -> None:
        """Send one report to the parent."""
        try:
            self.sock.send(encode(message))
        except OSError:
            raise ParentGone() from None

    def kill_orphans(self) -> None:
        """Kill and reap every child that is not a task process of ours."""
        me = os.getpid()
        for _ in range(1000):
            strangers = [c for c in children_of(me) if c not in self.known]
            if not strangers:
                return
            for pid in strangers:
                _kill([pid, *descendants_of(pid)])
            for pid in strangers:
                self._wait(pid)

    def kill_all(self) -> None:
        """Kill everything below the starter and reap it."""
        me = os.getpid()
        for _ in range(1000):
            below = descendants_of(me)
            if not below:
                break
            _kill(below)
            for pid in children_of(me):
                self._wait(pid)
        self.known.clear()

    def _wait(self, pid: int) -> None:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _exitcode(status: int) -> int:
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def serve(sock: socket.socket, parent: int) -> int:
    """Answer the parent's requests until Stop, EOF or SIGTERM."""
    wake_r, wake_w = os.pipe()
    starter = Starter(sock, (wake_r, wake_w))
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    stopping: list[bool] = []
    signal.signal(signal.SIGCHLD, lambda s, f: None)
    signal.signal(signal.SIGTERM, lambda s, f: stopping.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    if os.getppid() != parent:
        return EXIT_ORPHANED
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    try:
        while not stopping:
            for key, _ in selector.select():
                if key.fileobj is sock:
                    if not _handle_request(starter, sock):
                        return EXIT_OK
                else:
                    os.read(wake_r, 4096)
                    starter.reap()
        return EXIT_OK
    except ParentGone:
        return EXIT_OK
    finally:
        starter.kill_all()


def _handle_request(starter: Starter, sock: socket.socket) -> bool:
    """Handle one request; False means stop."""
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 4)
    except ConnectionResetError:
        return False  # the manager is gone, as with EOF
    if not data:
        return False
    try:
        message = decode(data)
    except ProtocolError:
        message = None  # the parent is ours; nothing else can write here
    if isinstance(message, Spawn):
        for fd in fds:
            starter.spawn(fd, message.token)
    else:
        for fd in fds:
            os.close(fd)
    if isinstance(message, Ping):
        starter.send(Pong(message.seq))
    elif isinstance(message, Preload):
        if message.sys_path:
            sys.path[:] = list(message.sys_path)
        for name in message.modules:
            try:
                importlib.import_module(name)
            except BaseException:  # a bad module fails its own tasks, not the starter
                pass
        # NOTE: move what the imports made out of the collector's sight, so
        # that forks do not copy pages when a collection touches them.
        gc.collect()
        gc.freeze()
    elif isinstance(message, Stop):
        return False
    return True


def main() -> int:
    """Entry point: ``python -c 'from workers.starter import main; main()' FD PARENT``."""
    fd, parent = int(sys.argv[1]), int(sys.argv[2])
    sock = socket.socket(fileno=fd)
    gc.freeze()
    return serve(sock, parent)


if __name__ == "__main__":
    sys.exit(main())
