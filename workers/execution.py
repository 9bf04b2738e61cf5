"""Running an animator's ``execute`` and turning whatever happens into its final report.

One code path for the task process (:mod:`workers.child`) and for
:func:`workers.testing.run`, so that a unit test of an animator sees the same
states, reasons, outcome kinds and result checks as the supervisor::

    execute(animator, ops) ──▶ returned ──▶ result JSON checked ──▶ Finished(SUCCEEDED | result)
                          ├─▶ TaskEnded(state) ─────────────────▶ Finished(returned |
                          │                                         failed-by-animator |
                          │                                         canceled-honoured)
                          ├─▶ canceled at an await point ────────▶ Finished(canceled-honoured)
                          └─▶ any other exception ──────────────▶ Finished(exception)
"""

from __future__ import annotations

import inspect
import json
import traceback
from typing import Any

from supervisor.outcome import OutcomeKind
from supervisor.protocol import MAX_JSON_DEPTH, MAX_RESULT_BYTES, Finished, json_depth
from supervisor.states import TaskState
from workers.ops import TaskEnded


def execute(animator: Any, ops: Any, *,
            passing: tuple[type[BaseException], ...] = ()) -> Finished:
    """Run ``animator.execute(ops)`` (``async def`` on uvloop, where a cancel cancels
    its coroutine) and return the final report of what happened.

    Args:
        ops: a :class:`~workers.TaskOps` or a stand-in with the same methods.
        passing: exception types that propagate instead of becoming a report
            (the task process's SIGTERM; a test's own failures).
    """
    try:
        if inspect.iscoroutinefunction(animator.execute):
            result = _run_async(animator, ops)
        else:
            result = animator.execute(ops)
    except TaskEnded as ended:
        reason, kind = None, OutcomeKind.RETURNED
        if ended.state is TaskState.FAILED:
            reason, kind = "the animator set the state FAILED", OutcomeKind.FAILED_BY_ANIMATOR
        elif ended.state is TaskState.CANCELED:
            reason, kind = "the animator honoured the cancel", OutcomeKind.CANCELED_HONOURED
        return Finished(ended.state.value, reason=reason, kind=kind.value)
    except _CanceledAtAwait:
        return Finished(TaskState.CANCELED.value, reason="canceled at an await point",
                        kind=OutcomeKind.CANCELED_HONOURED.value)
    except passing:
        raise
    except BaseException as exc:  # every failure becomes a report, SystemExit too
        return failure(exc)
    return encode_result(result)


def failure(exc: BaseException) -> Finished:
    """The final report of a task that raised ``exc``."""
    return Finished(
        TaskState.FAILED.value,
        reason=f"{type(exc).__name__}: {exc}",
        traceback="".join(traceback.format_exception(exc)),
        error_type=type(exc).__name__,
        kind=OutcomeKind.EXCEPTION.value,
    )


def encode_result(result: Any) -> Finished:
    """Check that the result is JSON of at most 1 MiB and not too deep; else FAILED."""
    try:
        text = json.dumps(result, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        return Finished(
            TaskState.FAILED.value,
            reason=f"result is not JSON-serializable: {type(exc).__name__}: {exc}",
            error_type=type(exc).__name__,
            kind=OutcomeKind.RESULT.value,
        )
    if len(text) > MAX_RESULT_BYTES:
        return Finished(
            TaskState.FAILED.value,
            reason=f"result too large: {len(text)} bytes of JSON (limit {MAX_RESULT_BYTES})",
            kind=OutcomeKind.RESULT.value,
        )
    # NOTE: the parent refuses deeper results as a protocol error; say it here first.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and json_depth(result) > MAX_JSON_DEPTH:
        return Finished(
            TaskState.FAILED.value,
            reason=f"result nested more than {MAX_JSON_DEPTH} levels deep",
            kind=OutcomeKind.RESULT.value,
        )
    return Finished(TaskState.SUCCEEDED.value, result_json=text, kind=OutcomeKind.RETURNED.value)


class _CanceledAtAwait(Exception):
    """The asyncio task of ``execute`` was canceled because the task was."""


def _run_async(animator: Any, ops: Any) -> Any:
    """Run an ``async def execute`` on uvloop; a cancel cancels its asyncio task.

    The cancel comes through ``ops.set_cancel_hook`` (from the loop's own
    thread in a task process, where the pipe is watched; from any thread of a
    test), so it is passed to the loop thread-safely.
    """
    # NOTE: imported here, not at the top: asyncio brings OpenSSL along, and the
    # starter loads it only once an operation with an async execute is
    # registered (every fork of a bigger starter costs more).
    import asyncio

    import uvloop

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        inner = asyncio.ensure_future(animator.execute(ops))
        canceled: list[bool] = []

        def on_cancel() -> None:
            canceled.append(True)
            try:
                loop.call_soon_threadsafe(inner.cancel)
            except RuntimeError:  # NOTE: a test's thread, while the loop closes
                pass

        ops.set_cancel_hook(on_cancel)
        try:
            fileno: int | None = ops.pipe_fileno()
        except OSError:
            fileno = None  # a stand-in without a pipe: cancels come through the hook

        def on_readable() -> None:
            ops.receive()
            if ops.parent_gone and fileno is not None:
                loop.remove_reader(fileno)

        if fileno is not None:
            loop.add_reader(fileno, on_readable)
        try:
            return await inner
        except asyncio.CancelledError:
            if canceled:
                raise _CanceledAtAwait() from None
            raise
        finally:
            if fileno is not None:
                loop.remove_reader(fileno)
            ops.set_cancel_hook(None)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())
