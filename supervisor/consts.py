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
    #: A task process exited and the starter has not reported its tree gone within
    #: this: ping the starter (it then has ``starter_deadline`` to answer).
    exit_report_wait: float = 0.05
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
    #: A starter that died: restarted at once the first time, then after
    #: ``0.1 * 2**n`` seconds up to this (one that cannot come up is no fork loop).
    starter_restart_max: float = 5.0
    #: A starter that lived this long before it died counts as a first failure again.
    starter_stable_after: float = 10.0
    #: How long ``terminate()`` waits for the loop thread, then for the
    #: subscribers' threads, to end.
    loop_stop_timeout: float = 5.0
    subscribers_stop_timeout: float = 2.0

    # -- the Dask backend ----------------------------------------------------------
    #: How long a run on a worker waits for the scheduler's answer to its claim
    #: (may it start?) before it gives up without running the animator.
    dask_claim_timeout: float = 10.0
    #: How often a worker process reads a supervisor's lease, and how often the
    #: thread that waits for a task looks at the lease and the worker's status
    #: (it wakes at once for the task's end or its cancel).
    dask_lease_poll: float = 1.0
    dask_watch_interval: float = 0.25
    #: A batch of a remote task's log lines goes at most this long after its first line.
    dask_log_batch_delay: float = 0.1
    #: How long a remote task's outcome waits on the worker for the end of its log.
    dask_log_end_wait: float = 5.0
    #: How long the outcome of a remote task waits for reports its worker sent before it.
    dask_reports_wait: float = 2.0
    #: How long ``terminate()`` waits, beyond ``cancel_grace``, for the workers to
    #: report the end of the tasks it canceled (kill and report take well under 1 s).
    dask_shutdown_slack: float = 5.0
    #: How long each step of closing may take: queued calls to the scheduler, the
    #: client, an owned LocalCluster (together within terminate()'s budget).
    dask_close_step_timeout: float = 3.0

    # -- the journal (supervisor.journal) -------------------------------------------
    #: How long the journal's writer gathers changes before it commits them as one
    #: transaction: a change is committed within this plus the write (spec: 100 ms).
    journal_batch_interval: float = 0.05
    #: How often finished records beyond the retention are deleted (at most this
    #: long apart; sooner when the record count is over its bound).
    journal_retention_interval: float = 10.0
    #: Bytes of changes the writer may hold, not yet written (a failing disk);
    #: beyond it new records are dropped and the journal reports the loss.
    journal_backlog_bytes: int = 64 * 1024 * 1024
    #: Longest pause between the writer's attempts while the disk fails (it starts
    #: at the batch interval and doubles).
    journal_retry_max: float = 5.0
    #: How long closing the journal waits for the writer's last commit.
    journal_close_timeout: float = 10.0


CONSTS = Consts()
