"""Ledger backends: where the batches go and where the queries run.

``LedgerBackend`` is what the ledger's writer thread and its queries use; ``SQLiteBackend``
(the embedded default) lives here, ``usage.postgres.PostgresBackend`` in its own module (it
needs the optional ``psycopg``). ``open_backend(target)`` picks one by the target's form: a
``postgresql://`` (or ``postgres://``) URL, else a SQLite file path or ``":memory:"``.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Final
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from ..errors import ConfigError
from ..records import CallRecord
from .query import SQLITE, Dialect, SQLConnection
from .schema import INSERT_SQL, SchemaTooNew, migrate, rows_for

__all__ = [
    "MEMORY",
    "LedgerBackend",
    "SQLiteBackend",
    "WriteBusy",
    "is_url",
    "open_backend",
    "redact",
]

#: Path of a ledger that lives in this process only (tests, short scripts).
MEMORY: Final = ":memory:"

_PG_SCHEMES = ("postgresql", "postgres")
#: The WAL file is cut back to this size after a checkpoint (SQLite keeps it otherwise).
_JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024
#: Pages after which a commit checkpoints the WAL into the database (SQLite's default).
_AUTOCHECKPOINT_PAGES = 1000


class WriteBusy(Exception):
    """The batch was not written for a reason that passes (a lock, a lost connection): retry."""


def is_url(target: str) -> bool:
    """True for a ``postgresql://`` / ``postgres://`` URL."""
    return target.split("://", 1)[0].lower() in _PG_SCHEMES if "://" in target else False


