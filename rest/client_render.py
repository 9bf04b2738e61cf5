"""Terminal output of ``housekeeping tasks``: tables, one task, live progress bars, log
lines (rich).

Every string that comes from the server (task messages are written by
animators) is shown as plain text: never parsed as rich markup, and with
control characters replaced, so a task cannot move the cursor, clear the
screen or recolour the terminal.
"""

from __future__ import annotations

import json
import time
import unicodedata
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from supervisor.wire import parse_stamp

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.progress import Task as RichTask

TERMINAL = frozenset({"CANCELED", "FAILED", "SUCCEEDED"})

#: rich style of each state.
STATE_STYLES = {
    "NEW": "bright_black",
    "ACTIVE": "bold blue",
    "WAITING": "yellow",
    "SUCCEEDED": "bold green",
    "FAILED": "bold red",
    "CANCELED": "magenta",
}

#: rich style of each stream of a task's log (the STREAM column says which it is).
STREAM_STYLES = {"stdout": "", "stderr": "red"}
#: Characters of one log line shown at most (the server splits lines at 16 KiB).
LOG_TEXT_LIMIT = 17_000

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def clean(value: Any, limit: int = 500) -> str:
    """Return ``value`` as one line of printable text (control characters become ``?``)."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return "".join(
        "?" if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch for ch in text
    )


def plain(value: Any, style: str = "", limit: int = 500) -> Text:
    """Return server data as a rich Text that is never read as markup."""
    return Text(clean(value, limit), style=style)


def state_text(task: dict[str, Any]) -> Text:
    """The task's state, coloured, with ``(canceling)`` while a cancel is pending."""
    state = clean(task.get("state"), 20)
    label = state
    if task.get("cancelRequested") and state not in TERMINAL:
        label += " (canceling)"
    return Text(label, style=STATE_STYLES.get(state, ""))


def percent(task: dict[str, Any]) -> int:
    """The task's ``percentComplete``, 0 when it has not reported progress."""
    value = (task.get("progress") or {}).get("percentComplete", 0)
    return max(0, min(100, int(value))) if isinstance(value, int | float) else 0


def last_message(task: dict[str, Any]) -> str:
    """The text of the task's newest message, or ``""``."""
    messages = task.get("messages") or []
    return clean(messages[-1].get("message", "")) if messages else ""


def reason(task: dict[str, Any]) -> str:
    """The newest message that is not a state change: why a task ended as it did."""
    for entry in reversed(task.get("messages") or []):
        text = str(entry.get("message", ""))
        if not text.startswith("State change "):
            return clean(text)
    return ""


def age(task: dict[str, Any], now: float | None = None) -> str:
    """How long ago the task was created: ``42s``, ``3m07s``, ``2h05m``, ``3d``."""
    try:
        created = parse_stamp(task["meta"]["timeCreated"])
    except (KeyError, TypeError):
        return ""
    if created is None:
        return ""
    seconds = max(0, int((time.time() if now is None else now) - created))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours < 48 else f"{hours // 24}d"


def small_bar(value: int, width: int = 10) -> str:
    """A text progress bar for tables: ``██████░░░░  60%``."""
    full = value * width // 100
    return "█" * full + "░" * (width - full) + f" {value:3d}%"


def tasks_table(tasks: list[dict[str, Any]]) -> Table:
    """A table of tasks: id, operation, object, state, progress, age, last message."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("ID", "OPERATION", "OBJECT", "STATE", "PROGRESS", "AGE"):
        table.add_column(name, no_wrap=True, min_width=len(name))
    table.add_column("LAST MESSAGE", overflow="ellipsis", no_wrap=True, max_width=60)
    now = time.time()
    for task in tasks:
        table.add_row(
            plain((task.get("meta") or {}).get("id"), limit=128),
            plain(task.get("operation"), limit=128),
            plain(task.get("objectId"), limit=128),
            state_text(task),
            Text(small_bar(percent(task))),
            Text(age(task, now)),
            plain(last_message(task)),
        )
    return table


def task_details(task: dict[str, Any]) -> Table:
    """One task, field by field, with its messages."""
    meta = task.get("meta") or {}
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    progress = task.get("progress") or {}
    rows: list[tuple[str, Text]] = [
        ("id", plain(meta.get("id"))),
        ("operation", plain(task.get("operation"))),
        ("objectId", plain(task.get("objectId"))),
        ("state", state_text(task)),
        ("cancelRequested", Text(str(bool(task.get("cancelRequested"))).lower())),
        ("progress", Text(small_bar(percent(task), 20) + _bytes(progress))),
        ("created", plain(f"{meta.get('timeCreated', '')} ({age(task)} ago)")),
        ("modified", plain(meta.get("timeModified"))),
        ("version", plain(meta.get("version"))),
        ("args", plain(json.dumps(task.get("args"), ensure_ascii=False), limit=2000)),
        ("result", plain(json.dumps(task.get("result"), ensure_ascii=False), limit=2000)),
    ]
    for name, value in rows:
        table.add_row(name, value)
    for index, entry in enumerate(task.get("messages") or []):
        line = Text.assemble(plain(entry.get("time"), "dim"), " ", plain(entry.get("message")))
        table.add_row("messages" if index == 0 else "", line)
    return table


def _bytes(progress: dict[str, Any]) -> str:
    total, done = progress.get("totalBytes"), progress.get("transferredBytes")
    if isinstance(total, int) and isinstance(done, int) and total:
        return f"  {done / 2**20:,.1f} / {total / 2**20:,.1f} MiB"
    return ""


def log_time(stamp: Any) -> str:
    """A line's RFC 3339 time cut to milliseconds: ``2026-12-03T00:17:21.319Z``."""
    text = clean(stamp, 40)
    if len(text) == 27 and text[19] == "." and text.endswith("Z"):
        return text[:23] + "Z"
    return text


