"""Parse and check request bodies; every problem is a 4xx that names the field.

Only ``POST /api/v1/tasks`` takes a body. The checks run in this order, and the
first failure answers:

1. ``Content-Type`` is JSON (``application/json`` or ``application/*+json``,
   UTF-8 if a charset is given), else 415;
2. the body is at most :data:`MAX_BODY_BYTES`, decided from ``Content-Length``
   or by reading at most one byte more than the limit, else 413;
3. it is UTF-8 JSON without ``NaN``/``Infinity``, nested at most
   :data:`MAX_DEPTH` deep, else 400;
4. it is an object whose fields are all writable (:data:`CREATE_FIELDS`) and of
   the right type, else 400 naming the first bad field. ``null`` for an
   optional field means the same as leaving it out.
"""

from __future__ import annotations

import json
import re
from json.decoder import scanstring  # type: ignore[attr-defined]  # public, not in the stubs
from typing import Any, Protocol

import falcon

from rest.errors import ApiError
from supervisor.protocol import MAX_JSON_DEPTH, finite_float, json_depth
from supervisor.task import ParsedCreate
from supervisor.wire import CREATE_FIELDS as WIRE_CREATE_FIELDS
from supervisor.wire import MAX_OBJECT_ID

#: Largest accepted request body (1 MiB).
MAX_BODY_BYTES = 1024 * 1024
#: Deepest accepted nesting of arrays and objects in a body (the manager encodes
#: and pickles what it is given; unbounded depth would end in RecursionError).
MAX_DEPTH = MAX_JSON_DEPTH
#: Longest ``objectId`` and ``operation``.
MAX_NAME_LENGTH = MAX_OBJECT_ID
#: Fields a client may set at creation, in wire order.
CREATE_FIELDS = tuple(WIRE_CREATE_FIELDS)
#: Fields of the task object that only the supervisor sets.
READ_ONLY_FIELDS = frozenset({"meta", "state", "cancelRequested", "progress", "messages", "result"})

_READ_CHUNK = 64 * 1024


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


def parse_create(req: falcon.Request) -> dict[str, Any]:
    """Read, parse and check the body of a task creation request.

    Args:
        req: the request.

    Returns:
        The create dict for ``Manager.run_task``: only the fields that were
        posted, out of :data:`CREATE_FIELDS`.

    Raises:
        ApiError: 415, 413 or 400 as described in the module docstring.
    """
    check_content_type(req.content_type)
    text = decode_text(read_body(req))
    if '"args"' not in text and '"serviceStates"' not in text and "\\" not in text:
        # NOTE: no JSON text to keep (no args, no serviceStates, no escaped key
        # that could spell them): one strict parse is all it takes.
        return check_create(decode_json(text))
    found = _object_with_spans(text)
    if found is None:  # not a well-formed object: json.loads says what is wrong
        return check_create(decode_json(text))
    body, spans = found
    create = ParsedCreate(check_create(body))
    create.json_text = {}
    for name in ("serviceStates", "args"):
        start, end = spans.get(name, (0, 0))
        part = text[start:end]
        if isinstance(create.get(name), dict) and "\n" not in part and "\r" not in part:
            create.json_text[name] = part.encode("utf-8")
    return create


def check_content_type(content_type: str | None) -> None:
    """Raise 415 unless ``content_type`` is a JSON media type in UTF-8."""
    if not content_type:
        raise ApiError(415, "Content-Type must be application/json")
    media_type, params = falcon.parse_header(content_type)
    media_type = media_type.lower()
    is_json = media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )
    if not is_json:
        raise ApiError(415, f"Content-Type must be application/json, not {media_type[:64]!r}")
    charset = params.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise ApiError(415, f"JSON must be UTF-8, not charset {charset[:32]!r}")


