"""housekeeping's child side: the task process entry point and TaskOps."""

from __future__ import annotations

from workers.ops import TaskEnded, TaskOps

__all__ = ["TaskEnded", "TaskOps"]
