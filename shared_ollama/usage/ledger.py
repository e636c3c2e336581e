"""The usage ledger: one row per CallRecord, written in batches by a background thread.

Owns the writer thread, the bounded hand-off queue and the backend (an SQLite file by
default, or PostgreSQL by URL; see ``backends``), and answers queries.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from ..errors import ConfigError
from ..records import CallRecord
from .backends import MEMORY, LedgerBackend, SQLiteBackend, WriteBusy, open_backend, redact
from .query import Summary, UsageRow, When, query_rows, query_summary

__all__ = [
    "DEFAULT_MAX_QUEUE",
    "MEMORY",
    "Ledger",
    "LedgerStats",
    "default_ledger_location",
    "default_ledger_path",
]

log = logging.getLogger("shared_ollama.usage")

#: Records that may wait for the writer; past it new records are dropped and counted.
DEFAULT_MAX_QUEUE: Final = 20_000
_ENV = "SHARED_OLLAMA_LEDGER"
_BUSY_RETRIES = 20
_BUSY_BACKOFF_MAX_S = 1.0
#: The writer's turns per flush interval: a record waits at most one turn before its batch
#: starts, so a quarter interval leaves the rest of the promise for the write itself.
_TURNS_PER_INTERVAL = 4
#: Seconds between the writer's housekeeping (an SQLite WAL checkpoint).
_MAINTAIN_EVERY_S = 30.0

_degrade_warned = False


def default_ledger_location() -> str:
    """``$SHARED_OLLAMA_LEDGER`` (a path or a ``postgresql://`` URL), else the per-user file
    (see ``default_ledger_path``)."""
    if env := os.environ.get(_ENV):
        return env if "://" in env else str(Path(env).expanduser())
    return str(_per_user_path())


def default_ledger_path() -> Path:
    """``$SHARED_OLLAMA_LEDGER``, else ``$XDG_DATA_HOME`` (or ``~/.local/share``)
    ``/shared_ollama/usage.sqlite3``."""
    if env := os.environ.get(_ENV):
        return Path(env).expanduser()
    return _per_user_path()


def _per_user_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "shared_ollama" / "usage.sqlite3"


@dataclass(frozen=True)
class LedgerStats:
    """What a ledger did so far (this process only)."""

    #: ``"sqlite"`` or ``"postgresql"`` (None when disabled).
    backend: str | None
    #: Where the rows go, safe to print (passwords are redacted).
    location: str | None
    #: False when the rows live in this process only.
    persisted: bool
    #: Records handed to the backend (duplicates included, as they are ignored there).
    written: int
    #: Records lost, all causes: ``overflowed + failed + after_close``.
    dropped: int
    #: Records refused because the queue was full (the oldest are kept).
    overflowed: int
    #: Records in batches that could not be written (logged).
    failed: int
    #: Records submitted after ``close()``.
    after_close: int
    #: Records waiting in the queue.
    pending: int
    #: The queue's bound.
    max_queue: int


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
        backend: LedgerBackend,
        batch_size: int,
        flush_interval_s: float,
        epoch_offset_ns: int,
        max_queue: int,
        *,
        close_bound_s: float,
    ) -> None:
        self.backend = backend
        #: How long the writes left at a stop may keep retrying a busy or absent store.
        self.close_bound_s = close_bound_s
        #: Set by ``stop()``: past it, a batch that cannot be written is dropped (and counted).
        self.stop_deadline: float | None = None
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        #: Wakes the writer before its timer: a full batch, a flush or a stop.
        self.nudge = threading.Event()
        #: Times the writer woke up (its timer or a nudge), for diagnostics and tests.
        self.turns = 0
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.epoch_offset_ns = epoch_offset_ns
        self.max_queue = max_queue
        self.written = 0
        #: Written by the writer thread only.
        self.failed = 0
        #: Written by submitting threads, under ``count_lock`` (a rare path).
        self.overflowed = 0
        self.after_close = 0
        self.count_lock = threading.Lock()
        self.overflowing = False
        self.thread = threading.Thread(target=self._run, name="shared_ollama-ledger", daemon=True)
        self.stopped = False
        self.stop_lock = threading.Lock()

    @property
    def dropped(self) -> int:
        return self.overflowed + self.failed + self.after_close

    def overflow(self) -> None:
        """Count one record refused by a full queue; warn once per episode."""
        with self.count_lock:
            self.overflowed += 1
            if self.overflowing:
                return
            self.overflowing = True
        log.warning(
            "usage ledger %s: queue full (%d records); new records are dropped and counted "
            "until the writer catches up",
            self.backend.location,
            self.max_queue,
        )

    def _run(self) -> None:
        # The writer wakes on its own timer (a quarter of flush_interval_s) or when nudged (a
        # full batch, a flush, a stop), never once per record: a put that woke a blocked
        # get() handed the GIL to this thread on every call. A record waits at most one turn
        # before its batch is written, so it is committed within the flush interval.
        period = self.flush_interval_s / _TURNS_PER_INTERVAL
        next_upkeep = time.monotonic() + _MAINTAIN_EVERY_S
        while True:
            self.nudge.wait(period)
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
            if time.monotonic() >= next_upkeep:
                next_upkeep = time.monotonic() + _MAINTAIN_EVERY_S
                self.backend.maintain()

    def _write(self, batch: list[CallRecord]) -> None:
        delay = 0.01
        for attempt in range(1, _BUSY_RETRIES + 1):
            try:
                self.backend.write(batch, self.epoch_offset_ns)
            except WriteBusy as exc:
                deadline = self.stop_deadline  # closing: retry only within the close's bound
                if attempt < _BUSY_RETRIES and (
                    deadline is None or time.monotonic() + delay < deadline
                ):
                    # The backend already waited (SQLite's busy handler); another process
                    # holds the lock for long, or the server went away: back off, retry.
                    time.sleep(delay)
                    delay = min(delay * 2, _BUSY_BACKOFF_MAX_S)
                    continue
                reason = str(exc)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                # A full disk or a broken connection: make the next batch possible.
                self.backend.recover()
            else:
                self.written += len(batch)
                if self.overflowing:
                    with self.count_lock:
                        self.overflowing = False
                return
            self.failed += len(batch)
            log.error(
                "usage ledger %s: dropped %d records: %s",
                self.backend.location,
                len(batch),
                self.backend.scrub(reason),
            )
            return

    def stop(self) -> None:
        """Write what is queued, end the thread, close the connection (idempotent)."""
        with self.stop_lock:
            if self.stopped:
                return
            self.stopped = True
        self.stop_deadline = time.monotonic() + self.close_bound_s
        self.queue.put(_STOP)
        self.nudge.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join()
        self.backend.close_writer()  # an in-memory ledger stays readable until collected


class Ledger:
    """Usage ledger with a batching background writer: SQLite (WAL) or PostgreSQL.

    ``submit()`` only enqueues (safe on an event loop, never blocks: past ``max_queue``
    waiting records it drops new ones and counts them); ``flush()`` waits until everything
    submitted before it is committed and says whether anything was lost; ``close()``
    flushes and stops the writer. Several processes may share one file or database.

    ``path``: a SQLite file, ``":memory:"`` (this process only), a ``postgresql://`` URL, or
    None for ``default_ledger_location()``. When that default is the per-user file and it
    cannot be opened (a read-only home, a locked-down account), the ledger keeps serving in
    memory after one warning (``persisted`` is False); a location given explicitly (the
    argument or ``$SHARED_OLLAMA_LEDGER``) that cannot be opened is a ``ConfigError``.
    ``Ledger.disabled()`` records nothing at all.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        batch_size: int = 500,
        flush_interval_s: float = 0.5,
        busy_timeout_s: float = 5.0,
        epoch_offset_ns: int | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> None:
        """Open (creating or migrating) the ledger and start its writer thread.

        ``epoch_offset_ns`` converts the records' monotonic ns to epoch ns; by default it is
        captured once here (``time.time_ns() - time.monotonic_ns()``).
        """
        explicit = path is not None or bool(os.environ.get(_ENV))
        self._offset = (
            time.time_ns() - time.monotonic_ns() if epoch_offset_ns is None else epoch_offset_ns
        )
        self._closed = False
        self._warned_closed = False
        self._report_lock = threading.Lock()
        self._reported_dropped = 0
        backend: LedgerBackend
        try:
            target = os.fspath(path) if path is not None else default_ledger_location()
            backend = open_backend(target, busy_timeout_s=busy_timeout_s)
        except (ConfigError, RuntimeError, OSError) as exc:
            # RuntimeError/OSError: no home directory to find the default under.
            if explicit:
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(f"cannot open usage ledger: {exc}") from exc
            _warn_degraded(exc)
            backend = SQLiteBackend(MEMORY, busy_timeout_s=busy_timeout_s)
        self._backend: LedgerBackend | None = backend
        # A close waits for the queued writes at most one busy wait and one retry (a store
        # locked by another process or gone away: 20 retries took ~100 s with SQLite).
        self._writer: _Writer | None = _Writer(
            backend, batch_size, flush_interval_s, self._offset, max_queue,
            close_bound_s=2 * busy_timeout_s,
        )  # fmt: skip
        self._writer.thread.start()
        # Closes a forgotten ledger at garbage collection or interpreter exit, so that the
        # last batch is still written.
        self._finalizer = weakref.finalize(self, self._writer.stop)

    @classmethod
    def disabled(cls) -> Ledger:
        """A ledger that records nothing (``UsageConfig(enabled=False)``)."""
        self = cls.__new__(cls)
        self._backend = None
        self._closed = True
        self._warned_closed = True
        self._writer = None
        self._offset = 0
        self._report_lock = threading.Lock()
        self._reported_dropped = 0
        self._finalizer = weakref.finalize(self, lambda: None)
        return self

    @property
    def path(self) -> str | None:
        """The file (``":memory:"`` for an in-process ledger, a URL without its password for
        PostgreSQL, None when disabled)."""
        return self._backend.location if self._backend else None

    @property
    def backend(self) -> str | None:
        """``"sqlite"`` or ``"postgresql"`` (None when disabled)."""
        return self._backend.kind if self._backend else None

    @property
    def enabled(self) -> bool:
        """False for ``Ledger.disabled()``."""
        return self._backend is not None

    @property
    def persisted(self) -> bool:
        """False when the rows live in this process only (``":memory:"``, a degraded
        default, or disabled)."""
        return self._backend.persistent if self._backend else False

    @property
    def epoch_offset_ns(self) -> int:
        """Added to monotonic ns to get epoch ns."""
        return self._offset

    @property
    def written(self) -> int:
        """Records handed to the backend so far (duplicates included, as they are ignored)."""
        return self._writer.written if self._writer else 0

    @property
    def dropped(self) -> int:
        """Records lost so far: queue overflow, failed writes (logged), submits after close."""
        return self._writer.dropped if self._writer else 0

    def stats(self) -> LedgerStats:
        """Counters of this ledger (this process only); never blocks."""
        w = self._writer
        return LedgerStats(
            backend=self.backend,
            location=self.path,
            persisted=self.persisted,
            written=w.written if w else 0,
            dropped=w.dropped if w else 0,
            overflowed=w.overflowed if w else 0,
            failed=w.failed if w else 0,
            after_close=w.after_close if w else 0,
            pending=w.queue.qsize() if w else 0,
            max_queue=w.max_queue if w else 0,
        )

    def submit(self, record: CallRecord) -> None:
        """Queue one record; never blocks. The record must not change afterwards."""
        writer = self._writer
        if writer is None:
            return
        if self._closed:
            with writer.count_lock:
                writer.after_close += 1
            if not self._warned_closed:
                self._warned_closed = True
                log.warning("usage ledger %s is closed; records are dropped", self.path)
            return
        pending = writer.queue.qsize()
        if pending >= writer.max_queue:
            # Keep the oldest: they are already in order and some may be in flight.
            writer.overflow()
            return
        writer.queue.put(record)
        # Set once per full batch (is_set is a plain read): Event.set takes a lock each time.
        if pending + 1 >= writer.batch_size and not writer.nudge.is_set():
            writer.nudge.set()

    __call__ = submit

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted before this call is committed.

        Returns True when it is and no record was dropped since the previous completed
        ``flush()`` (overflow, a failed write, a submit after ``close()``); False on a
        timeout or a loss (see ``dropped`` and ``stats()``). Blocks: from async code run it in
        a thread (``await asyncio.to_thread(ledger.flush)``).
        """
        if not self._wait(timeout):
            return False  # the drops, if any, are reported by the next completed flush
        with self._report_lock:
            dropped = self.dropped
            fresh = dropped - self._reported_dropped
            self._reported_dropped = dropped
        return fresh == 0

    def _wait(self, timeout: float | None = None) -> bool:
        writer = self._writer
        if writer is None or self._closed:
            return True
        marker = _Flush()
        writer.queue.put(marker)  # a marker is never refused: it carries no record
        writer.nudge.set()
        return marker.done.wait(timeout)

    def close(self) -> None:
        """Flush, stop the writer thread and close the connections (idempotent)."""
        self._closed = True
        self._finalizer()
        if self._backend is not None and self._backend.persistent:
            self._backend.close()

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
    ) -> Summary:
        """Flush, then aggregate per group (see ``query.query_summary``); the result also
        says whether the rows are persisted and how many records this process dropped."""
        if self._backend is None:
            return Summary(persisted=False)
        self._wait()
        with self._backend.reading() as conn:
            rows = query_summary(
                conn,
                now=time.time(),
                project=project,
                model=model,
                since=since,
                until=until,
                group_by=group_by,
                dialect=self._backend.dialect,
            )
        return Summary(rows, persisted=self.persisted, dropped=self.dropped)

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
        if self._backend is None:
            return []
        self._wait()
        with self._backend.reading() as conn:
            return query_rows(
                conn,
                now=time.time(),
                project=project,
                model=model,
                since=since,
                until=until,
                limit=limit,
                dialect=self._backend.dialect,
            )

    def count(self) -> int:
        """Rows committed so far (does not flush)."""
        if self._backend is None:
            return 0
        with self._backend.reading() as conn:
            return int(next(iter(conn.execute("SELECT COUNT(*) FROM calls")))[0])

    def __repr__(self) -> str:
        return f"Ledger({self.path!r})"


def _warn_degraded(exc: BaseException) -> None:
    # Once per process: a service that builds many clients should not repeat it.
    global _degrade_warned
    if _degrade_warned:
        return
    _degrade_warned = True
    log.warning(
        "usage ledger: the default location cannot be opened (%s); usage is kept in memory "
        "only and is lost at exit. Set usage.path or $%s to a writable file or a "
        "postgresql:// URL to persist it.",
        redact(str(exc)),
        _ENV,
    )
