"""Access control: who is calling, and what they may do to which operation.

An :class:`AccessControl` turns a request into a *subject* (or ``None`` when
the credentials are missing or wrong) and answers ``can_view``, ``can_create``
and ``can_cancel`` for a subject and an operation, as in the original
housekeeping. :class:`TokenAccessControl` is the built-in one: bearer tokens
from a JSON file that stores only their SHA-256 digests::

    {"tokens": [
      {"sha256": "<hex digest of the token>", "subject": "ops",
       "view": ["*"], "create": ["HASH", "SLEEP"], "cancel": ["*"]},
      {"sha256": "...", "subject": "dashboard", "view": ["*"]}
    ]}

``"*"`` stands for every operation; a missing list grants nothing. Make a
token and its digest with ``housekeeping hash-token --generate``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from rest.errors import ApiError

if TYPE_CHECKING:
    from pathlib import Path

    import falcon

Action = Literal["view", "create", "cancel"]

_ENTRY_KEYS = frozenset({"sha256", "subject", "view", "create", "cancel"})
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_REALM = 'Bearer realm="housekeeping"'


class AccessControl(Protocol):
    """What the REST layer asks about every protected request.

    Subjects are opaque to the REST layer: whatever ``authenticate`` returns is
    handed back to the ``can_*`` methods.
    """

    def authenticate(self, req: falcon.Request) -> Any:
        """Return the subject the request speaks for, or ``None`` (answered 401)."""

    def can_view(self, subject: Any, operation: str) -> bool:
        """Tell whether ``subject`` may see tasks of ``operation`` (list, get, events)."""

    def can_create(self, subject: Any, operation: str) -> bool:
        """Tell whether ``subject`` may create tasks of ``operation``."""

    def can_cancel(self, subject: Any, operation: str) -> bool:
        """Tell whether ``subject`` may cancel tasks of ``operation``."""


class TokenFileError(ValueError):
    """Raised when a token file cannot be read or is malformed; the text names the problem."""


@dataclass(frozen=True)
class TokenSubject:
    """A caller known by its bearer token, with the operations it may touch."""

    name: str
    view: frozenset[str]
    create: frozenset[str]
    cancel: frozenset[str]


def hash_token(token: str) -> str:
    """Return the SHA-256 hex digest under which a token file stores ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenAccessControl:
    """Bearer tokens checked against SHA-256 digests, in constant time."""

    def __init__(self, tokens: dict[str, TokenSubject]) -> None:
        """Create it from ``{hex digest: subject}``; see :meth:`from_file`."""
        self._tokens = [(digest.lower().encode("ascii"), who) for digest, who in tokens.items()]

    @classmethod
    def from_file(cls, path: str | Path) -> TokenAccessControl:
        """Load a token file (format in the module docstring).

        Raises:
            TokenFileError: the file is unreadable, not JSON, or malformed.
        """
        try:
            with open(path, encoding="utf-8") as file:
                document = json.load(file)
        except OSError as exc:
            raise TokenFileError(f"token file {path}: cannot read it: {exc.strerror}") from None
        except ValueError as exc:
            raise TokenFileError(f"token file {path}: not valid JSON: {exc}") from None
        return cls(parse_token_document(document, str(path)))

    def authenticate(self, req: falcon.Request) -> TokenSubject | None:
        """Return the subject of the ``Authorization: Bearer`` token, or ``None``."""
        header = req.get_header("Authorization")
        if not header:
            return None
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        digest = hash_token(token).encode("ascii")
        found: TokenSubject | None = None
        # NOTE: compare with every entry, without stopping at a match, so the
        # time taken does not tell which entry (if any) matched.
        for known, subject in self._tokens:
            if hmac.compare_digest(digest, known):
                found = subject
        return found

    def can_view(self, subject: TokenSubject, operation: str) -> bool:
        """Tell whether the subject's ``view`` list covers ``operation``."""
        return "*" in subject.view or operation in subject.view

    def can_create(self, subject: TokenSubject, operation: str) -> bool:
        """Tell whether the subject's ``create`` list covers ``operation``."""
        return "*" in subject.create or operation in subject.create

    def can_cancel(self, subject: TokenSubject, operation: str) -> bool:
        """Tell whether the subject's ``cancel`` list covers ``operation``."""
        return "*" in subject.cancel or operation in subject.cancel


