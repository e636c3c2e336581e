"""The usage ledger: one SQLite row per CallRecord, written in batches by a background thread.

Owns the file (WAL, migrations, busy retries), the writer thread and the read connection.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Final

from ..errors import ConfigError
from ..records import CallRecord
from .query import SummaryRow, UsageRow, When, query_rows, query_summary
from .schema import INSERT_SQL, SchemaTooNew, migrate, rows_for

__all__ = ["MEMORY", "Ledger", "default_ledger_path"]

log = logging.getLogger("shared_ollama.usage")

#: Path of a ledger that lives in this process only (tests, short scripts).
MEMORY: Final = ":memory:"

_BUSY_RETRIES = 20
_BUSY_BACKOFF_MAX_S = 1.0


def default_ledger_path() -> Path:
    """``$SHARED_OLLAMA_LEDGER``, else ``$XDG_DATA_HOME`` (or ``~/.local/share``)
    ``/shared_ollama/usage.sqlite3``."""
    if env := os.environ.get("SHARED_OLLAMA_LEDGER"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "shared_ollama" / "usage.sqlite3"


def _connect(path: str, busy_timeout_s: float) -> sqlite3.Connection:
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
    except BaseException:
        conn.close()
        raise
    return conn


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


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


class _Flush:
    """A marker in the queue: the writer sets ``done`` once everything before it is durable."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP: Final = object()


