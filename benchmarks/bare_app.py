"""The floor of the REST figures: bare Falcon routes serving housekeeping's own JSON.

``python -m benchmarks.bare_app FIXTURE`` serves, on a free loopback port and
with exactly the waitress settings of ``housekeeping serve`` (it uses the same
``rest.server.Server``), the documents in the JSON file ``FIXTURE``::

    {"items": {id: task}, "lists": {size: [task, ...]}, "created": task}

* ``GET /api/v1/tasks/{id}``: ``items[id]`` (404 if absent);
* ``GET /api/v1/tasks?size=N``: ``lists[N]`` (the first list without ``size``);
* ``POST /api/v1/tasks``: parses the JSON body, answers 201 with ``created``.

Each answer is encoded per request (as housekeeping does), by no middleware,
no manager, no lock and no copy: what is left is Falcon, waitress and JSON.
It prints ``... serving on http://host:port`` like ``housekeeping serve`` and
stops on SIGTERM.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import falcon

from rest.errors import JSON_TYPE, encode_json
from rest.server import Server, install_signal_handlers

THREADS = 8  #: the default of ``housekeeping serve --threads``


class Items:
    """``/api/v1/tasks/{task_id}``."""

    def __init__(self, items: dict[str, Any]) -> None:
        self._items = items

    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        """Answer the stored task."""
        task = self._items.get(task_id)
        if task is None:
            raise falcon.HTTPNotFound()
        resp.content_type = JSON_TYPE
        resp.data = encode_json(task)


class Collection:
    """``/api/v1/tasks``."""

    def __init__(self, lists: dict[str, Any], created: Any) -> None:
        self._lists = lists
        self._default = next(iter(lists.values()), [])
        self._created = created

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Answer the stored list of that size."""
        size = req.get_param("size")
        resp.content_type = JSON_TYPE
        resp.data = encode_json(self._lists[size] if size else self._default)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Parse the body, answer the stored task with 201."""
        req.get_media()
        resp.status = 201
        resp.location = "/api/v1/tasks/X"
        resp.content_type = JSON_TYPE
        resp.data = encode_json(self._created)


class _NoHandlers:
    """What ``Server.serve_until_stopped`` closes: nothing here."""

    def close(self) -> None:
        """No event streams to end."""


def main(argv: list[str]) -> int:
    """Serve the fixture until SIGTERM."""
    with open(argv[0], encoding="utf-8") as source:
        fixture = json.load(source)
    stop = install_signal_handlers()
    app = falcon.App()
    app.add_route("/api/v1/tasks", Collection(fixture.get("lists", {}), fixture.get("created")))
    app.add_route("/api/v1/tasks/{task_id}", Items(fixture.get("items", {})))
    server = Server(app, host="127.0.0.1", port=0, threads=THREADS, stop=stop)
    server.serve_until_stopped(_NoHandlers(), lambda: None, sys.stdout)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
