"""The starter: a small single-threaded process that forks every task process.

The parent runs threads (its event loop, a web server), and forking a
threaded process is unsafe, so the parent starts this process once with a
fresh interpreter (``subprocess``, i.e. fork + exec) and asks it for warm
processes over a ``SOCK_SEQPACKET`` socket, passing each one's pipe end with
``SCM_RIGHTS``. The starter:

* forks warm processes on request (``Spawn``) after ``gc.freeze()``, with the
  animator modules already imported (``Preload``); with ``private_pids`` the
  warm process is forked by the init of a PID namespace of its own
  (``workers.pid1``), which the starter forks once and reuses for one task
  after another (its own later forks stay in its namespace: ``setns`` back);
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
from dataclasses import dataclass

from supervisor.linux import (
    CLONE_NEWNET,
    CLONE_NEWPID,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_PDEATHSIG,
    children_of,
    descendants_of,
    loopback_up,
    prctl,
    setns,
    unshare,
    warm_up,
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
from workers.child import import_main, imports_for_tasks, prepare_output, run_warm_process
from workers.pid1 import run_init

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


@dataclass
class _Known:
    """A direct child of the starter: a warm (or task) process, or a namespace's init."""

    token: int  #: the Spawn it serves (for an init: its task process now; 0 when idle)
    init: socket.socket | None = None  #: an init's control socket
    private_network: bool = False  #: an init's namespace has a network of its own
    generation: int = 0  #: the Preloads the starter had made when it forked this init


