"""Timing knobs of the supervisor, in one place (seconds unless stated)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Consts:
    """Defaults shared by the parent and the child side."""

    #: Coalescing window of progress reports in the child: at most one report
    #: per window, and the latest value is sent at the end of the window, so the
    #: table lags a hot loop by at most this much plus a pipe hop (spec: 100 ms).
    progress_interval: float = 0.05
    #: How often ``TaskOps.is_canceled()`` really looks at the pipe; in between
    #: it costs one clock read.
    cancel_poll_interval: float = 0.005
    #: Between SIGTERM and SIGKILL when a task tree is killed (timeout, terminate).
    term_grace: float = 0.5
    #: The same after a cancel: the task was told and had all of ``cancel_grace``.
    cancel_term_grace: float = 0.1
    #: How many processes the starter keeps forked ahead of need (capped by
    #: ``max_workers``).
    warm_processes: int = 2
    #: Bound of one subscriber's undelivered events before it is dropped.
    subscriber_backlog: int = 10_000
    #: The same in bytes of the events' JSON (a big task's events are big).
    subscriber_backlog_bytes: int = 64 * 1024 * 1024
    #: Messages kept per task (the oldest are dropped beyond it).
    max_messages: int = 100
    #: How long a task process may live after its final report before its
    #: tree is killed (the report still decides the outcome).
    exit_grace: float = 1.0
    #: How long a task's output pipes may stay open after it ended (a copy passed out
    #: of its tree) before the log stops reading them and is complete.
    output_grace: float = 2.0
    #: How often the manager pings the starter.
    starter_ping_interval: float = 0.5
    #: A starter that has not answered a ping (or reported a task process's
    #: exit) within this is stopped or hung: it is killed with its whole tree
    #: and replaced.
    starter_deadline: float = 2.0
    #: The same right after a Preload: the starter imports the animator modules
    #: before it can answer (a big library may take seconds).
    preload_deadline: float = 60.0
    #: First back-off after the starter's fork() failed; doubles, up to the max.
    spawn_retry: float = 0.05
    spawn_retry_max: float = 5.0
    #: How long ``terminate()`` waits for the starter to exit before killing it.
    starter_stop_timeout: float = 2.0
    #: Deadlock guard of ``terminate()``: it never waits longer than
    #: ``cancel_grace`` + this before it reaps by force and returns.
    terminate_slack: float = 10.0


CONSTS = Consts()