def redact(target: str) -> str:
    """``target`` with any password replaced by ``***`` (safe to print and log)."""
    if "://" not in target:
        return target
    try:
        parts = urlsplit(target)
    except ValueError:
        return "<unparsable ledger URL>"
    if parts.password is None and "password" not in parts.query.lower():
        return target
    netloc = parts.netloc.rpartition("@")[2]
    if parts.username is not None:
        password = ":***" if parts.password is not None else ""
        netloc = f"{quote(unquote(parts.username), safe='')}{password}@{netloc}"
    query = "&".join(
        f"{k}=***" if k.lower() == "password" else f"{k}={v}" if sep else k
        for k, sep, v in (item.partition("=") for item in parts.query.split("&") if item)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def secrets_of(target: str) -> list[str]:
    """The password in ``target`` (as written and decoded), for scrubbing driver messages."""
    if "://" not in target:
        return []
    try:
        parts = urlsplit(target)
    except ValueError:
        return []
    found = [parts.password] if parts.password else []
    for item in parts.query.split("&"):
        key, _, value = item.partition("=")
        if key.lower() == "password" and value:
            found.append(value)
    return [v for s in found for v in {s, unquote(s)} if v]


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with each secret replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


class LedgerBackend(ABC):
    """A store for ledger rows: batches from one writer thread, queries from any thread."""

    #: ``"sqlite"`` or ``"postgresql"``.
    kind: ClassVar[str]
    #: The SQL dialect the queries use.
    dialect: ClassVar[Dialect]

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the rows go, safe to print (a path, ``":memory:"`` or a redacted URL)."""

    @property
    def persistent(self) -> bool:
        """False when the rows live in this process only."""
        return True

    @abstractmethod
    def write(self, records: list[CallRecord], epoch_offset_ns: int) -> None:
        """Commit ``records`` in one transaction (duplicate request ids are ignored).

        Raises ``WriteBusy`` when a retry may succeed; anything else loses the batch.
        """

    def recover(self) -> None:  # noqa: B027 - optional hook
        """After a failed write: put the store back in a state where writes can succeed."""

    def maintain(self) -> None:  # noqa: B027 - optional hook
        """Periodic upkeep from the writer thread (SQLite: checkpoint the WAL)."""

    @abstractmethod
    def reading(self) -> contextlib.AbstractContextManager[SQLConnection]:
        """A connection for queries, held exclusively inside the ``with``."""

    @abstractmethod
    def close_writer(self) -> None:
        """Close what the writer used (an in-memory store stays readable)."""

    @abstractmethod
    def close(self) -> None:
        """Close every connection (idempotent)."""

    def scrub(self, text: str) -> str:
        """A driver message made safe to log (no credentials)."""
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


def connect_sqlite(path: str, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection to the SQLite file ``path`` in WAL mode, for one process among several
    (the ledger's, and the budget store's beside it)."""
    if path != MEMORY:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: we issue BEGIN/COMMIT ourselves; timeout= is SQLite's busy
    # handler, which waits for another process's write lock without holding the GIL.
    conn = sqlite3.connect(
        path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
    )
    try:
        _enable_wal(conn, busy_timeout_s)
        # In WAL mode NORMAL is still crash-safe (no corruption); a power loss may drop the
        # last transactions, a process crash does not.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA wal_autocheckpoint = {_AUTOCHECKPOINT_PAGES}")
        # Without a limit the WAL file keeps its largest size forever: on a small volume a
        # burst leaves it full even after the pages were checkpointed.
        conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
    except BaseException:
        conn.close()
        raise
    return conn


def _enable_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    # Switching a new file to WAL needs an exclusive lock and SQLite does not run the busy
    # handler for it: when several processes create the ledger at once, retry here.
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class SQLiteBackend(LedgerBackend):
    """One SQLite file in WAL mode (several processes may share it), or ``":memory:"``."""

    kind = "sqlite"
    dialect = SQLITE

    def __init__(self, path: str, *, busy_timeout_s: float = 5.0) -> None:
        """Open (creating or migrating) the file; ``ConfigError`` when that fails."""
        self._path = path
        self._busy_timeout_s = busy_timeout_s
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        self._closed = False
        self._conn = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            conn = connect_sqlite(self._path, self._busy_timeout_s)
            try:
                migrate(conn)
            except BaseException:
                conn.close()
                raise
        except (sqlite3.Error, OSError, SchemaTooNew) as exc:
            raise ConfigError(f"cannot open usage ledger {self._path}: {exc}") from exc
        return conn

    @property
    def location(self) -> str:
        """The file, or ``":memory:"``."""
        return self._path

    @property
    def persistent(self) -> bool:
        """False for ``":memory:"``."""
        return self._path != MEMORY

    def write(self, records: list[CallRecord], epoch_offset_ns: int) -> None:
        """One ``BEGIN IMMEDIATE ... COMMIT``; a locked file raises ``WriteBusy``."""
        with self._write_lock:
            conn = self._conn
            try:
                # IMMEDIATE takes the write lock up front, so a busy database fails here (and
                # is retried) instead of half-way through the batch.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    # Rows are made lazily: sqlite3 releases the GIL around each row's step,
                    # so the event loop thread gets the GIL between rows, not only batches.
                    conn.executemany(INSERT_SQL, rows_for(records, epoch_offset_ns))
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                if _is_busy(exc):
                    raise WriteBusy(str(exc)) from exc
                raise

    def recover(self) -> None:
        """Roll back what a failed write left open and shrink the WAL; reopen the file if
        the connection is stuck (a failed ROLLBACK on a full disk leaves it in a
        transaction, and every later BEGIN would fail)."""
        with self._write_lock:
            conn = self._conn
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if conn.in_transaction and self._path != MEMORY:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
                with contextlib.suppress(ConfigError):
                    self._conn = self._open()

    def maintain(self) -> None:
        """A passive checkpoint (never waits for other processes); the WAL file is then
        cut to ``journal_size_limit``."""
        if self._path == MEMORY:
            return
        with self._write_lock, contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    @contextlib.contextmanager
    def reading(self) -> Iterator[SQLConnection]:
        """The writer's connection for ``":memory:"`` (one database per connection), else a
        separate read connection."""
        if self._path == MEMORY:
            with self._write_lock:
                yield self._conn
            return
        with self._read_lock:
            if self._reader is None:
                self._reader = sqlite3.connect(
                    self._path,
                    timeout=self._busy_timeout_s,
                    isolation_level=None,
                    check_same_thread=False,
                )
            yield self._reader

    def close_writer(self) -> None:
        """Close the write connection, unless the rows live in it (``":memory:"``)."""
        if self._path != MEMORY:
            with self._write_lock:
                self._conn.close()

    def close(self) -> None:
        """Close the read (and, unless in memory, the write) connection."""
        self.close_writer()
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None


def open_backend(target: str, *, busy_timeout_s: float = 5.0) -> LedgerBackend:
    """The backend for ``target``: a PostgreSQL URL, else a SQLite path or ``":memory:"``.

    Raises ``ConfigError`` (without credentials) when it cannot be opened.
    """
    if is_url(target):
        from .postgres import PostgresBackend

        return PostgresBackend(target, timeout_s=busy_timeout_s)
    if "://" in target:
        raise ConfigError(
            f"unsupported usage ledger URL {redact(target)!r}: use postgresql://... or a file path"
        )
    return SQLiteBackend(target, busy_timeout_s=busy_timeout_s)