def parse_token_document(document: Any, source: str = "token file") -> dict[str, TokenSubject]:
    """Check a parsed token document and return ``{hex digest: subject}``.

    Raises:
        TokenFileError: naming the first problem, e.g. ``tokens[1].sha256``.
    """

    def fail(problem: str) -> TokenFileError:
        return TokenFileError(f"{source}: {problem}")

    if not isinstance(document, dict) or set(document) != {"tokens"}:
        raise fail('expected an object with exactly one key, "tokens"')
    entries = document["tokens"]
    if not isinstance(entries, list):
        raise fail("tokens must be a list")
    tokens: dict[str, TokenSubject] = {}
    for index, entry in enumerate(entries):
        where = f"tokens[{index}]"
        if not isinstance(entry, dict):
            raise fail(f"{where} must be an object")
        unknown = sorted(set(entry) - _ENTRY_KEYS)
        if unknown:
            raise fail(f"{where} has unknown key {unknown[0]!r}")
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not _HEX_DIGEST.fullmatch(digest):
            raise fail(f"{where}.sha256 must be 64 hex digits (see `housekeeping hash-token`)")
        if digest.lower() in tokens:
            raise fail(f"{where}.sha256 repeats an earlier entry")
        name = entry.get("subject")
        if not isinstance(name, str) or not name:
            raise fail(f"{where}.subject must be a non-empty string")
        grants: dict[str, frozenset[str]] = {}
        for action in ("view", "create", "cancel"):
            operations = entry.get(action, [])
            if not isinstance(operations, list) or not all(
                isinstance(op, str) and op for op in operations
            ):
                raise fail(f"{where}.{action} must be a list of operation names or \"*\"")
            grants[action] = frozenset(operations)
        tokens[digest.lower()] = TokenSubject(name, **grants)
    return tokens


class Guard:
    """The REST layer's use of an access control; ``None`` lets everyone do everything."""

    def __init__(self, access_control: AccessControl | None) -> None:
        """Wrap ``access_control`` (``None``: no authentication at all)."""
        self.access_control = access_control

    @property
    def enabled(self) -> bool:
        """True when requests must authenticate."""
        return self.access_control is not None

    def authenticate(self, req: falcon.Request) -> Any:
        """Return the request's subject.

        Raises:
            ApiError: 401 with a ``WWW-Authenticate: Bearer`` challenge.
        """
        if self.access_control is None:
            return None
        subject = self.access_control.authenticate(req)
        if subject is None:
            if req.get_header("Authorization"):
                challenge = _REALM + ', error="invalid_token"'
                message = "the credentials are not valid"
            else:
                challenge, message = _REALM, "authentication required (Authorization: Bearer)"
            raise ApiError(401, message, headers={"WWW-Authenticate": challenge})
        return subject

    def allows(self, action: Action, subject: Any, operation: str) -> bool:
        """Tell whether ``subject`` may do ``action`` to tasks of ``operation``."""
        control = self.access_control
        if control is None:
            return True
        if action == "view":
            return control.can_view(subject, operation)
        if action == "create":
            return control.can_create(subject, operation)
        return control.can_cancel(subject, operation)

    def require(self, action: Action, subject: Any, operation: str) -> None:
        """Raise 403 unless ``subject`` may do ``action`` to tasks of ``operation``."""
        if not self.allows(action, subject, operation):
            raise ApiError(403, f"not allowed to {action} {operation} tasks")