class _Writer:
    """The background thread's state; kept apart from ``Ledger`` so that the ledger can be
    garbage-collected (and closed by its finalizer) while the thread runs."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        lock: threading.Lock,
        batch_size: int,
        flush_interval_s: float,
        epoch_offset_ns: int,
    ) -> None:
        self.conn = conn
        self.lock = lock
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        #: Wakes the writer before its timer: a full batch, a flush or a stop.
        self.nudge = threading.Event()
        #: Times the writer woke up (its timer or a nudge), for diagnostics and tests.
        self.turns = 0
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.epoch_offset_ns = epoch_offset_ns
        self.written = 0
        self.dropped = 0
        self.in_memory = False
        self.thread = threading.Thread(target=self._run, name="shared_ollama-ledger", daemon=True)
        self.stopped = False
        self.stop_lock = threading.Lock()

    def _run(self) -> None:
        # The writer wakes on its own timer (every flush_interval_s) or when nudged (a full
        # batch, a flush, a stop), never once per record: a put that woke a blocked get()
        # handed the GIL to this thread on every call. A record waits at most one interval
        # (plus the write) before it is committed: the crash-loss window is unchanged.
        while True:
            self.nudge.wait(self.flush_interval_s)
            self.nudge.clear()  # before draining: a later nudge is kept for the next turn
            self.turns += 1
            batch: list[CallRecord] = []
            markers: list[object] = []
            while True:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, CallRecord):
                    batch.append(item)
                    if len(batch) >= self.batch_size:
                        self._write(batch)
                        batch = []
                else:
                    markers.append(item)
                    if item is _STOP:
                        break  # nothing is submitted after a stop
            if batch:
                self._write(batch)
            for marker in markers:
                if isinstance(marker, _Flush):
                    marker.done.set()
            if _STOP in markers:
                return

    def _write(self, batch: list[CallRecord]) -> None:
        delay = 0.01
        for attempt in range(1, _BUSY_RETRIES + 1):
            try:
                with self.lock:
                    self._transaction(batch)
            except sqlite3.OperationalError as exc:
                if _is_busy(exc) and attempt < _BUSY_RETRIES:
                    # busy_timeout already waited; another process holds the lock for long.
                    time.sleep(delay)
                    delay = min(delay * 2, _BUSY_BACKOFF_MAX_S)
                    continue
                log.error("usage ledger: dropped %d records: %s", len(batch), exc)
            except Exception:
                log.exception("usage ledger: dropped %d records", len(batch))
            else:
                self.written += len(batch)
                return
            break
        self.dropped += len(batch)

    def _transaction(self, batch: list[CallRecord]) -> None:
        conn = self.conn
        # IMMEDIATE takes the write lock up front, so a busy database fails here (and is
        # retried) instead of half-way through the batch.
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Rows are made lazily: sqlite3 releases the GIL around each row's step, so
            # the event loop thread gets the GIL between rows, not only between batches.
            conn.executemany(INSERT_SQL, rows_for(batch, self.epoch_offset_ns))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def stop(self) -> None:
        """Write what is queued, end the thread, close the connection (idempotent)."""
        with self.stop_lock:
            if self.stopped:
                return
            self.stopped = True
        self.queue.put(_STOP)
        self.nudge.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join()
        if not self.in_memory:  # an in-memory ledger stays readable until collected
            with self.lock:
                self.conn.close()


class Ledger:
    """SQLite usage ledger (WAL) with a batching background writer.

    ``submit()`` only enqueues (safe on an event loop); ``flush()`` waits until everything
    submitted before it is committed; ``close()`` flushes and stops the writer. Several
    processes may share one file. ``path=None`` uses ``default_ledger_path()``, ``":memory:"``
    keeps the ledger in this process; ``Ledger.disabled()`` records nothing at all.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        batch_size: int = 500,
        flush_interval_s: float = 0.5,
        busy_timeout_s: float = 5.0,
        epoch_offset_ns: int | None = None,
    ) -> None:
        """Open (creating or migrating) the ledger and start its writer thread.

        ``epoch_offset_ns`` converts the records' monotonic ns to epoch ns; by default it is
        captured once here (``time.time_ns() - time.monotonic_ns()``).
        """
        self._path: str | None = MEMORY if path == MEMORY else str(path or default_ledger_path())
        self._busy_timeout_s = busy_timeout_s
        self._offset = (
            time.time_ns() - time.monotonic_ns() if epoch_offset_ns is None else epoch_offset_ns
        )
        self._closed = False
        self._warned_closed = False
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        try:
            conn = _connect(self._path, busy_timeout_s)
            try:
                migrate(conn)
            except BaseException:
                conn.close()
                raise
        except (sqlite3.Error, OSError, SchemaTooNew) as exc:
            raise ConfigError(f"cannot open usage ledger {self._path}: {exc}") from exc
        self._writer: _Writer | None = _Writer(
            conn, self._write_lock, batch_size, flush_interval_s, self._offset
        )
        self._writer.in_memory = self._path == MEMORY
        self._writer.thread.start()
        # Closes a forgotten ledger at garbage collection or interpreter exit, so that the
        # last batch is still written.
        self._finalizer = weakref.finalize(self, self._writer.stop)

    @classmethod
    def disabled(cls) -> Ledger:
        """A ledger that records nothing (``UsageConfig(enabled=False)``)."""
        self = cls.__new__(cls)
        self._path = None
        self._closed = True
        self._warned_closed = True
        self._writer = None
        self._reader = None
        self._offset = 0
        self._read_lock = self._write_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, lambda: None)
        return self

    @property
    def path(self) -> str | None:
        """The file (``":memory:"`` for an in-process ledger, None when disabled)."""
        return self._path

    @property
    def enabled(self) -> bool:
        """False for ``Ledger.disabled()``."""
        return self._path is not None

    @property
    def epoch_offset_ns(self) -> int:
        """Added to monotonic ns to get epoch ns."""
        return self._offset

    @property
    def written(self) -> int:
        """Records handed to SQLite so far (duplicates included, as they are ignored there)."""
        return self._writer.written if self._writer else 0

    @property
    def dropped(self) -> int:
        """Records lost to errors (logged) or submitted after ``close()``."""
        return self._writer.dropped if self._writer else 0

    def submit(self, record: CallRecord) -> None:
        """Queue one record; never blocks on disk. The record must not change afterwards."""
        writer = self._writer
        if writer is None:
            return
        if self._closed:
            writer.dropped += 1
            if not self._warned_closed:
                self._warned_closed = True
                log.warning("usage ledger %s is closed; records are dropped", self._path)
            return
        writer.queue.put(record)
        # Set once per full batch (is_set is a plain read): Event.set takes a lock each time.
        if writer.queue.qsize() >= writer.batch_size and not writer.nudge.is_set():
            writer.nudge.set()

    __call__ = submit

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted before this call is committed.

        Returns False if ``timeout`` seconds passed first. Blocks: from async code run it in a
        thread (``await asyncio.to_thread(ledger.flush)``).
        """
        writer = self._writer
        if writer is None or self._closed:
            return True
        marker = _Flush()
        writer.queue.put(marker)
        writer.nudge.set()
        return marker.done.wait(timeout)

    def close(self) -> None:
        """Flush, stop the writer thread and close the files (idempotent)."""
        self._closed = True
        self._finalizer()
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------

    def summary(
        self,
        *,
        project: str | None = None,
        model: str | None = None,
        since: When | None = None,
        until: When | None = None,
        group_by: Sequence[str] = ("project", "model"),
    ) -> list[SummaryRow]:
        """Flush, then aggregate per group (see ``query.query_summary``)."""
        if not self.enabled:
            return []
        self.flush()
        with self._reading() as conn:
            return query_summary(
                conn,
                now=time.time(),
                project=project,
                model=model,
                since=since,
                until=until,
                group_by=group_by,
            )

    def rows(
        self,
        *,
        project: str | None = None,
        model: str | None = None,
        since: When | None = None,
        until: When | None = None,
        limit: int | None = None,
    ) -> list[UsageRow]:
        """Flush, then the raw rows, oldest first."""
        if not self.enabled:
            return []
        self.flush()
        with self._reading() as conn:
            return query_rows(
                conn,
                now=time.time(),
                project=project,
                model=model,
                since=since,
                until=until,
                limit=limit,
            )

    def count(self) -> int:
        """Rows committed so far (does not flush)."""
        if not self.enabled:
            return 0
        with self._reading() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0])

    def _reading(self) -> _Reading:
        if self._path == MEMORY:
            # One in-memory database per connection: read through the writer's.
            assert self._writer is not None
            return _Reading(self._write_lock, self._writer.conn)
        with self._read_lock:
            if self._reader is None:
                assert self._path is not None
                self._reader = sqlite3.connect(
                    self._path,
                    timeout=self._busy_timeout_s,
                    isolation_level=None,
                    check_same_thread=False,
                )
            return _Reading(self._read_lock, self._reader)

    def __repr__(self) -> str:
        return f"Ledger({self._path!r})"


class _Reading:
    """``with`` holds the lock guarding a shared connection and yields the connection."""

    def __init__(self, lock: threading.Lock, conn: sqlite3.Connection) -> None:
        self._lock = lock
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        return self._conn

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
