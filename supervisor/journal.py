"""The journal: each task's record in an SQLite database, so that it survives a restart.

Opt-in (``Manager(journal=path)``, ``housekeeping serve --journal PATH``),
embedded (the standard library's ``sqlite3``, WAL mode), one file per
supervisor. It records a task at creation, at each change and at its end (its
result, messages, outcome, usage, and the tail of its log), and the
idempotency keys. It serves what the in-memory table no longer holds: a
purged task, the history of a list, and what the previous run left behind
(:mod:`supervisor.restart`).

::

    manager's lock held                      writer thread (its own)
    ───────────────────                      ───────────────────────
    Ledger.publish ─ record(snapshot) ─▶ pending (by task id: the newest version;
    run_task ─ record_key(key) ───────▶  bounded by bytes)
                                              │ every CONSTS.journal_batch_interval
                                              ▼
                                         one transaction: upsert each task's row,
                                         the keys, the log tails ─▶ COMMIT
                                              │ every CONSTS.journal_retention_interval
                                              ▼
                                         delete finished records past the retention

Nothing here runs on the manager's loop or writes under its lock: ``record``
only files the snapshot (the JSON is made on the writer thread). A disk that
fails (full, read-only, gone) is logged and reported by :attr:`Journal.status`
(``/healthz``), and the writer retries; the in-memory table never waits for
it. Changes beyond :attr:`Consts.journal_backlog_bytes` that could not be
written are dropped, and the status says so until the next start.

Durability: ``synchronous=NORMAL`` in WAL mode. A committed change survives a
crash of the process (SIGKILL included); a power loss may lose the last
moments. A change is committed within the batch interval plus the write.

Reads (:meth:`get`, :meth:`select`, :meth:`log_tail`) run on the caller's
thread, each on a connection of its own (WAL: readers never wait for the
writer), and see changes not yet committed first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from supervisor.consts import CONSTS
from supervisor.errors import JournalError
from supervisor.idempotency import KEY_TTL, KeyRecord
from supervisor.restart import ended_lost
from supervisor.wire import TaskSnapshot, encode_json

if TYPE_CHECKING:
    from collections.abc import Callable

    from supervisor.listing import TaskQuery
    from supervisor.table import TaskTable
    from supervisor.tasklog import TaskLog

log = logging.getLogger("housekeeping.journal")

#: ``--retention`` by default: finished records are kept 7 days.
DEFAULT_RETENTION = 7 * 24 * 3600.0
#: ``--retention-tasks`` by default: at most this many records.
DEFAULT_RETENTION_TASKS = 100_000
#: Creation numbers reserved ahead in the journal, so that ids handed out but
#: not yet committed when the process is killed are never handed out again.
RESERVE_BLOCK = 10_000
#: The tail of a task's log kept in its record: at most this many lines and bytes.
LOG_TAIL_LINES = 1000
LOG_TAIL_BYTES = 64 * 1024
#: Bytes a pending change is counted for on top of its JSON.
_ENTRY_OVERHEAD = 256
#: Records deleted per statement by the retention (a long delete holds the writer).
_DELETE_CHUNK = 5000
#: Terminal tasks whose log tail is still followed until their output ends.
_MAX_TAILS = 10_000
#: Bytes of finished tasks read from the file that are kept for the next read
#: (a client polls the task it created): a terminal record never changes.
_CACHE_BYTES = 16 * 1024 * 1024

_TERMINAL = frozenset({"CANCELED", "FAILED", "SUCCEEDED"})
_UNFINISHED = ("NEW", "ACTIVE", "WAITING")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    number INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    operation TEXT NOT NULL,
    object_id TEXT,
    state TEXT NOT NULL,
    terminal INTEGER NOT NULL,
    created_at REAL NOT NULL,
    modified_at REAL NOT NULL,
    json BLOB NOT NULL,
    log BLOB
);
CREATE INDEX IF NOT EXISTS tasks_by_operation ON tasks (operation, number);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state, number);
CREATE INDEX IF NOT EXISTS tasks_by_object ON tasks (object_id, number);
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (terminal, modified_at);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key TEXT PRIMARY KEY,
    digest BLOB NOT NULL,
    task_id TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value);
"""
_UPSERT = """
INSERT INTO tasks (number, id, operation, object_id, state, terminal, created_at,
                   modified_at, json)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET number = excluded.number, state = excluded.state,
    terminal = excluded.terminal, modified_at = excluded.modified_at, json = excluded.json
"""