def log_line_parts(line: dict[str, Any]) -> tuple[str, str, str]:
    """The ``TIME``, ``STREAM`` and ``TEXT`` of a log line, as safe plain text.

    Tabs become spaces (harmless, and common in output); every other control
    character becomes ``?``, as elsewhere.
    """
    text = line.get("text")
    text = text.expandtabs() if isinstance(text, str) else ""
    return (log_time(line.get("time")), f"{clean(line.get('stream'), 6):<6}",
            clean(text, LOG_TEXT_LIMIT))


def log_line_text(line: dict[str, Any]) -> Text:
    """A log line as ``TIME STREAM TEXT``: the time dim, stderr lines in red."""
    stamp, stream, text = log_line_parts(line)
    style = STREAM_STYLES.get(stream.strip(), "")
    return Text.assemble((stamp, "dim"), " ", (stream, style or "dim"), " ", (text, style))


class LogPrinter:
    """Prints a task's log lines: ``TIME STREAM TEXT``, or each line's JSON."""

    def __init__(self, console: Console, *, json_out: bool = False,
                 above: LiveBars | None = None) -> None:
        """Print on ``console``, or above the live bars ``above``."""
        self._console = console
        self._json = json_out
        self._above = above

    def show(self, line: dict[str, Any]) -> None:
        """Print one line (from the server: never markup, no control characters)."""
        if self._above is not None:
            self._above.print(log_line_text(line))
            return
        out = self._console.file
        if self._json:
            # NOTE: ensure_ascii also escapes C1 controls and bidi overrides,
            # which a task's output may hold and json.dumps would otherwise keep.
            out.write(json.dumps(line, ensure_ascii=True) + "\n")
        elif self._console.is_terminal:
            self._console.print(log_line_text(line), soft_wrap=True)
        else:
            out.write(" ".join(log_line_parts(line)) + "\n")
        out.flush()


class _StateColumn(ProgressColumn):
    """The state of the task behind a bar, coloured."""

    def render(self, task: RichTask) -> Text:
        return state_text(task.fields.get("task") or {})


class _MessageColumn(ProgressColumn):
    """The newest message of the task behind a bar, as plain text."""

    def render(self, task: RichTask) -> Text:
        task_dict = task.fields.get("task") or {}
        return plain(reason(task_dict) or last_message(task_dict), "dim", limit=80)


class LiveBars:
    """One live progress bar per task, with its state and newest message."""

    def __init__(self, console: Console) -> None:
        """Draw on ``console`` (nothing moves when it is not a terminal)."""
        self._progress = Progress(
            TextColumn("{task.description}", markup=False),
            _StateColumn(),
            BarColumn(bar_width=30),
            TaskProgressColumn(),
            _MessageColumn(),
            console=console,
            refresh_per_second=8,
        )
        self._bars: dict[str, Any] = {}

    def __enter__(self) -> LiveBars:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def show(self, task: dict[str, Any]) -> None:
        """Add or update the bar of ``task``."""
        task_id = clean((task.get("meta") or {}).get("id"), 128)
        description = f"{task_id} {clean(task.get('operation'), 40)}"
        bar = self._bars.get(task_id)
        if bar is None:
            self._bars[task_id] = self._progress.add_task(
                description, total=100, completed=percent(task), task=task)
        else:
            self._progress.update(bar, completed=percent(task), task=task)

    def print(self, renderable: RenderableType) -> None:
        """Print a line above the bars (thread-safe, as rich's console is)."""
        self._progress.console.print(renderable, soft_wrap=True)

    def hide(self, task_id: str) -> None:
        """Remove the bar of a task that was purged."""
        bar = self._bars.pop(clean(task_id, 128), None)
        if bar is not None:
            self._progress.remove_task(bar)
