"""Idempotency keys: the same key with the same create returns the first task.

A client that retries a create (its timeout fired, a proxy retried) sends the
same ``Idempotency-Key`` each time; the manager answers every repeat with the
task the first one made, and refuses the key with another body
(:class:`~supervisor.errors.IdempotencyConflict`). A key is remembered for
:data:`KEY_TTL` seconds, at most :data:`MAX_KEYS` of them (the oldest are
forgotten first); with a journal, keys survive a restart.

:class:`KeyStore` is read and changed under the manager's lock: looking a key
up and recording the task it made happen in one critical section, so that
concurrent repeats create one task.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import OrderedDict
from typing import Any, NamedTuple

from supervisor.errors import IdempotencyConflict, InvalidArguments

#: Seconds a key is remembered (a repeat after that creates a new task).
KEY_TTL = 24 * 3600.0
#: Keys remembered at most; beyond it the oldest are forgotten early.
MAX_KEYS = 100_000
#: What a key may look like: 1-128 of these characters.
KEY_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class Created(NamedTuple):
    """What :meth:`Manager.create_task <supervisor.manager.Manager.create_task>` returns."""

    task_id: str
    #: True when an earlier create with the same idempotency key made the task
    replayed: bool


class KeyRecord(NamedTuple):
    """One remembered key: the digest of its body, the task it made, when."""

    digest: bytes
    task_id: str
    created_at: float


def check_key(key: object) -> str:
    """Return ``key`` if it is a valid idempotency key.

    Raises:
        InvalidArguments: it is not 1-128 of ``[A-Za-z0-9_.-]``.
    """
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise InvalidArguments("an idempotency key must be 1 to 128 characters of "
                               "A-Z, a-z, 0-9, _, . and -")
    return key


def body_digest(create: dict[str, Any]) -> bytes:
    """SHA-256 of the create dict's canonical JSON (sorted keys, compact, ASCII).

    Raises:
        InvalidArguments: the dict is not JSON.
    """
    try:
        text = json.dumps(create, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidArguments(f"the task must be JSON: {exc}") from None
    return hashlib.sha256(text.encode("ascii")).digest()


class KeyStore:
    """Remembered keys, oldest first; bounded by count and age (caller holds the lock)."""

    def __init__(self, max_keys: int = MAX_KEYS, ttl: float = KEY_TTL) -> None:
        self.max_keys = max_keys
        self.ttl = ttl
        self._keys: OrderedDict[str, KeyRecord] = OrderedDict()

    def find(self, key: str, digest: bytes, now: float | None = None) -> str | None:
        """The id of the task ``key`` made, or None if the key is new (or expired).

        Raises:
            IdempotencyConflict: the key was used with another body.
        """
        record = self._keys.get(key)
        if record is None:
            return None
        if record.created_at + self.ttl <= (time.time() if now is None else now):
            del self._keys[key]
            return None
        if record.digest != digest:
            raise IdempotencyConflict(
                f"idempotency key {key!r} was used with another task "
                f"(it made {record.task_id}); use a new key for a new task")
        return record.task_id

    def remember(self, key: str, record: KeyRecord) -> None:
        """Record the task a key made; forget the expired and the oldest beyond the bound."""
        self._keys[key] = record
        self._keys.move_to_end(key)
        cutoff = time.time() - self.ttl
        while self._keys:
            oldest = next(iter(self._keys.values()))
            if len(self._keys) <= self.max_keys and oldest.created_at > cutoff:
                break
            self._keys.popitem(last=False)

    def __len__(self) -> int:
        return len(self._keys)