@dataclass
class Restored:
    """What the previous run left in the journal, read at open."""

    #: the largest creation number ever handed out (as far as the journal knows)
    last_number: int = 0
    #: records of NEW tasks, in creation order
    queued: list[TaskSnapshot] = field(default_factory=list)
    #: idempotency keys younger than their time to live, oldest first
    keys: list[tuple[str, KeyRecord]] = field(default_factory=list)
    #: tasks that ran when it stopped (now FAILED, lost)
    lost: int = 0


class _Entry:
    """A change waiting for the writer: a task's newest version (or only its log)."""

    __slots__ = ("log", "new", "only_log", "size", "snapshot")

    def __init__(self, snapshot: TaskSnapshot, log: TaskLog | None, new: bool,
                 only_log: bool) -> None:
        self.snapshot = snapshot
        self.log = log  #: the task's log, for the tail of a terminal record
        self.new = new  #: the row does not exist yet
        self.only_log = only_log  #: purged: only its log tail may need a last write
        self.size = snapshot.size + _ENTRY_OVERHEAD


class Journal:
    """One supervisor's SQLite journal; open it with :meth:`open`, end with :meth:`close`.

    Args:
        path: the database file (made if absent; its directory must exist).
        retention: seconds a finished record is kept after its last change.
        retention_tasks: records kept at most (the oldest finished go first).
    """

    def __init__(self, path: str, *, retention: float = DEFAULT_RETENTION,
                 retention_tasks: int = DEFAULT_RETENTION_TASKS) -> None:
        self.path = path
        self.retention = retention
        self.retention_tasks = retention_tasks
        self.restored = Restored()
        self._lock = threading.Lock()  #: guards the pending changes and the status
        self._pending: dict[str, _Entry] = {}
        self._writing: dict[str, _Entry] = {}  #: taken by the writer, not yet committed
        self._pending_keys: list[tuple[str, KeyRecord]] = []
        self._pending_bytes = 0
        #: the state last filed of each task in the table (a PATCH that changes
        #: nothing but progress or messages is not written: see record())
        self._filed_states: dict[str, str] = {}
        #: finished tasks read from the file, least recently read first
        self._cache: OrderedDict[str, TaskSnapshot] = OrderedDict()
        self._cache_bytes = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._closed = False
        self._error: str | None = None  #: why the last write failed (None: it worked)
        self._dropped = 0  #: changes dropped for want of room since the start
        self._reserved = 0  #: creation numbers up to this are reserved (committed)
        self._reserve_wanted = 0  #: a larger reservation the writer should commit
        self._rows = 0  #: records in the journal, roughly (for the count retention)
        #: writer only: terminal tasks' logs whose end is still to be written, with
        #: the log's next seq as last written (-1: never)
        self._tails: dict[str, tuple[TaskLog, int]] = {}
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_readers: list[sqlite3.Connection] = []
        self._lock_file: int | None = None
        self._db: sqlite3.Connection | None = None
        self._thread = threading.Thread(target=self._run, name="housekeeping-journal",
                                        daemon=True)

    # -- open and close ------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, retention: float = DEFAULT_RETENTION,
             retention_tasks: int = DEFAULT_RETENTION_TASKS) -> Journal:
        """Open (or make) the journal at ``path``, read what the last run left, and
        start the writer.

        Records of tasks that ran when the last run stopped become FAILED
        (``lost``) at once; records of NEW tasks are in :attr:`restored`.

        Raises:
            JournalError: the file cannot be opened or read, is not a journal,
                or another process has it open.
        """
        journal = cls(os.fspath(path), retention=retention, retention_tasks=retention_tasks)
        try:
            journal._open()
        except BaseException:
            journal._close_connections()
            raise
        journal._thread.start()
        return journal

    def _open(self) -> None:
        try:
            self._lock_file = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise JournalError(f"journal {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise JournalError(f"journal {self.path} is in use by another process") from None
        try:
            self._db = self._connect()
            self._prepare(self._db)
            self._restore(self._db)
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: {exc}") from None

    def _connect(self) -> sqlite3.Connection:
        # NOTE: check_same_thread=False: a connection is made on one thread and
        # used on another (the writer's; a reader's borrower), never by two at once.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=5.0)
        db.execute("PRAGMA busy_timeout = 5000")
        return db

    def _prepare(self, db: sqlite3.Connection) -> None:
        """WAL, synchronous=NORMAL, the schema; a read-only file is reported, not fatal."""
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(_SCHEMA)
        except sqlite3.OperationalError as exc:
            # NOTE: a read-only file or a full disk: what is there can still be read
            # (if it is a journal at all: the reads below say so).
            self._fail(f"cannot write: {exc}")

    def _restore(self, db: sqlite3.Connection) -> None:
        """Read what the last run left; mark the tasks that ran as lost (written soon)."""
        restored = self.restored
        row = db.execute("SELECT MAX(number), COUNT(*) FROM tasks").fetchone()
        reserved = db.execute("SELECT value FROM meta WHERE name = 'reserved'").fetchone()
        restored.last_number = max(int(row[0] or 0), int(reserved[0]) if reserved else 0)
        self._rows = int(row[1])
        placeholders = ", ".join("?" * len(_UNFINISHED))
        now = time.time()
        for number, blob in db.execute(
                f"SELECT number, json FROM tasks WHERE state IN ({placeholders}) "
                "ORDER BY number", _UNFINISHED):
            snapshot = _decode(number, blob)
            if snapshot is None:
                continue
            if snapshot.state == "NEW":
                restored.queued.append(snapshot)
            else:
                self._file(_Entry(ended_lost(snapshot, now), None, False, False))
                restored.lost += 1
        for key, digest, task_id, created_at in db.execute(
                "SELECT key, digest, task_id, created_at FROM idempotency_keys "
                "WHERE created_at > ? ORDER BY created_at", (now - KEY_TTL,)):
            restored.keys.append((key, KeyRecord(bytes(digest), task_id, created_at)))
        self._reserve(db, restored.last_number + RESERVE_BLOCK)
        if restored.queued or restored.lost:
            log.info("journal %s: %d queued task(s) wait for their operation; %d task(s) "
                     "that ran are FAILED (lost)", self.path, len(restored.queued),
                     restored.lost)

    def _reserve(self, db: sqlite3.Connection, number: int) -> None:
        """Commit that creation numbers up to ``number`` may be handed out."""
        try:
            db.execute("INSERT INTO meta (name, value) VALUES ('reserved', ?) "
                       "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (number,))
            self._reserved = number
        except sqlite3.Error as exc:
            self._fail(f"cannot write: {exc}")

    def close(self, last_number: int | None = None) -> None:
        """Write what is pending, stop the writer, close the file; idempotent.

        Args:
            last_number: the last creation number handed out; recorded exactly,
                so that a clean restart continues right after it.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stopping.set()
        self._wake.set()
        self._thread.join(CONSTS.journal_close_timeout)
        if self._thread.is_alive():
            log.error("journal %s: the writer did not finish within %g s; changes not "
                      "yet written are lost", self.path, CONSTS.journal_close_timeout)
            return  # NOTE: the writer still uses the connection; the daemon thread ends with us
        if last_number is not None and self._db is not None:
            self._reserve(self._db, last_number)
        self._close_connections()

    def _close_connections(self) -> None:
        for db in [self._db, *self._all_readers]:
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
        self._db = None
        # NOTE: the lock file is closed last: closing any descriptor of the database
        # file drops the POSIX locks SQLite holds on it in this process.
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None

    # -- recording (under the manager's lock: file and return) ----------------------

    def record(self, method: str, snapshot: TaskSnapshot, task_log: TaskLog | None = None,
               ) -> None:
        """File a task's new version for the writer (``method``: POST, PATCH or DELETE).

        ``task_log`` is the task's log, given with its terminal version so that
        the tail of it is recorded.

        NOTE: a PATCH that leaves the state as it was (progress, a message, a
        cancel request) is not written: a task is recorded at its creation, at
        each state change and at its end, each time whole. Between them the
        table has the newer version (reads ask it first); a running task's big
        ``args`` are not written again twenty times a second.
        """
        with self._lock:
            if self._closed:
                return
            old = self._pending.get(snapshot.id)
            if method == "DELETE":
                self._filed_states.pop(snapshot.id, None)
                if old is None:
                    self._file(_Entry(snapshot, None, False, True))
                return  # NOTE: purged from the table, not from the journal
            if method == "PATCH" and self._filed_states.get(snapshot.id) == snapshot.state:
                return
            self._filed_states[snapshot.id] = snapshot.state
            cached = self._cache.pop(snapshot.id, None)  # NOTE: an id made again (run_task_as)
            if cached is not None:
                self._cache_bytes -= cached.size
            entry = _Entry(snapshot, task_log or (old.log if old else None),
                           method == "POST" or (old is not None and old.new), False)
            self._file(entry)
            wanted = snapshot.number + RESERVE_BLOCK
            if method == "POST" and snapshot.number + RESERVE_BLOCK // 2 > self._reserved \
                    and wanted > self._reserve_wanted:
                self._reserve_wanted = wanted

    def recorder(self, table: TaskTable) -> Callable[[str, TaskSnapshot], None]:
        """The ledger's ``on_version`` hook: :meth:`record` each new version, with
        the task's log when it is terminal (looked up in ``table``)."""

        def record_version(method: str, snapshot: TaskSnapshot) -> None:
            # NOTE: called under the manager's lock: it only files the snapshot.
            task_log = None
            if method == "PATCH" and snapshot.state in _TERMINAL:
                task = table.get(snapshot.id)
                task_log = task.log if task is not None else None
            self.record(method, snapshot, task_log)

        return record_version

    def record_key(self, key: str, record: KeyRecord) -> None:
        """File an idempotency key and the task it made."""
        with self._lock:
            if not self._closed:
                self._pending_keys.append((key, record))
                self._pending_bytes += len(key) + 128

    def _file(self, entry: _Entry) -> None:
        """Add a pending change (caller holds ``_lock``); drop it if there is no room."""
        old = self._pending.get(entry.snapshot.id)
        if old is not None:
            self._pending_bytes -= old.size
        elif self._pending_bytes + entry.size > CONSTS.journal_backlog_bytes:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.error("journal %s: %d change(s) dropped: the writer is %d bytes behind "
                          "(%s)", self.path, self._dropped, self._pending_bytes,
                          self._error or "the disk is slow")
            return
        self._pending[entry.snapshot.id] = entry
        self._pending_bytes += entry.size
        self._wake.set()

    # -- status --------------------------------------------------------------------

    @property
    def status(self) -> str:
        """``"ok"``, or what is wrong: the last write's error, or changes dropped."""
        with self._lock:
            if self._error is not None:
                return self._error
            if self._dropped:
                return f"{self._dropped} change(s) were dropped: the disk failed for too long"
            return "ok"

    def _fail(self, error: str) -> None:
        with self._lock:
            first = self._error is None
            self._error = error[:500]
        if first:
            log.error("journal %s: %s", self.path, error)

    # -- reads (any thread) ----------------------------------------------------------

    def get(self, task_id: str) -> TaskSnapshot | None:
        """The newest recorded version of a task, or None."""
        with self._lock:
            entry = self._pending.get(task_id) or self._writing.get(task_id)
            if entry is not None:
                return entry.snapshot
            cached = self._cache.get(task_id)
            if cached is not None:
                self._cache.move_to_end(task_id)
                return cached
        row = self._read_one("SELECT number, json FROM tasks WHERE id = ?", (task_id,))
        snapshot = None if row is None else _decode(row[0], row[1])
        if snapshot is not None and snapshot.state in _TERMINAL:
            with self._lock:
                self._cache_snapshot(snapshot)
        return snapshot

    def _cache_snapshot(self, snapshot: TaskSnapshot) -> None:
        """Keep a finished task read from the file (caller holds ``_lock``).

        NOTE: only terminal versions: they never change, so a version cached
        while a newer one is being written cannot exist.
        """
        if snapshot.id in self._cache or snapshot.size > _CACHE_BYTES // 16:
            return
        self._cache[snapshot.id] = snapshot
        self._cache_bytes += snapshot.size
        while self._cache_bytes > _CACHE_BYTES:
            self._cache_bytes -= self._cache.popitem(last=False)[1].size

    def number_of(self, task_id: str) -> int | None:
        """A recorded task's creation number, or None."""
        snapshot = self.get(task_id)
        return None if snapshot is None else snapshot.number

    def select(self, query: TaskQuery, after: int = 0,
               limit: int | None = None) -> list[TaskSnapshot]:
        """Recorded tasks that match ``query``, numbered above ``after``, in creation
        order; at most ``limit``."""
        sql = ["SELECT number, json FROM tasks WHERE number > ?"]
        params: list[Any] = [after]
        if query.operation:
            sql.append("AND operation = ?")
            params.append(query.operation)
        if query.states is not None:
            sql.append(f"AND state IN ({', '.join('?' * len(query.states))})")
            params.extend(sorted(query.states))
        if query.object_id is not None:
            sql.append("AND object_id = ?")
            params.append(query.object_id)
        with self._lock:
            unwritten = {**self._writing, **self._pending}
        sql.append("ORDER BY number")
        if limit is not None:
            # NOTE: rows that have a newer version not yet written are replaced by
            # it (which may not match): ask for enough to fill the page anyway.
            sql.append("LIMIT ?")
            params.append(limit + len(unwritten))
        found: dict[str, TaskSnapshot] = {}
        for number, blob in self._read_all(" ".join(sql), params):
            snapshot = _decode(number, blob)
            if snapshot is not None and snapshot.id not in unwritten:
                found[snapshot.id] = snapshot
        for entry in unwritten.values():
            snapshot = entry.snapshot
            if snapshot.number > after and query.matches(snapshot, snapshot.state):
                found[snapshot.id] = snapshot
        ordered = sorted(found.values(), key=lambda snapshot: snapshot.number)
        return ordered if limit is None else ordered[:limit]

    def log_tail(self, task_id: str) -> dict[str, Any] | None:
        """The recorded tail of a task's log: ``{"lines": [...], "first": seq}``
        (``first``: the seq its first line has or would have); None if the task
        has no record."""
        row = self._read_one("SELECT log FROM tasks WHERE id = ?", (task_id,))
        if row is None:
            return None
        if row[0] is None:
            return {"lines": [], "first": 1}
        try:
            tail = json.loads(row[0])
        except ValueError:
            return {"lines": [], "first": 1}
        return tail if isinstance(tail, dict) else {"lines": [], "first": 1}

    def log_page(self, task_id: str, after: int = 0,
                 limit: int | None = None) -> dict[str, Any] | None:
        """A page of a recorded task's log tail, as ``Manager.get_log`` answers it
        (``dropped``: the lines before the tail); None if the task has no record."""
        tail = self.log_tail(task_id)
        if tail is None:
            return None
        kept = [line for line in tail.get("lines", []) if line.get("seq", 0) > after]
        lines = kept if limit is None else kept[:limit]
        return {"lines": lines, "next": lines[-1]["seq"] if lines else after,
                "dropped": max(0, int(tail.get("first", 1)) - 1),
                "complete": len(lines) == len(kept)}

    def _read_one(self, sql: str, params: tuple[Any, ...]) -> Any:
        rows = self._read_all(sql, params)
        return rows[0] if rows else None

    def _read_all(self, sql: str, params: Any) -> list[Any]:
        if self._closed and self._db is None:
            return []
        try:
            db = self._readers.get_nowait()
        except queue.Empty:
            try:
                db = self._connect()
            except sqlite3.Error as exc:
                log.error("journal %s: cannot read: %s", self.path, exc)
                return []
            with self._lock:
                self._all_readers.append(db)
        try:
            return db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            log.error("journal %s: cannot read: %s", self.path, exc)
            return []
        finally:
            self._readers.put(db)

    # -- the writer thread -----------------------------------------------------------

    def _run(self) -> None:
        retry = CONSTS.journal_batch_interval
        last_retention = time.monotonic() - CONSTS.journal_retention_interval + 1.0
        while True:
            due = last_retention + CONSTS.journal_retention_interval - time.monotonic()
            if self._error is not None:
                due = min(due, retry)
            elif self._tails:
                due = min(due, CONSTS.journal_batch_interval)
            self._wake.wait(max(0.0, due))
            stopping = self._stopping.is_set()
            if self._wake.is_set() and not stopping:
                # NOTE: gather the changes of a short while into one transaction
                self._stopping.wait(CONSTS.journal_batch_interval)
            self._wake.clear()
            try:
                ok = self._write_batch(final=stopping)
            except Exception:  # NOTE: a bug here must not end the writer
                log.exception("journal %s: the writer failed", self.path)
                ok = False
            retry = CONSTS.journal_batch_interval if ok else min(
                retry * 2, CONSTS.journal_retry_max)
            if stopping:
                return
            since = time.monotonic() - last_retention
            if since >= CONSTS.journal_retention_interval or (
                    self._rows > self.retention_tasks and since >= 1.0):
                self._retain()
                last_retention = time.monotonic()

    def _write_batch(self, final: bool = False) -> bool:
        """Write and commit what is pending; on failure keep it for the next try."""
        with self._lock:
            batch, self._pending = self._pending, {}
            keys, self._pending_keys = self._pending_keys, []
            self._pending_bytes = 0
            self._writing = batch
            reserve = self._reserve_wanted if self._reserve_wanted > self._reserved else 0
        rows, inserted = [], 0
        for task_id, entry in batch.items():
            snapshot = entry.snapshot
            if entry.log is not None and snapshot.state in _TERMINAL:
                self._follow_tail(task_id, entry.log)
            if entry.only_log:
                continue
            inserted += entry.new
            rows.append((snapshot.number, snapshot.id, snapshot.operation, snapshot.object_id,
                         snapshot.state, snapshot.state in _TERMINAL, snapshot.created_at,
                         snapshot.modified_at, snapshot.json()))
        purged = {task_id for task_id, entry in batch.items() if entry.only_log}
        tails = self._ripe_tails(purged, everything=final)
        if not (rows or keys or tails or reserve):
            with self._lock:
                self._writing = {}
            return True
        db = self._writer()
        try:
            db.execute("BEGIN IMMEDIATE")
            for row in rows:
                try:
                    db.execute(_UPSERT, row)
                except sqlite3.IntegrityError as exc:  # NOTE: one bad row is not the batch
                    log.error("journal %s: task %s not recorded: %s", self.path, row[1], exc)
            for task_id, tail, _, _ in tails:
                if tail is not None:
                    db.execute("UPDATE tasks SET log = ? WHERE id = ?", (tail, task_id))
            db.executemany(
                "INSERT INTO idempotency_keys (key, digest, task_id, created_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET digest = excluded.digest,"
                " task_id = excluded.task_id, created_at = excluded.created_at",
                [(key, record.digest, record.task_id, record.created_at)
                 for key, record in keys])
            if reserve:
                db.execute("INSERT INTO meta (name, value) VALUES ('reserved', ?) ON CONFLICT "
                           "(name) DO UPDATE SET value = excluded.value", (reserve,))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            self._fail(f"cannot write: {exc}")
            with self._lock:
                self._writing = {}
                for task_id, entry in batch.items():
                    if task_id not in self._pending and not self._closed:
                        self._pending[task_id] = entry
                        self._pending_bytes += entry.size
                self._pending_keys[:0] = keys
            return False
        with self._lock:
            self._writing = {}
            if self._error is not None:
                log.info("journal %s: writing again", self.path)
            self._error = None
            if reserve:
                self._reserved = max(self._reserved, reserve)
        self._rows += inserted
        for task_id, _, seq, done in tails:
            if done:
                self._tails.pop(task_id, None)
            elif task_id in self._tails:
                self._tails[task_id] = (self._tails[task_id][0], seq)
        return True

    def _writer(self) -> sqlite3.Connection:
        """The writer's connection; opened again after the file was read-only (a
        connection that opened it so stays read-only even once it may be written)."""
        db = self._db
        assert db is not None
        if self._error is not None and "readonly" in self._error:
            try:
                fresh = self._connect()
                self._prepare(fresh)
            except sqlite3.Error:
                return db
            with contextlib.suppress(sqlite3.Error):
                db.close()
            self._db = db = fresh
        return db

    def _follow_tail(self, task_id: str, task_log: TaskLog) -> None:
        """Write this terminal task's log tail now, and again once its output ended."""
        if task_id not in self._tails and len(self._tails) >= _MAX_TAILS:
            self._tails.pop(next(iter(self._tails)))
        if task_id not in self._tails:
            self._tails[task_id] = (task_log, -1)

    def _ripe_tails(self, purged: set[str], everything: bool,
                    ) -> list[tuple[str, bytes | None, int, bool]]:
        """The log tails to write: ``(task id, tail or None if unchanged, the log's next
        seq, done)``; done once its output ended or the task was purged."""
        ripe: list[tuple[str, bytes | None, int, bool]] = []
        for task_id, (task_log, written) in self._tails.items():
            done = task_log.closed or task_id in purged or everything
            seq = task_log.next_seq
            if seq != written:
                ripe.append((task_id, _tail_json(task_log), seq, done))
            elif done:
                ripe.append((task_id, None, seq, done))
        return ripe

    def _retain(self) -> None:
        """Delete finished records older than the retention, then the oldest finished
        ones beyond the count, and expired keys; in chunks, each committed."""
        db = self._db
        if db is None:
            return
        cutoff = time.time() - self.retention
        try:
            deleted = 0
            while True:
                gone = db.execute(
                    "DELETE FROM tasks WHERE number IN (SELECT number FROM tasks "
                    "WHERE terminal = 1 AND modified_at < ? LIMIT ?)",
                    (cutoff, _DELETE_CHUNK)).rowcount
                deleted += gone
                if gone < _DELETE_CHUNK:
                    break
            self._rows = int(db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])
            while self._rows > self.retention_tasks:
                gone = db.execute(
                    "DELETE FROM tasks WHERE number IN (SELECT number FROM tasks "
                    "WHERE terminal = 1 ORDER BY number LIMIT ?)",
                    (min(_DELETE_CHUNK, self._rows - self.retention_tasks),)).rowcount
                deleted += gone
                self._rows -= gone
                if not gone:
                    break  # NOTE: only unfinished records are left: they are kept
            db.execute("DELETE FROM idempotency_keys WHERE created_at < ?",
                       (time.time() - KEY_TTL,))
        except sqlite3.Error as exc:
            self._fail(f"retention: {exc}")
            return
        if deleted:
            with self._lock:
                self._cache.clear()  # NOTE: some of them may be gone now
                self._cache_bytes = 0
            log.debug("journal %s: %d finished record(s) past the retention deleted",
                      self.path, deleted)


def _tail_json(task_log: TaskLog) -> bytes:
    """The newest lines of a log (at most LOG_TAIL_LINES and about LOG_TAIL_BYTES) as
    ``{"lines": [...], "first": seq}``."""
    lines, _ = task_log.read(max(0, task_log.next_seq - 1 - LOG_TAIL_LINES))
    size = 0
    keep = len(lines)
    for index in range(len(lines) - 1, -1, -1):
        size += len(lines[index]["text"]) + 64
        if size > LOG_TAIL_BYTES:
            break
        keep = index
    lines = lines[keep:]
    first = lines[0]["seq"] if lines else task_log.next_seq
    return encode_json({"lines": lines, "first": first})


def _decode(number: int, blob: bytes | str) -> TaskSnapshot | None:
    """A record back to a snapshot; None (logged) if it is not a task."""
    try:
        # NOTE: the record is the task's JSON as the snapshot made it: kept, not re-encoded
        data = blob if isinstance(blob, bytes) else blob.encode()
        return TaskSnapshot.from_wire(json.loads(data), number, json_bytes=data)
    except (ValueError, KeyError, TypeError) as exc:
        log.error("journal: record %s is not a task: %s", number, exc)
        return None