def read_body(req: falcon.Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """Read the request body, answering 413 beyond ``limit`` bytes.

    With a ``Content-Length`` the decision is made before reading anything;
    without one (a chunked body) at most ``limit + 1`` bytes are read.
    """
    length = req.content_length  # NOTE: Falcon answers 400 for a malformed value
    if length is not None:
        if length > limit:
            raise _too_large(limit)
        return _read_at_most(req.bounded_stream, length)
    stream: _Readable = req.stream if req.env.get("wsgi.input_terminated") else req.bounded_stream
    data = _read_at_most(stream, limit + 1)
    if len(data) > limit:
        raise _too_large(limit)
    return data


def decode_text(data: bytes) -> str:
    """Decode a body as UTF-8, else 400."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not valid UTF-8") from None


def decode_json(data: bytes | str) -> Any:
    """Parse strict UTF-8 JSON (no NaN/Infinity, bounded nesting), else 400."""
    text = decode_text(data) if isinstance(data, bytes) else data
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=finite_float)
    except RecursionError:
        raise ApiError(400, f"request body is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as exc:  # JSONDecodeError, _reject_constant, huge integers
        raise ApiError(400, f"request body is not valid JSON: {str(exc)[:200]}") from None
    return value


def check_create(body: Any) -> dict[str, Any]:
    """Check a parsed creation body and return the create dict.

    Raises:
        ApiError: 400 naming the first field that is unknown, read-only,
            missing or of the wrong type.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    for name in body:
        if name in READ_ONLY_FIELDS:
            raise ApiError(400, f"{name} is read-only")
        if name not in CREATE_FIELDS:
            raise ApiError(400, f"unknown field {_quote(name)}")
    if "operation" not in body:
        raise ApiError(400, "operation is required")
    operation = body["operation"]
    if not isinstance(operation, str) or not 0 < len(operation) <= MAX_NAME_LENGTH:
        raise ApiError(
            400, f"operation must be a non-empty string of at most {MAX_NAME_LENGTH} characters"
        )
    object_id = body.get("objectId")
    if object_id is not None and (
        not isinstance(object_id, str) or len(object_id) > MAX_NAME_LENGTH
    ):
        raise ApiError(400, f"objectId must be a string of at most {MAX_NAME_LENGTH} characters")
    for name in ("serviceStates", "args"):
        if body.get(name) is None:
            continue
        if not isinstance(body[name], dict):
            raise ApiError(400, f"{name} must be a JSON object")
        # NOTE: the body is at depth 1 and the field's object at depth 2.
        if json_depth(body[name]) > MAX_DEPTH - 1:
            raise ApiError(400, f"{name} is nested more than {MAX_DEPTH} levels deep")
    return {name: body[name] for name in CREATE_FIELDS if name in body}


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _skip(text: str, index: int) -> int:
    """The index of the first non-whitespace character at or after ``index``."""
    found = _WHITESPACE.match(text, index)
    return found.end() if found is not None else index


def _object_with_spans(text: str) -> tuple[dict[str, Any], dict[str, tuple[int, int]]] | None:
    """Parse a JSON object, keeping where each top-level value's text is.

    The values are parsed by the json module's own scanner (strict, no
    NaN), so the result is what ``json.loads`` gives; the spans let the
    manager keep ``args`` as the text received instead of encoding it again.
    None for anything but a well-formed object (the caller then lets
    ``json.loads`` name the problem).
    """
    try:
        index = _skip(text, 0)
        if text[index:index + 1] != "{":
            return None
        index = _skip(text, index + 1)
        values: dict[str, Any] = {}
        spans: dict[str, tuple[int, int]] = {}
        if text[index:index + 1] == "}":
            end = index + 1
        else:
            while True:
                if text[index:index + 1] != '"':
                    return None
                key, index = scanstring(text, index + 1, True)
                index = _skip(text, index)
                if text[index:index + 1] != ":":
                    return None
                index = _skip(text, index + 1)
                value, end = _SCANNER(text, index)
                values[key], spans[key] = value, (index, end)
                index = _skip(text, end)
                if text[index:index + 1] == "}":
                    end = index + 1
                    break
                if text[index:index + 1] != ",":
                    return None
                index = _skip(text, index + 1)
        if _skip(text, end) != len(text):
            return None
    except (ValueError, StopIteration, RecursionError):
        return None
    return values, spans


def _read_at_most(stream: _Readable, size: int) -> bytes:
    """Read until EOF or ``size`` bytes, whichever comes first."""
    parts: list[bytes] = []
    remaining = size
    while remaining > 0:
        chunk = stream.read(min(remaining, _READ_CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit} bytes")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


#: The json module's scanner of one value (C speed), strict, refusing NaN/Infinity.
_SCANNER = json.JSONDecoder(  # type: ignore[attr-defined]  # scan_once is not in the stubs
    parse_constant=_reject_constant, parse_float=finite_float).scan_once


def _quote(name: str) -> str:
    """Quote a client-chosen field name for a message, cut to a sane length."""
    return repr(name if len(name) <= 64 else name[:64] + "…")
