"""The REST layer's error type and the one JSON error form: ``{"code", "message"}``."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

import falcon

from supervisor.wire import encode_json

__all__ = ["JSON_TYPE", "ApiError", "encode_json", "error_body", "serialize_error"]

if TYPE_CHECKING:
    from falcon.http_error import HTTPError

JSON_TYPE = "application/json"


class ApiError(falcon.HTTPError):
    """Raised by the REST layer to answer with ``{"code": status, "message": text}``.

    It renders in that form even under Falcon's default error serializer, so
    handlers mounted into a host app keep the form without changing the host's
    serializer.
    """

    def __init__(
        self, status: int, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        """Create the error.

        Args:
            status: the HTTP status code.
            message: the text for the client; it must not carry internals.
            headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
        """
        super().__init__(status, description=message, headers=headers)
        self.message = message

    def to_dict(
        self, obj_type: type[MutableMapping[str, Any]] = dict
    ) -> MutableMapping[str, Any]:
        """Return ``{"code": <status>, "message": <text>}``."""
        body = obj_type()
        body["code"] = self.status_code
        body["message"] = self.message
        return body


def error_body(exc: HTTPError) -> dict[str, Any]:
    """Return the ``{"code", "message"}`` form of any Falcon HTTP error."""
    if isinstance(exc, ApiError):
        return {"code": exc.status_code, "message": exc.message}
    message = exc.description
    if not message:
        # NOTE: Falcon's own errors (404, 405, ...) have only a title such as
        # "405 Method Not Allowed"; keep the words, the code is in "code".
        title = exc.title or ""
        message = title.split(" ", 1)[1] if title[:3].isdigit() else title
    return {"code": exc.status_code, "message": message}


def serialize_error(req: falcon.Request, resp: falcon.Response, exc: HTTPError) -> None:
    """Falcon error serializer: always JSON ``{"code", "message"}``, whatever Accept says."""
    resp.data = encode_json(error_body(exc))
    resp.content_type = JSON_TYPE
