"""The local backend: a process of its own per task, on this machine."""

from __future__ import annotations

from supervisor.backends.local.backend import LocalBackend

__all__ = ["LocalBackend"]
