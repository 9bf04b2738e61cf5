"""The local backend: a process of its own per task, on this machine.

A task process is finished only when two things are known: its pidfd fired
(the process is gone) and the starter reported ``Exited`` (it reaped it and
killed every orphan it left). The outcome is then decided by
:meth:`LocalBackend._outcome`: a final report sent before any kill wins, then
the kill's reason, then the exit code.

Everything here runs on the manager's loop thread: task pipes, pidfds, the
starter's socket and every timer (cancel grace, timeout, SIGTERM→SIGKILL).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
import select
import signal
import sys
import time
from collections import deque
from dataclasses import replace

from supervisor import reaper
from supervisor.backend import Backend, Host, Launch, Registration
from supervisor.backends.local.capture import OutputPipes
from supervisor.backends.local.children import DATA, EOF, ChildProcess, Shape, StarterProcess
from supervisor.consts import CONSTS
from supervisor.errors import describe_exit
from supervisor.linux import PR_SET_CHILD_SUBREAPER, prctl
from supervisor.outcome import Ending, Outcome, OutcomeKind, Usage
from supervisor.protocol import (
    Cancel,
    Exited,
    Finished,
    Note,
    Pong,
    Progress,
    ProtocolError,
    Ready,
    SpawnFailed,
    Start,
    StateChanged,
)
from supervisor.sandbox import DEFAULT_UID_RANGE, DYNAMIC, Sandbox, UidPool, resolve_user
from supervisor.states import TaskState

log = logging.getLogger("housekeeping.supervisor")


class LocalBackend(Backend):
    """Run each task in a process forked by a starter process of this machine.

    Args:
        subreaper: make this process a child subreaper, so that even a daemon
            whose task process and starter were both killed from outside is
            re-parented here and killed. Off by default: it changes the host.
        uid_range: the uids of ``Sandbox(user="dynamic")``, first and last.
    """

    def __init__(self, *, subreaper: bool = False,
                 uid_range: tuple[int, int] = DEFAULT_UID_RANGE) -> None:
        self.subreaper = subreaper
        self._uids = UidPool(*uid_range)
        self._reserved_uid: int | None = None  # taken by can_start for the next start
        self._loop: asyncio.AbstractEventLoop | None = None
        self._preloaded: set[str] = set()  # animator modules the starter imported
        self._preloaded_main: str | None = None  # the main script it imported
        #: what the Preload now being imported holds (None: none is), and the seq
        #: of the ping behind it, whose Pong says the imports are done
        self._preloading: tuple[tuple[str, ...], str | None, int] | None = None
        #: modules and main scripts whose import the starter did not survive: their
        #: tasks import them themselves (else each new starter would die of them)
        self._unpreloadable: set[str] = set()
        self._running: dict[str, ChildProcess] = {}  # by task id
        self._outputs: dict[str, OutputPipes] = {}  # of started tasks, until EOF
        self._by_token: dict[int, ChildProcess] = {}  # every child the starter forked
        self._warm: deque[ChildProcess] = deque()
        self._spawning: set[ChildProcess] = set()
        self._warm_target = CONSTS.warm_processes  # per shape in use
        self._shapes: set[Shape] = set()  # the namespaces of the registered sandboxes
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._starter = StarterProcess()
        self._starter_started = 0.0
        self._starter_failures = 0
        self._starter_fault: str | None = None  # why we killed the starter, if we did
        self._tokens = itertools.count(1)
        #: forks in a row that failed (EAGAIN, ENOMEM), by shape
        self._spawn_failures: dict[Shape, int] = {}
        self._spawn_paused = False  # waiting out the back-off after a failed fork
        self._pings = itertools.count(1)
        self._ping: tuple[int, asyncio.TimerHandle] | None = None  # unanswered ping
        self._ping_sent_at = 0.0  #: time.monotonic() when that ping went out
        #: when the starter last answered a ping that waited (it was busy, with a
        #: Preload say): the reports that queued up meanwhile come one by one
        self._starter_back_at = -1e9
        self._ticker: asyncio.TimerHandle | None = None
        if subreaper:
            prctl(PR_SET_CHILD_SUBREAPER, 1)

    async def open(self, host: Host) -> None:
        self._host = host
        self._loop = asyncio.get_running_loop()
        self._warm_target = min(host.max_workers, CONSTS.warm_processes)
        self._shapes.add(_shape(host.sandbox))
        self._start_starter()
        self._tick()

    # -- the starter and warm processes --------------------------------------

    def _start_starter(self) -> None:
        loop = asyncio.get_running_loop()
        self._starter = StarterProcess()
        self._starter.start()
        self._starter_started = loop.time()
        self._starter_fault = None
        self._spawn_paused = False
        assert self._starter.sock is not None and self._starter.pidfd is not None
        loop.add_reader(self._starter.sock.fileno(), self._on_starter_readable)
        loop.add_reader(self._starter.pidfd, self._on_starter_died)
        if self._preloaded or self._preloaded_main:
            modules = tuple(sorted(self._preloaded))
            self._starter.preload(modules, self._preloaded_main)
            self._ping_after_preload(modules, self._preloaded_main)
        self._replenish()

    def prepare(self, registration: Registration) -> None:
        shape = _shape(registration.sandbox)
        if shape not in self._shapes:
            self._shapes.add(shape)
            self._replenish()
        modules: tuple[str, ...] = () if registration.module is None else (registration.module,)
        if inspect.iscoroutinefunction(registration.animator.execute):
            # NOTE: the starter loads asyncio and uvloop (and OpenSSL with them)
            # only now: they make every fork and exit dearer, for every task.
            modules += ("uvloop",)
        self._preload(modules, registration.main_path)

    def _preload(self, modules: tuple[str, ...], main_path: str | None = None) -> None:
        modules = tuple(module for module in modules
                        if module not in self._preloaded and module not in self._unpreloadable)
        if main_path == self._preloaded_main or main_path in self._unpreloadable:
            main_path = None  # NOTE: one main script per process: imported once
        if not (modules or main_path):
            return
        self._preloaded.update(modules)
        if main_path:
            # NOTE: else each task process imports it (and all it imports) anew:
            # tens of ms per task for a script that imports the supervisor
            self._preloaded_main = main_path
        try:
            self._starter.preload(modules, main_path)
        except (OSError, AssertionError):
            return  # the starter died; its successor preloads every module
        self._ping_after_preload(modules, main_path)
        # NOTE: processes forked before the Preload would import the module
        # at their first task (tens of ms); trade them for fresh ones now.
        for child in list(self._warm) + list(self._spawning):
            self._discard(child, replenish=False)
        self._replenish()

    def _replenish(self) -> None:
        """Keep ``_warm_target`` processes of each shape in use forked ahead of need."""
        if self._stopping or self._starter.sock is None or self._spawn_paused:
            return  # no starter: _on_starter_died starts another, then replenishes
        loop = asyncio.get_running_loop()
        for shape in sorted(self._shapes):
            ahead = sum(1 for c in self._warm if c.shape == shape)
            ahead += sum(1 for c in self._spawning if c.shape == shape)
            for _ in range(self._warm_target - ahead):
                token = next(self._tokens)
                try:
                    output = OutputPipes()
                except OSError as exc:  # NOTE: out of descriptors: as a failed fork
                    self._on_spawn_failed(SpawnFailed(token, f"no pipes: {exc}"), shape)
                    return
                try:
                    sock = self._starter.spawn(token, output, *shape)
                except OSError:
                    output.close()
                    return  # the starter is gone; _on_starter_died restarts it
                child = ChildProcess(sock)
                child.token, child.shape, child.output = token, shape, output
                self._spawning.add(child)
                self._by_token[token] = child
                loop.add_reader(sock.fileno(), self._on_child_readable, child)

    def _on_spawn_failed(self, failed: SpawnFailed, shape: Shape | None = None) -> None:
        """The starter could not fork: forget that process, retry after a back-off.

        The back-off grows with the failures in a row of the process's shape, so
        that a shape that cannot come up (its namespace refused) is not retried
        at the shortest delay because another shape's processes come up fine.
        """
        for child in list(self._spawning):
            if child.token == failed.token:
                shape = child.shape
                self._discard(child, replenish=False)
        key = shape or (False, False)
        failures = self._spawn_failures[key] = self._spawn_failures.get(key, 0) + 1
        delay = min(CONSTS.spawn_retry_max, CONSTS.spawn_retry * 2 ** (failures - 1))
        log.warning("the starter could not fork a task process (%s); retrying in %.2f s",
                    failed.error, delay)
        if not self._spawn_paused:
            self._spawn_paused = True
            asyncio.get_running_loop().call_later(delay, self._resume_spawning)

    def _resume_spawning(self) -> None:
        self._spawn_paused = False
        self._replenish()

    # -- starting and running tasks -----------------------------------------

    def can_start(self, registration: Registration) -> bool:
        shape = _shape(registration.sandbox)
        if not any(child.shape == shape for child in self._warm):
            return False
        if registration.sandbox.user == DYNAMIC and self._reserved_uid is None:
            # NOTE: None when every uid of the range runs a task (here or in another
            # supervisor): the task waits for one to come back.
            self._reserved_uid = self._uids.take()
            return self._reserved_uid is not None
        return True

    def start(self, launch: Launch) -> bool:
        registration = launch.registration
        sandbox = registration.sandbox
        shape = _shape(sandbox)
        uid = gid = None
        if sandbox.user == DYNAMIC:
            uid = gid = self._reserved_uid
            self._reserved_uid = None
            assert uid is not None, "can_start reserves a uid"
        elif sandbox.user is not None:
            # NOTE: before a warm process is taken: a user deleted since the
            # registration fails this task (the host records why), and leaks nothing.
            uid, gid = resolve_user(sandbox.user)
        child = next(c for c in self._warm if c.shape == shape)
        self._warm.remove(child)
        start = Start(
            task_json=launch.task_json,
            animator=registration.pickled,
            sys_path=tuple(sys.path),
            main_path=registration.main_path,
            max_memory=registration.max_memory,
            uid=uid,
            gid=gid,
            max_processes=sandbox.max_processes,
            max_cpu_seconds=sandbox.cpu_rlimit(),
            max_open_files=sandbox.max_open_files,
            no_new_privs=sandbox.confined,
        )
        if sandbox.user == DYNAMIC:
            child.dynamic_uid = uid
        if not self._send(child, start):
            self._discard(child)
            return False
        child.task_id = launch.task_id
        self._capture(child, launch.task_id)
        child.max_memory = registration.max_memory
        child.max_cpu_seconds = sandbox.max_cpu_seconds
        child.started_at = time.monotonic()  # NOTE: uvloop's clock counts milliseconds
        self._running[launch.task_id] = child
        self._idle.clear()
        if registration.timeout is not None:
            child.timers.append(asyncio.get_running_loop().call_later(
                registration.timeout, self._kill, child,
                Outcome(OutcomeKind.TIMEOUT, f"timed out after {registration.timeout:g} s"),
            ))
        log.info("task %s started in process %s", launch.task_id, child.pid)
        # NOTE: after the host recorded ACTIVE, not before (it is on the start path).
        asyncio.get_running_loop().call_soon(self._replenish)
        return True

    def _capture(self, child: ChildProcess, task_id: str) -> None:
        """Read the task process's stdout and stderr into its task's log until EOF."""
        output = child.output
        if output is None:
            self.host.task_output_closed(task_id)
            return
        self._outputs[task_id] = output

        def closed() -> None:
            self._outputs.pop(task_id, None)
            self.host.task_output_closed(task_id)

        output.watch(lambda stream, data: self.host.task_output(task_id, stream, data),
                     closed)

    def _give_up_output(self, task_id: str) -> None:
        """The task ended a while ago, yet a copy of its pipes is still open somewhere
        (passed out of its tree): what comes later is not its output."""
        output = self._outputs.get(task_id)
        if output is not None:
            log.warning("task %s: its output pipes were still open %g s after it ended",
                        task_id, CONSTS.output_grace)
            output.give_up()

    def _send(self, child: ChildProcess, message: object) -> bool:
        """Send to a task process without blocking; False if its pipe is broken."""
        try:
            if child.send(message):
                return True
        except OSError:
            return False
        # NOTE: the pipe is full (a big Start, a process that stopped reading):
        # the rest goes out when it is writable, and the loop never waits.
        if not child.writing:
            child.writing = True
            asyncio.get_running_loop().add_writer(child.sock.fileno(), self._on_writable, child)
        return True

    def _on_writable(self, child: ChildProcess) -> None:
        try:
            done = child.flush()
        except OSError:
            done = True  # the process is gone; its pidfd tells
        if done:
            child.writing = False
            asyncio.get_running_loop().remove_writer(child.sock.fileno())

    def _read(self, child: ChildProcess) -> str:
        """Read one chunk of a task pipe, handle its messages; return what the read saw.

        The messages decoded before a bad frame are applied, then the bad frame
        is the protocol violation that ends the task; nothing after it counts.
        """
        messages, seen, error = child.read_frames()
        for message in messages:
            if not child.reading:
                return EOF  # a message before this one was a violation
            try:
                self._handle(child, message)
            except Exception as exc:  # NOTE: no report may raise on the loop
                log.exception("task process %s: handling %s failed", child.pid,
                              type(message).__name__)
                self._protocol_violation(child, f"{type(exc).__name__} on a report")
        if error is not None:
            self._protocol_violation(child, str(error))
            return EOF
        return seen if child.reading else EOF

    def _on_child_readable(self, child: ChildProcess) -> None:
        if self._read(child) == EOF:
            self._stop_reading(child)

    def _stop_reading(self, child: ChildProcess) -> None:
        if not child.reading:
            return
        child.reading = False
        try:
            asyncio.get_running_loop().remove_reader(child.sock.fileno())
        except (ValueError, OSError):
            pass
        # NOTE: a pipe that ends before Ready: the starter's report decides
        # (SpawnFailed, or Exited: see _on_exited).

    def _handle(self, child: ChildProcess, message: object) -> None:
        """Dispatch one message of a task process by its type."""
        if isinstance(message, Ready):
            self._on_ready(child, message)
            return
        if child.task_id is None:
            self._protocol_violation(child, f"{type(message).__name__} before Start")
            return
        if child.final is not None:
            return  # NOTE: the final report was the task's last word
        if isinstance(message, Finished):
            if not child.killing:
                child.final = message
                # NOTE: a report never ends supervision: the process must
                # still exit, and if it lingers its tree is killed.
                child.timers.append(asyncio.get_running_loop().call_later(
                    CONSTS.exit_grace, self._kill, child, Outcome(
                        OutcomeKind.CRASH,
                        f"the task process had not exited {CONSTS.exit_grace:g} s after it"),
                    CONSTS.cancel_term_grace,
                ))
        elif isinstance(message, Progress | StateChanged | Note):
            error = self.host.task_message(child.task_id, message)
            if error is not None:
                self._protocol_violation(child, error)
        else:
            self._protocol_violation(child, f"unexpected {type(message).__name__}")

    def _on_ready(self, child: ChildProcess, ready: Ready) -> None:
        if child.pid is not None or not isinstance(ready.pid, int):
            self._protocol_violation(child, "a second Ready")
            return
        child.pid = ready.pid
        self._spawn_failures.pop(child.shape, None)
        self._spawning.discard(child)
        try:
            child.pidfd = os.pidfd_open(ready.pid)
        except OSError:
            self._discard(child)
            return
        if ready.init_pid:
            # NOTE: the starter reaps the init only after this process is gone, so
            # the init's pid cannot be reused yet.
            try:
                child.init_pidfd = os.pidfd_open(ready.init_pid)
            except OSError:
                pass
        asyncio.get_running_loop().add_reader(child.pidfd, self._on_child_exited, child)
        self._warm.append(child)
        self.host.backend_changed()

    def _on_child_exited(self, child: ChildProcess) -> None:
        """The pidfd fired: read what the child wrote last, then await the starter."""
        loop = asyncio.get_running_loop()
        assert child.pidfd is not None
        loop.remove_reader(child.pidfd)
        child.exited = True
        child.exited_at = time.monotonic()
        while child.reading and self._read(child) == DATA:
            pass
        self._stop_reading(child)
        if not child.reaped:
            # NOTE: the starter must report it, or be found hung; it nearly
            # always does within a millisecond, so ask only when it has not.
            child.timers.append(loop.call_later(
                CONSTS.exit_report_wait, self._ping_unless_reaped, child))
            if child.init_pidfd is not None:
                child.timers.append(loop.call_later(
                    CONSTS.starter_deadline, self._init_overdue, child))
        self._maybe_finish(child)

    def _ping_unless_reaped(self, child: ChildProcess) -> None:
        if not child.reaped:
            self._send_ping()

    def _init_overdue(self, child: ChildProcess) -> None:
        """The task process exited long ago, yet its init has not reported its namespace
        empty (stopped or traced by something the task left, say): SIGKILL the init;
        the kernel then kills everything in the namespace and the starter reaps it."""
        if child.reaped or child.init_pidfd is None:
            return
        if self._ping is not None:
            # NOTE: the starter itself has not answered yet (busy with a Preload,
            # say): the report may wait there, and a hung starter is found anyway.
            child.timers.append(asyncio.get_running_loop().call_later(
                CONSTS.starter_ping_interval, self._init_overdue, child))
            return
        back = time.monotonic() - self._starter_back_at
        if back < CONSTS.starter_deadline:
            # NOTE: it answers again after a busy spell, but forwards the reports
            # that queued up meanwhile one by one, this one maybe last: the init
            # gets the full deadline from then (else its report, and the task's
            # exit code, could be lost to a kill a few ms before it is read).
            child.timers.append(asyncio.get_running_loop().call_later(
                CONSTS.starter_deadline - back, self._init_overdue, child))
            return
        log.error("task %s: the init of its PID namespace did not report within %g s "
                  "after the task process exited; killing the namespace",
                  child.task_id, CONSTS.starter_deadline)
        try:
            signal.pidfd_send_signal(child.init_pidfd, signal.SIGKILL)
        except OSError:
            pass

    def _on_starter_readable(self) -> None:
        try:
            exited = self._starter.read()
        except ProtocolError as exc:
            log.error("starter: %s", exc)
            return
        if exited is None:
            loop = asyncio.get_running_loop()
            if self._starter.sock is not None:
                loop.remove_reader(self._starter.sock.fileno())
            return
        if isinstance(exited, Pong):
            if self._ping is not None and self._ping[0] == exited.seq:
                self._ping[1].cancel()
                self._ping = None
                now = time.monotonic()
                if now - self._ping_sent_at > CONSTS.exit_report_wait:
                    self._starter_back_at = now
            if self._preloading is not None and self._preloading[2] == exited.seq:
                self._preloading = None  # NOTE: imported, or failed and caught there
            return
        if isinstance(exited, SpawnFailed):
            self._on_spawn_failed(exited)
            return
        self._on_exited(exited)

    def _on_exited(self, exited: Exited) -> None:
        child = self._by_token.get(exited.token)
        if child is None:
            return
        if child.pid is None:
            # NOTE: it died before it said Ready: a failed fork as far as the
            # back-off goes, so that a warm process that cannot come up (say,
            # its namespace cannot be set up) does not become a fork loop.
            self._discard(child, replenish=False)
            self._on_spawn_failed(SpawnFailed(
                exited.token, f"the warm process ended (exit code {exited.exitcode}) "
                "before it was ready"), child.shape)
            return
        child.reaped = True
        child.exitcode = exited.exitcode
        child.usage = _usage(exited.usage)
        self._maybe_finish(child)

    def _maybe_finish(self, child: ChildProcess) -> None:
        """Finish once the process is gone (pidfd) and its tree is gone (starter)."""
        if not (child.exited and child.reaped):
            return
        self._by_token.pop(child.token, None)
        if child.task_id is None:
            self._discard(child)
            return
        self._finish(child)

    def _finish(self, child: ChildProcess) -> None:
        """Report the task's one outcome and free its slot."""
        assert child.task_id is not None
        ending = self._ending(child)
        self._running.pop(child.task_id, None)
        if not self._running:
            self._idle.set()
        child.close()
        output = child.output
        if output is not None and output.open:
            output.drain()  # NOTE: its last lines are in the log when it is terminal
            if output.open:
                asyncio.get_running_loop().call_later(
                    CONSTS.output_grace, self._give_up_output, child.task_id)
        if child.dynamic_uid is not None:
            # NOTE: its tree is gone (the pidfd fired and the starter reaped it).
            self._uids.give_back(child.dynamic_uid)
            child.dynamic_uid = None
        self.host.task_finished(child.task_id, ending)

    def _ending(self, child: ChildProcess) -> Ending:
        """Decide how the task ended: a report before any kill wins, then the kill,
        then the exit status. The report is a claim (of a kind it may claim); the
        limits, the kills and the exit status are the supervisor's own facts."""
        usage = child.usage
        if usage is not None:
            end = child.exited_at if child.exited_at is not None else time.monotonic()
            usage = replace(usage, wall_seconds=max(0.0, end - child.started_at))
        final = child.final
        if final is not None:
            state = TaskState(final.state)  # NOTE: a terminal one: check_report saw to it
            kind = OutcomeKind(final.kind) if final.kind is not None else _claimed(final)
            message = final.reason or ""
            if kind is OutcomeKind.EXCEPTION and final.error_type == "MemoryError" \
                    and child.max_memory:
                kind = OutcomeKind.MEMORY
                message = f"memory limit exceeded (max_memory={child.max_memory} bytes): " \
                          f"{final.reason}"
            notes: tuple[str, ...] = ()
            if child.forced is not None:
                notes = (f"process tree killed after the final report: "
                         f"{child.forced.message}",)
            outcome = Outcome(kind, message, error_type=final.error_type,
                              killed=child.forced is not None).with_exit(child.exitcode)
            result = final.result_json if state is TaskState.SUCCEEDED else None
            return Ending(outcome, result, usage, notes, final.traceback)
        if child.forced is not None:
            return Ending(child.forced.with_exit(child.exitcode), usage=usage)
        limit = child.max_cpu_seconds
        if limit is not None and (child.exitcode == -signal.SIGXCPU or (
                child.exitcode == -signal.SIGKILL and usage is not None
                and usage.cpu_seconds >= limit)):
            # NOTE: the soft limit sends SIGXCPU; a process that ignores it gets
            # SIGKILL at the hard one, with its CPU time at the limit.
            return Ending(Outcome(OutcomeKind.CPU, f"CPU time limit exceeded ({limit:g} s)")
                          .with_exit(child.exitcode), usage=usage)
        hint = ""
        if child.max_memory and child.exitcode is not None and child.exitcode < 0:
            hint = f"possibly the max_memory limit of {child.max_memory} bytes"
        elif limit is not None and child.exitcode == -signal.SIGKILL:
            hint = f"possibly the CPU time limit of {limit:g} s"
        return Ending(Outcome(OutcomeKind.CRASH, describe_exit(child.pid or 0, child.exitcode,
                                                               hint)).with_exit(child.exitcode),
                      usage=usage)

    # -- cancel and kill -----------------------------------------------------

    def cancel(self, task_id: str) -> None:
        child = self._running.get(task_id)
        if child is None:
            return
        self._send(child, Cancel())  # NOTE: if it is exiting, the pidfd tells
        grace = self.host.cancel_grace
        child.timers.append(asyncio.get_running_loop().call_later(
            grace, self._kill, child,
            Outcome(OutcomeKind.CANCELED_KILLED, f"killed after cancel grace period ({grace:g} s)"),
            CONSTS.cancel_term_grace,
        ))

    def kill(self, task_id: str, reason: str) -> None:
        child = self._running.get(task_id)
        if child is not None:
            self._kill(child, Outcome(OutcomeKind.CANCELED_KILLED, reason),
                       CONSTS.cancel_term_grace)

    def _kill(self, child: ChildProcess, outcome: Outcome,
              term_grace: float = CONSTS.term_grace) -> None:
        """Decide the outcome and kill the tree: SIGTERM now, SIGKILL ``term_grace`` later.

        NOTE: a final report does not stop this (it would let a task that
        sends one and lingers switch off its own timeout); the report still
        decides the outcome if it came first.
        """
        if child.killing or child.exited or child.pid is None:
            return
        child.forced = replace(outcome, killed=True)
        log.info("task %s: %s; killing process tree %d", child.task_id, outcome.message,
                 child.pid)
        reaper.signal_tree(child.pid, signal.SIGTERM, child.pidfd)
        child.timers.append(asyncio.get_running_loop().call_later(
            term_grace, self._kill_hard, child,
        ))

    def _kill_hard(self, child: ChildProcess) -> None:
        if not child.exited and child.pid is not None:
            reaper.signal_tree(child.pid, signal.SIGKILL, child.pidfd)

    def _protocol_violation(self, child: ChildProcess, what: str) -> None:
        log.error("task process %s broke the protocol: %s", child.pid, what)
        self._stop_reading(child)
        if child.pid is None:
            self._discard(child)  # NOTE: not even Ready: not ours to wait for
            return
        if child.task_id is None:
            if child.pid is not None and not child.exited:
                reaper.signal_tree(child.pid, signal.SIGKILL, child.pidfd)
            return
        if not child.killing and child.pid is not None:
            # NOTE: also once the process has exited: the bad frame may be read
            # only by the drain after its pidfd fired (it wrote a lot and left at
            # once), and the outcome must still name the protocol error, not say
            # that the process "exited without reporting a result".
            child.forced = Outcome(OutcomeKind.PROTOCOL, f"protocol error: {what}", killed=True)
            child.final = None
            if not child.exited:
                reaper.signal_tree(child.pid, signal.SIGKILL, child.pidfd)

    def _discard(self, child: ChildProcess, replenish: bool = True) -> None:
        """Forget a process that never took (or can no longer take) a task."""
        loop = asyncio.get_running_loop()
        self._spawning.discard(child)
        if child in self._warm:
            self._warm.remove(child)
        if child.pidfd is not None:
            try:
                loop.remove_reader(child.pidfd)
            except (ValueError, OSError):
                pass
            if not child.exited:
                try:
                    signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
                except OSError:
                    pass
        try:
            loop.remove_reader(child.sock.fileno())
        except (ValueError, OSError):
            pass
        self._by_token.pop(child.token, None)
        if child.output is not None and child.task_id is None:
            child.output.close()
        if child.dynamic_uid is not None:
            self._uids.give_back(child.dynamic_uid)  # NOTE: it never ran a task
            child.dynamic_uid = None
        child.close()
        if replenish:
            self._replenish()

    # -- the starter's liveness ----------------------------------------------

    def _tick(self) -> None:
        """Ping the starter every ``starter_ping_interval`` until step 4 of terminate().

        NOTE: it keeps watching while terminate() waits for the tasks: a
        stopped starter must not hold the shutdown up either.
        """
        self._send_ping()
        self._ticker = asyncio.get_running_loop().call_later(
            CONSTS.starter_ping_interval, self._tick)

    def _ping_after_preload(self, modules: tuple[str, ...], main_path: str | None) -> None:
        """Ping right behind a Preload, with ``preload_deadline``: the starter cannot
        answer while it imports (a big library may take seconds), and it answers
        in order, so this Pong says the imports are done."""
        if self._ping is not None:
            self._ping[1].cancel()  # NOTE: its Pong, if it comes, no longer matches
            self._ping = None
        earlier = self._preloading  # NOTE: its imports may not be done either
        if earlier is not None:
            modules, main_path = earlier[0] + modules, main_path or earlier[1]
        self._send_ping(CONSTS.preload_deadline)
        if self._ping is not None:
            self._preloading = (modules, main_path, self._ping[0])

    def _send_ping(self, within: float = CONSTS.starter_deadline) -> None:
        """Ping the starter unless a ping is already out; it has ``within`` seconds."""
        if self._ping is not None or self._starter.sock is None:
            return
        seq = next(self._pings)
        try:
            self._starter.ping(seq)
        except OSError:
            return  # it is gone; its pidfd tells
        deadline = asyncio.get_running_loop().call_later(
            within, self._starter_overdue, seq, within)
        self._ping = (seq, deadline)
        self._ping_sent_at = time.monotonic()

    def _starter_overdue(self, seq: int, within: float) -> None:
        """The starter did not answer in time (stopped, hung): kill its whole tree."""
        # NOTE: an answer may wait unread (the loop itself was held up): read first.
        sock = self._starter.sock
        for _ in range(64):  # NOTE: bounded: an EOF stays readable
            if (self._ping is None or sock is None or sock.fileno() < 0
                    or not select.select([sock], [], [], 0)[0]):
                break
            self._on_starter_readable()
        if self._ping is None or self._ping[0] != seq:
            return
        self._ping = None
        starter = self._starter
        if starter.pid is None:
            return
        self._starter_fault = (
            f"the starter process {starter.pid} did not answer for "
            f"{within:g} s (stopped or hung); it was killed with every "
            "task process tree")
        log.error("%s", self._starter_fault)
        # NOTE: SIGKILL works on a stopped process; descendants first, so that
        # none is re-parented before it is signalled. The pidfd then fires and
        # _on_starter_died fails its tasks and starts another starter.
        reaper.signal_tree(starter.pid, signal.SIGKILL, starter.pidfd)

    # -- the starter's death -------------------------------------------------

    def _unwatch_starter(self) -> StarterProcess:
        """Stop watching the starter's socket and pidfd; return it."""
        loop = asyncio.get_running_loop()
        starter = self._starter
        for fd in (starter.pidfd, starter.sock.fileno() if starter.sock else None):
            if fd is not None:
                try:
                    loop.remove_reader(fd)
                except (ValueError, OSError):
                    pass
        return starter

    def _on_starter_died(self) -> None:
        """The starter is gone: kill what it can no longer clean, start another."""
        loop = asyncio.get_running_loop()
        starter = self._unwatch_starter()
        code = starter.close()
        if self._ping is not None:
            self._ping[1].cancel()
            self._ping = None
        log.error("the starter process died (exit code %s)%s", code,
                  "" if self._stopping else "; restarting it")
        if self._preloading is not None and not self._stopping:
            self._give_up_preload(*self._preloading[:2])
        for child in list(self._warm) + list(self._spawning):
            self._discard(child, replenish=False)
        reason = (self._starter_fault
                  or f"the starter process died (exit code {code}); task process tree killed")
        for child in list(self._running.values()):
            if child.final is None and not child.killing:
                child.forced = Outcome(OutcomeKind.LOST, reason, killed=True)
            child.reaped = True  # nobody else will report it
            if child.pid is not None and not child.exited:
                # NOTE: signal, do not wait: the pidfd says when it is gone.
                reaper.signal_tree(child.pid, signal.SIGKILL, child.pidfd)
        if self.subreaper:
            reaper.kill_adopted(exclude=set())
        # NOTE: a starter that cannot even come up (say, workers fails to
        # import) must not turn into a fork loop: back off, up to 5 s.
        lived = loop.time() - self._starter_started
        self._starter_failures = (0 if lived > CONSTS.starter_stable_after
                                  else self._starter_failures + 1)
        delay = (min(CONSTS.starter_restart_max, 0.1 * (2 ** self._starter_failures))
                 if self._starter_failures > 1 else 0)
        if not self._stopping:
            loop.call_later(delay, self._restart_starter)
        for child in list(self._running.values()):
            self._maybe_finish(child)

    def _give_up_preload(self, modules: tuple[str, ...], main_path: str | None) -> None:
        """The starter died while it imported these: the next one must not (a module
        or script that kills or hangs its importer would take every starter down).
        Their tasks import them themselves, as without a preload."""
        self._preloading = None
        gone = set(modules) | ({main_path} if main_path else set())
        self._unpreloadable |= gone
        self._preloaded -= gone
        if self._preloaded_main in gone:
            self._preloaded_main = None
        log.error("the starter died while it imported %s; tasks import them "
                  "themselves from now on", ", ".join(sorted(gone)))

    def _restart_starter(self) -> None:
        if not self._stopping:
            self._start_starter()

    # -- shutdown ------------------------------------------------------------

    async def shutdown(self) -> None:
        """Steps 2-4 of terminate() for this machine; step 4 runs whatever happens."""
        self._stopping = True
        if self._reserved_uid is not None:
            self._uids.give_back(self._reserved_uid)
            self._reserved_uid = None
        try:
            await self._end_tasks()
        finally:
            await self._stop_starter()

    async def _end_tasks(self) -> None:
        """Steps 2 and 3 of terminate(): tell every task, wait the grace, kill the rest."""
        running = list(self._running.values())
        log.debug("terminate: telling %d children to cancel", len(running))
        for child in running:
            self._send(child, Cancel())
        if self._running:
            try:
                await asyncio.wait_for(self._idle.wait(), self.host.cancel_grace)
            except TimeoutError:
                pass
        # 3. SIGTERM each remaining tree, SIGKILL survivors (descendants first).
        log.debug("terminate: killing %d remaining trees", len(self._running))
        for child in list(self._running.values()):
            self._kill(child, Outcome(OutcomeKind.CANCELED_TERMINATE,
                                      "killed: the manager is terminating"))
        if self._running:
            try:
                await asyncio.wait_for(self._idle.wait(), CONSTS.terminate_slack)
            except TimeoutError:
                log.error("terminate: %d task trees did not end; killing by force",
                          len(self._running))
                for child in list(self._running.values()):
                    if child.pid is not None:
                        reaper.kill_tree(child.pid, timeout=1.0)
                    child.exited = child.reaped = True
                    self._finish(child)

    async def _stop_starter(self) -> None:
        """Step 4 of terminate(): stop the starter (it kills warm processes), close pipes."""
        loop = asyncio.get_running_loop()
        log.debug("terminate: stopping the starter")
        if self._ticker is not None:
            self._ticker.cancel()
        if self._ping is not None:
            self._ping[1].cancel()
            self._ping = None
        starter = self._unwatch_starter()
        starter.request_stop()
        if starter.pidfd is not None:
            exited = asyncio.Event()
            loop.add_reader(starter.pidfd, exited.set)
            try:
                await asyncio.wait_for(exited.wait(), CONSTS.starter_stop_timeout)
            except TimeoutError:
                log.error("terminate: the starter did not stop; killing its tree")
                if starter.pid is not None:
                    reaper.kill_tree(starter.pid)
            loop.remove_reader(starter.pidfd)
        starter.close()
        for child in list(self._warm) + list(self._spawning) + list(self._by_token.values()):
            for fd in (child.pidfd, child.sock.fileno()):
                if fd is not None and fd >= 0:
                    try:
                        loop.remove_reader(fd)
                    except (ValueError, OSError):
                        pass
            child.close()
            if child.output is not None and child.task_id is None:
                child.output.close()
        for output in list(self._outputs.values()):
            output.give_up()  # NOTE: every tree is gone; what they wrote is read first
        self._warm.clear()
        self._spawning.clear()
        self._by_token.clear()
        if self.subreaper:
            reaper.kill_adopted(exclude=set())

    def kill_everything(self) -> None:
        """Kill every task tree and the starter's tree."""
        for child in list(self._by_token.values()):
            if child.pid is not None and not child.exited:
                reaper.kill_tree(child.pid, timeout=1.0)
        if self._starter.pid is not None:
            reaper.kill_tree(self._starter.pid, timeout=1.0)
        self._starter.close()


def _claimed(final: Finished) -> OutcomeKind:
    """The kind a final report without one stands for."""
    if final.state == TaskState.SUCCEEDED.value:
        return OutcomeKind.RETURNED
    if final.state == TaskState.CANCELED.value:
        return OutcomeKind.CANCELED_HONOURED
    return OutcomeKind.EXCEPTION if final.error_type else OutcomeKind.FAILED_BY_ANIMATOR


def _usage(figures: object) -> Usage | None:
    """The usage in a starter's ``Exited`` (wall time to be filled in), if well-formed."""
    if not (isinstance(figures, tuple) and len(figures) == 3):
        return None
    user, system, rss = figures
    try:
        return Usage.from_wire({"cpuUserSeconds": user, "cpuSystemSeconds": system,
                                "maxRssBytes": rss, "wallSeconds": 0.0})
    except ValueError:
        return None


def _shape(sandbox: Sandbox) -> Shape:
    """The namespaces a warm process of ``sandbox`` is forked into."""
    return (bool(sandbox.private_pids), sandbox.private_network)
