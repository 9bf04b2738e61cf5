"""``GET /api/v1/tasks``: its query parameters, its pages and their ``Link`` header.

::

    ?operation=OP&state=S&state=T&objectId=X&after=ID&limit=N&history=true
        │
        ▼ parse_list_request (400 for anything malformed, before any lookup)
    ListRequest ──▶ select_page: manager.list_snapshots(limit=N + 1), as often as the
                    caller's view rights make it skip tasks
        │
        ▼
    the page (creation order) + Link: <...&after=LAST>; rel="next" when there is more

A page is at most ``limit`` tasks the caller may view, in creation order,
after the task ``after`` names. One more task than the page is asked for, so
that the last page (also one that is exactly full) has no ``Link``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from rest.errors import ApiError

if TYPE_CHECKING:
    import falcon

    from rest.resources import TaskManager
    from supervisor.wire import TaskSnapshot

#: Tasks in a page when the request names no ``limit``.
DEFAULT_LIMIT = 1000
#: The largest ``limit`` a request may ask for.
MAX_LIMIT = 10_000
#: The states a ``state`` filter may name.
STATES = ("NEW", "ACTIVE", "WAITING", "CANCELED", "FAILED", "SUCCEEDED")
#: ``after`` and ``objectId`` (ids and object ids are at most 128 characters).
_TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_COUNT = re.compile(r"[0-9]{1,9}")
MAX_OBJECT_ID = 128


@dataclass(frozen=True)
class ListRequest:
    """The filters and the page a list request asks for."""

    operation: str | None = None
    states: tuple[str, ...] | None = None
    object_id: str | None = None
    after: str | None = None
    limit: int = DEFAULT_LIMIT
    history: bool = False


def single_param(req: falcon.Request, name: str) -> str | None:
    """The parameter's one value; None if absent; 400 if it is given twice."""
    value = req.params.get(name)
    if isinstance(value, list):
        raise ApiError(400, f"query parameter {name!r} is given more than once")
    return value


def flag_param(req: falcon.Request, name: str) -> bool:
    """A ``true``/``false`` parameter; absent is false."""
    text = single_param(req, name)
    if text is None or text == "false":
        return False
    if text == "true":
        return True
    raise ApiError(400, f"query parameter {name!r} must be true or false")


def parse_list_request(req: falcon.Request) -> ListRequest:
    """Read the list's parameters; 400 naming the first that is malformed."""
    states = req.get_param_as_list("state")
    if states is not None:
        for state in states:
            if state not in STATES:
                shown = state if len(state) <= 32 else state[:32] + "…"
                raise ApiError(400, f"query parameter 'state' must be one of "
                                    f"{', '.join(STATES)}, not {shown!r}")
    object_id = single_param(req, "objectId")
    if object_id is not None and len(object_id) > MAX_OBJECT_ID:
        raise ApiError(400, f"query parameter 'objectId' is longer than {MAX_OBJECT_ID} "
                            "characters")
    after = single_param(req, "after")
    if after is not None and not _TASK_ID.fullmatch(after):
        raise ApiError(400, "query parameter 'after' must be a task id (1 to 128 "
                            "characters of A-Z, a-z, 0-9, _ and -)")
    text = single_param(req, "limit")
    limit = DEFAULT_LIMIT
    if text is not None:
        if not _COUNT.fullmatch(text) or not 1 <= int(text) <= MAX_LIMIT:
            raise ApiError(400, f"query parameter 'limit' must be an integer from 1 to "
                                f"{MAX_LIMIT}")
        limit = int(text)
    return ListRequest(single_param(req, "operation") or None,
                       tuple(states) if states is not None else None, object_id, after,
                       limit, flag_param(req, "history"))


def select_page(manager: TaskManager, request: ListRequest,
                visible: Callable[[str], bool] | None = None,
                ) -> tuple[list[TaskSnapshot], bool]:
    """The page's tasks the caller may view (``visible(operation)``; None: all), and
    whether more come after them.

    Raises:
        ApiError: 400, ``after`` names no task known to the manager.
    """
    shown: list[TaskSnapshot] = []
    after = request.after
    while True:
        try:
            batch = manager.list_snapshots(
                request.operation, state=request.states, object_id=request.object_id,
                after=after, limit=request.limit + 1, history=request.history)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        for snapshot in batch:
            if visible is None or visible(snapshot.operation):
                shown.append(snapshot)
                if len(shown) > request.limit:
                    return shown[:request.limit], True
        if len(batch) <= request.limit:
            return shown, False
        # NOTE: tasks the caller may not view were skipped: read on after them
        after = batch[-1].id


def next_link(req: falcon.Request, last_id: str) -> str:
    """The ``Link`` header value of the next page: this request's URL, ``after`` the
    last task shown."""
    pairs: list[tuple[str, Any]] = []
    for name, value in req.params.items():
        if name != "after":
            pairs += [(name, item) for item in (value if isinstance(value, list) else [value])]
    pairs.append(("after", last_id))
    return f'<{req.root_path}{req.path}?{urlencode(pairs)}>; rel="next"'


def total_count(manager: TaskManager, request: ListRequest,
                visible: Callable[[str], bool] | None = None) -> int | None:
    """How many tasks in the table match the filters (and the caller may view), from
    the manager's kept counts; None when they cannot tell (``objectId``, ``history``)."""
    if request.object_id is not None or request.history:
        return None
    total = 0
    for operation, counts in manager.counts_by_operation().items():
        if request.operation and operation != request.operation:
            continue
        if visible is not None and not visible(operation):
            continue
        total += sum(count for state, count in counts.items()
                     if request.states is None or state in request.states)
    return total
