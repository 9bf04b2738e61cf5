"""``GET /api/v1/operations``: the operations the caller may create tasks of, with their limits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rest.resources import send_json

if TYPE_CHECKING:
    import falcon

    from rest.auth import Guard
    from rest.resources import TaskManager


class Operations:
    """``/api/v1/operations``: the registered operations, filtered to what the caller may create."""

    def __init__(self, manager: TaskManager, guard: Guard) -> None:
        self._manager = manager
        self._guard = guard

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Return ``[{"operation", "timeout", "maxMemory", "sandbox"}, ...]``, sorted by name,
        for the operations the caller may create tasks of."""
        subject = self._guard.authenticate(req)
        operations = [
            entry for entry in self._manager.operations()
            if self._guard.allows("create", subject, entry["operation"])
        ]
        send_json(resp, operations)
