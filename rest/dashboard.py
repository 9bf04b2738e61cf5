"""The dashboard: one static page at ``/`` and ``/ui/``, a client of the REST API.

Routes::

    GET /, /ui, /ui/        dashboard.html
    GET /ui/{name}          dashboard.js, dashboard.css (nothing else)

The files hold no data and need no authentication; everything the page shows
comes from the API with the token the user typed (kept in ``sessionStorage``).
The Content-Security-Policy allows scripts, styles and connections from this
origin only, so even a string that escaped the page's own escaping could not
run: the page writes task data with ``textContent`` only.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

from rest.errors import ApiError

if TYPE_CHECKING:
    import falcon

#: The files of ``rest/static`` that are served, with their media types.
STATIC_FILES = {
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def load_static() -> dict[str, bytes]:
    """Read the dashboard's files from the package."""
    folder = resources.files("rest").joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in STATIC_FILES}


class DashboardFiles:
    """The page and its script and style sheet (GET, no authentication)."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        """Serve ``files`` (default: :func:`load_static`), read once."""
        self._files = files if files is not None else load_static()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Return the page."""
        self._send(resp, "dashboard.html")

    def on_get_file(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        """Return one of :data:`STATIC_FILES`; anything else is 404."""
        if name not in STATIC_FILES:
            raise ApiError(404, f"no such file: {name[:128]}")
        self._send(resp, name)

    def _send(self, resp: falcon.Response, name: str) -> None:
        resp.content_type = STATIC_FILES[name]
        resp.set_headers(_HEADERS)
        resp.data = self._files[name]


def add_dashboard_routes(app: falcon.App[Any, Any]) -> None:
    """Route ``/``, ``/ui``, ``/ui/`` and ``/ui/{name}`` of ``app`` to the dashboard."""
    files = DashboardFiles()
    for path in ("/", "/ui", "/ui/"):
        app.add_route(path, files)
    app.add_route("/ui/{name}", files, suffix="file")