class Starter:
    """The starter's state: its socket, its known children, its reaping."""

    def __init__(self, sock: socket.socket, private_fds: tuple[int, ...] = ()) -> None:
        self.sock = sock
        self.private_fds = private_fds  #: closed in every forked child
        self.known: dict[int, _Known] = {}
        self.exits: list[Exited] = []
        self.selector: selectors.BaseSelector | None = None  #: watches the inits' sockets
        self._own_pid_namespace: int | None = None
        self.preloads = 0  #: Preloads so far: an init forked before one lacks its modules

    def spawn(self, request: Spawn, fds: list[int]) -> None:
        """Fork one warm process on ``fds`` (its pipe end, then the write ends of its
        stdout and stderr); report a failed fork, never die of it."""
        try:
            if request.private_pids:
                self._spawn_in_namespace(request, fds)
                return
            pid = os.fork()
        except OSError as exc:
            # NOTE: EAGAIN or ENOMEM (a task may exhaust the process limit); the
            # parent retries with back-off, and the tasks running now go on.
            self.send(SpawnFailed(request.token, f"{type(exc).__name__}: {exc}"))
            return
        finally:
            if request.private_pids:
                _close(fds)
        if pid == 0:
            code = 70
            try:
                self._become_child()
                if request.private_network:
                    unshare(CLONE_NEWNET)
                    loopback_up()
                code = run_warm_process(*fds)
            finally:
                os._exit(code)
        _close(fds)
        self.known[pid] = _Known(request.token)

    def _spawn_in_namespace(self, request: Spawn, fds: list[int]) -> None:
        """Hand ``fds`` to an idle init of the right kind (made now if there is none).

        NOTE: an init is PID 1 of a namespace that outlives its tasks: it forks
        one warm process at a time and empties the namespace after each, so
        that no namespace is made (or torn down) per task.
        """
        pid = next((pid for pid, known in self.known.items()
                    if known.init is not None and known.token == 0
                    and known.private_network == request.private_network
                    and known.generation == self.preloads), None)
        if pid is None:
            pid = self._new_init(request.private_network, fds)
        known = self.known[pid]
        assert known.init is not None
        socket.send_fds(known.init, [encode(Spawn(request.token))], fds)
        known.token = request.token

    def _new_init(self, private_network: bool, pending: list[int]) -> int:
        """Fork the init of a new PID namespace; return its pid (``pending``: fds the
        init must not keep; it gets its own copies with its first Spawn)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            if self._own_pid_namespace is None:
                self._own_pid_namespace = os.open("/proc/self/ns/pid",
                                                  os.O_RDONLY | os.O_CLOEXEC)
            unshare(CLONE_NEWPID)  # NOTE: only the next fork enters it (as its PID 1)
            try:
                pid = os.fork()
            except OSError:
                setns(self._own_pid_namespace, CLONE_NEWPID)
                raise
        except OSError:
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            code = 70
            try:
                self._become_child()
                ours.close()
                _close(pending)
                code = run_init(theirs, private_network)
            finally:
                os._exit(code)
        # NOTE: never in the child: it cannot go back, and must not.
        setns(self._own_pid_namespace, CLONE_NEWPID)
        theirs.close()
        ours.setblocking(False)  # NOTE: the starter never waits on an init
        self.known[pid] = _Known(0, ours, private_network, self.preloads)
        if self.selector is not None:
            self.selector.register(ours, selectors.EVENT_READ, pid)
        return pid

    def _become_child(self) -> None:
        """In a forked child: drop the starter's signal handling and descriptors."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        self.sock.close()
        if self.selector is not None:
            self.selector.close()  # NOTE: a task must not reach the starter's epoll
        for private in self.private_fds:
            os.close(private)
        for known in self.known.values():
            if known.init is not None:
                known.init.close()
        if self._own_pid_namespace is not None:
            os.close(self._own_pid_namespace)

    def on_init_report(self, pid: int) -> None:
        """An init reported its task process gone and its namespace empty (``Exited``), or
        its fork failed (``SpawnFailed``): pass it on, mark the init idle."""
        known = self.known.get(pid)
        if known is None or known.init is None:
            return
        message: object = None
        try:
            data = known.init.recv(1 << 12)
            if data:
                message = decode(data)
        except BlockingIOError:
            return  # NOTE: nothing there after all
        except OSError:
            data = b""
        except ProtocolError:
            pass
        if not data:
            self._forget_init(known)  # NOTE: it is exiting; reap() reports it
            return
        # NOTE: only for the task it runs (a task may not speak for another).
        if not (isinstance(message, Exited | SpawnFailed) and known.token
                and message.token == known.token):
            return
        known.token = 0
        if known.generation != self.preloads:
            self._forget_init(known)  # NOTE: EOF tells it to exit
        if isinstance(message, SpawnFailed):
            self.send(SpawnFailed(message.token, message.error[:300]))
        else:
            self.send(Exited(pid, message.exitcode, message.token, message.usage))

    def _unread_exit(self, known: _Known) -> Exited | None:
        """The init's ``Exited`` still unread on its socket, if any."""
        assert known.init is not None
        for _ in range(8):  # NOTE: bounded; an init sends one report per task
            try:
                data = known.init.recv(1 << 12)
                message = decode(data) if data else None
            except (OSError, ProtocolError):
                return None
            if message is None:
                return None
            if isinstance(message, Exited) and message.token == known.token:
                return message
        return None

    def retire_inits(self) -> None:
        """After a Preload: idle inits exit now, busy ones after their task (they would
        fork task processes without the new modules, importing them at every task)."""
        self.preloads += 1
        for known in self.known.values():
            if known.init is not None and known.token == 0:
                self._forget_init(known)

    def _forget_init(self, known: _Known) -> None:
        if known.init is None:
            return
        if self.selector is not None:
            try:
                self.selector.unregister(known.init)
            except (KeyError, ValueError):
                pass
        known.init.close()
        known.init = None

    def reap(self) -> None:
        """Reap every child that exited; kill the orphans of task processes."""
        reaped_known = False
        while True:
            try:
                pid, status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            known = self.known.pop(pid, None)
            if known is not None:
                # NOTE: the task process and what it reaped, or an init and
                # everything it reaped (the task's whole namespace)
                exited = Exited(pid, _exitcode(status), known.token,
                                (rusage.ru_utime, rusage.ru_stime, rusage.ru_maxrss * 1024))
                if known.init is not None and known.token:
                    # NOTE: an init that reported, then died (killed as overdue,
                    # say): its report has the task process's own exit code.
                    reported = self._unread_exit(known)
                    if reported is not None:
                        exited = Exited(pid, reported.exitcode, known.token, reported.usage)
                self._forget_init(known)
                if known.token:  # NOTE: an idle init has no task to report
                    self.exits.append(exited)
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
        for known in self.known.values():
            self._forget_init(known)
        self.known.clear()

    def _wait(self, pid: int) -> None:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _exitcode(status: int) -> int:
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def serve(sock: socket.socket, parent: int) -> int:
    """Answer the parent's requests until Stop, EOF or SIGTERM."""
    wake_r, wake_w = os.pipe()
    starter = Starter(sock, (wake_r, wake_w))
    os.set_blocking(wake_w, False)
    stopping: list[bool] = []

    def install_signals() -> None:
        """The starter's signal handling (again after a Preload: the code it imported,
        a main script's top level say, may have changed it)."""
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda s, f: None)
        signal.signal(signal.SIGTERM, lambda s, f: stopping.append(True))
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    install_signals()
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    if os.getppid() != parent:
        return EXIT_ORPHANED
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    starter.selector = selector
    try:
        while not stopping:
            for key, _ in selector.select():
                if key.fileobj is sock:
                    preloads = starter.preloads
                    if not _handle_request(starter, sock):
                        return EXIT_OK
                    if starter.preloads != preloads:
                        install_signals()
                elif key.fileobj == wake_r:
                    os.read(wake_r, 4096)
                    starter.reap()
                else:
                    starter.on_init_report(key.data)
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
    if isinstance(message, Spawn) and len(fds) == 3:
        starter.spawn(message, fds)
    else:
        _close(fds)
    if isinstance(message, Ping):
        starter.send(Pong(message.seq))
    elif isinstance(message, Preload):
        if message.sys_path:
            sys.path[:] = list(message.sys_path)
        with imports_for_tasks():
            for name in message.modules:
                try:
                    importlib.import_module(name)
                except BaseException:  # a bad module fails its own tasks, not the starter
                    pass
            if message.main_path:
                try:
                    import_main(message.main_path)
                except BaseException:  # NOTE: each task then tries again, and fails with why
                    pass
        # NOTE: move what the imports made out of the collector's sight, so
        # that forks do not copy pages when a collection touches them.
        gc.collect()
        gc.freeze()
        starter.retire_inits()
    elif isinstance(message, Stop):
        return False
    return True


def main() -> int:
    """Entry point: ``python -c 'from workers.starter import main; main()' FD PARENT``."""
    fd, parent = int(sys.argv[1]), int(sys.argv[2])
    sock = socket.socket(fileno=fd)
    warm_up()
    prepare_output()
    gc.freeze()
    return serve(sock, parent)


if __name__ == "__main__":
    sys.exit(main())
