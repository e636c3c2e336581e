"""Budgets shared by processes and hosts: per-project counters in SQLite or PostgreSQL.

``open_limits(url_or_path)`` opens the store a ``BudgetGate`` consults instead of its in-process
windows: a ``postgresql://`` URL (every process on every host that uses it agrees) or a SQLite
file (every process on one host). Each admission is one transaction that, holding a lock on the
project (PostgreSQL: a transaction-scoped advisory lock; SQLite: ``BEGIN IMMEDIATE``, one writer
at a time), sums the project's windows, refuses or counts, and commits. So:

- a request budget never overshoots: admission N+1 sees admission N's count;
- a token budget reserves each call's tokens at admission (its estimated prompt plus its
  ``max_tokens``, or ``Budget.reserve_tokens`` when the call sets none) and settles the real count
  when the call ends (a failed call settles what the server reported, usually 0). A call is
  admitted while the window's settled tokens plus reservations are below the limit, so the
  overshoot is bounded by the reservations in flight: the last admitted call's reservation, plus
  whatever calls in flight use beyond their own reservation (only possible when the prompt
  estimate is low or a call sets no ``max_tokens`` and outruns ``reserve_tokens``).

Windows slide, in buckets, as the in-process gate's do: the minute windows in 1 s buckets, the
day window in 60 s buckets; an amount counts from its bucket's start for a whole window plus one
bucket. Tokens count in the bucket of their call's admission. Time is each host's wall clock
(keep hosts in NTP sync; a skew of s seconds moves a window's edges by s).

A reservation whose call never ends (its process died) is released when its window passes.
Settlements go to the store from a background thread, so finishing a call never blocks on it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import sqlite3
import threading
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from ..config import Budget
from ..errors import BudgetExceeded, BudgetUnavailable, ConfigError
from .backends import connect_sqlite, is_url, redact, scrub, secrets_of

__all__ = [
    "Admission",
    "LimitStore",
    "PostgresLimits",
    "SqliteLimits",
    "limits_location",
    "open_limits",
]

log = logging.getLogger("shared_ollama.usage")

T = TypeVar("T")

_MINUTE: Final = 60
_DAY: Final = 86400
#: Bucket sizes (seconds) of the minute windows and of the day window.
_MINUTE_BUCKET: Final = 1
_DAY_BUCKET: Final = 60
#: How long an admission waits for another process's lock before giving up (typed error).
_LOCK_TIMEOUT_S: Final = 5.0
#: After a failure, calls are refused at once for this long before the store is tried again.
_RETRY_AFTER_S: Final = 1.0
#: PostgreSQL advisory-lock namespace ("SO"), so project locks never meet another app's.
_LOCK_CLASS: Final = 0x534F

_SCHEMA = """CREATE TABLE IF NOT EXISTS budget_usage (
        project TEXT NOT NULL,
        span TEXT NOT NULL,
        bucket BIGINT NOT NULL,
        requests BIGINT NOT NULL DEFAULT 0,
        tokens BIGINT NOT NULL DEFAULT 0,
        reserved BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (project, span, bucket)
    )"""
# span 'm': 1 s buckets of the minute windows; 'd': 60 s buckets of the day window. ``tokens``
# holds settled tokens plus open reservations; ``reserved`` the open reservations alone.
_SUMS = """SELECT span, COALESCE(SUM(requests), 0), COALESCE(SUM(tokens), 0)
    FROM budget_usage WHERE project = {p} AND (
        (span = 'm' AND bucket > {p}) OR (span = 'd' AND bucket > {p}))
    GROUP BY span"""
_BUCKETS = """SELECT span, bucket, requests, tokens FROM budget_usage
    WHERE project = {p} AND ((span = 'm' AND bucket > {p}) OR (span = 'd' AND bucket > {p}))
    ORDER BY bucket"""
_ADD = """INSERT INTO budget_usage (project, span, bucket, requests, tokens, reserved)
    VALUES ({p}, {p}, {p}, {p}, {p}, {p})
    ON CONFLICT (project, span, bucket) DO UPDATE SET
        requests = budget_usage.requests + excluded.requests,
        tokens = budget_usage.tokens + excluded.tokens,
        reserved = budget_usage.reserved + excluded.reserved"""
_SETTLE = """UPDATE budget_usage SET tokens = tokens + {p}, reserved = reserved - {p}
    WHERE project = {p} AND span = {p} AND bucket = {p}"""
_EXPIRE = """DELETE FROM budget_usage WHERE project = {p} AND (
    (span = 'm' AND bucket <= {p}) OR (span = 'd' AND bucket <= {p}))"""


def limits_location(ledger_path: str | None) -> str | None:
    """Where the shared budgets of a ledger at ``ledger_path`` live, or None (in-process).

    A PostgreSQL URL: the same database. A file: ``<name>.budgets`` beside it (its own file, so
    admissions never queue behind the ledger's batch writes). ``":memory:"``: None. ``None``:
    ``$SHARED_OLLAMA_LEDGER``, else the ledger's per-user default.
    """
    location = ledger_path or os.environ.get("SHARED_OLLAMA_LEDGER")
    if location == ":memory:":
        return None
    if location and is_url(location):
        return location
    if not location:
        from .ledger import default_ledger_path

        location = str(default_ledger_path())
    path = Path(location).expanduser()
    return str(path.with_name(path.name + ".budgets"))


def open_limits(location: str | os.PathLike[str]) -> LimitStore:
    """The shared budget store at ``location``: a ``postgresql://`` URL or a SQLite file.

    Opens nothing yet: the first admission connects (a store it cannot reach refuses calls with
    ``BudgetUnavailable``).
    """
    if isinstance(location, str) and is_url(location):
        return PostgresLimits(str(location))
    return SqliteLimits(Path(location).expanduser())


def _horizons(now: float) -> tuple[int, int]:
    """The minute and day windows' horizons at ``now``: a bucket counts iff it starts after.

    An amount counts from its bucket's start for a window plus one bucket (buckets are whole
    seconds, so comparing with the floor is exact).
    """
    return math.floor(now) - _MINUTE - _MINUTE_BUCKET, math.floor(now) - _DAY - _DAY_BUCKET


@dataclass(frozen=True, slots=True)
class Admission:
    """One admitted call: where its request and reserved tokens were counted."""

    project: str
    minute_bucket: int | None
    day_bucket: int | None
    reserved: int


@dataclass(slots=True)
class _Sums:
    requests_minute: int = 0
    tokens_minute: int = 0
    tokens_day: int = 0


class LimitStore(ABC):
    """Per-project windows kept in a database; ``admit`` before a call, ``settle`` after.

    Thread-safe. Subclasses supply the connection, the placeholder and the project lock.
    """

    _placeholder: str = "?"

    def __init__(self) -> None:
        self._lock = threading.Lock()  # one connection, used by callers and the settler
        self._settles: queue.Queue[tuple[Admission, int] | threading.Event | None] = queue.Queue()
        self._settler: threading.Thread | None = None
        self._closed = False
        self._expired: dict[str, int] = {}  # project -> the bucket its old rows last went in
        self._down: tuple[float, str] | None = None  # (monotonic s to retry at, last error)
        p = self._placeholder
        self._sql = {
            name: sql.format(p=p)
            for name, sql in (
                ("sums", _SUMS),
                ("buckets", _BUCKETS),
                ("add", _ADD),
                ("settle", _SETTLE),
                ("expire", _EXPIRE),
            )
        }

    # -- the store's own I/O --------------------------------------------------------------
    @abstractmethod
    def _connection(self) -> Any:
        """The open connection (connect and create the table the first time)."""

    def _batched(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        """Where statements may be sent together, up to the first read of a result."""
        return contextlib.nullcontext()

    @abstractmethod
    def _begin(self, conn: Any, project: str) -> None:
        """Start a transaction that holds ``project``'s lock until it ends."""

    @abstractmethod
    def _end(self, conn: Any, ok: bool) -> None:
        """Commit (``ok``) or roll back."""

    @abstractmethod
    def _unavailable(self, exc: Exception) -> BudgetUnavailable:
        """The typed error for a failed store operation (no credentials in it)."""

    @abstractmethod
    def _disconnect(self) -> None:
        """Close the connection, if open (the next use reconnects)."""

    # -- admission ----------------------------------------------------------------------
    def admit(self, project: str, budget: Budget, reserve: int, now: float) -> Admission:
        """Count one call of ``project`` at ``now`` (wall-clock s) with ``reserve`` tokens.

        Raises ``BudgetExceeded`` when a window is used up (nothing counted) and
        ``BudgetUnavailable`` when the store cannot be reached or locked in time.
        """
        if self._closed:
            raise BudgetUnavailable("budget store is closed")
        counts_requests = budget.requests_per_minute is not None
        minute = budget.requests_per_minute is not None or budget.tokens_per_minute is not None
        day = budget.tokens_per_day is not None
        if budget.tokens_per_minute is None and not day:
            reserve = 0  # no token limit: nothing to reserve against
        minute_bucket = math.floor(now / _MINUTE_BUCKET) * _MINUTE_BUCKET
        day_bucket = math.floor(now / _DAY_BUCKET) * _DAY_BUCKET
        since_m, since_d = _horizons(now)

        def body(conn: Any) -> BudgetExceeded | None:
            sums = self._sums(conn, project, since_m, since_d)
            refusal = self._refusal(conn, project, budget, sums, now, since_m, since_d)
            if refusal is not None:
                return refusal  # counts nothing: the transaction only read
            if minute:
                add = (project, "m", minute_bucket, int(counts_requests), reserve, reserve)
                conn.execute(self._sql["add"], add)
            if day:
                conn.execute(self._sql["add"], (project, "d", day_bucket, 0, reserve, reserve))
            if self._expired.get(project) != minute_bucket:
                # Old buckets go at most once a bucket per project and process.
                conn.execute(self._sql["expire"], (project, since_m, since_d))
                self._expired[project] = minute_bucket
            return None

        refusal = self._transaction(project, body)
        if refusal is not None:
            raise refusal
        return Admission(
            project,
            minute_bucket if minute else None,
            day_bucket if day else None,
            reserve,
        )

    def check(self, project: str, budget: Budget, now: float) -> None:
        """Raise ``BudgetExceeded`` if a window of ``project`` is used up at ``now``; count
        nothing."""
        since_m, since_d = _horizons(now)

        def body(conn: Any) -> BudgetExceeded | None:
            sums = self._sums(conn, project, since_m, since_d)
            return self._refusal(conn, project, budget, sums, now, since_m, since_d)

        refusal = self._transaction(project, body)
        if refusal is not None:
            raise refusal

    def _abandon(self, conn: Any) -> None:
        """Roll back what may be open and drop the connection (after a failure)."""
        if conn is not None:
            try:
                self._end(conn, False)
            except Exception:
                log.debug("rollback after a failed budget operation failed", exc_info=True)
        self._disconnect()

    def _sums(self, conn: Any, project: str, since_m: int, since_d: int) -> _Sums:
        sums = _Sums()
        for span, requests, tokens in conn.execute(
            self._sql["sums"], (project, since_m, since_d)
        ).fetchall():
            if span == "m":
                sums.requests_minute, sums.tokens_minute = int(requests), int(tokens)
            else:
                sums.tokens_day = int(tokens)
        return sums

    def _refusal(
        self,
        conn: Any,
        project: str,
        budget: Budget,
        sums: _Sums,
        now: float,
        since_m: int,
        since_d: int,
    ) -> BudgetExceeded | None:
        limits = (
            ("requests_per_minute", budget.requests_per_minute, sums.requests_minute, "m", 2),
            ("tokens_per_minute", budget.tokens_per_minute, sums.tokens_minute, "m", 3),
            ("tokens_per_day", budget.tokens_per_day, sums.tokens_day, "d", 3),
        )
        for name, limit, used, span, column in limits:
            if limit is None or used < limit:
                continue
            # Refused: walk the window's buckets, oldest first, to find when enough expires.
            rows = conn.execute(self._sql["buckets"], (project, since_m, since_d)).fetchall()
            size = _MINUTE_BUCKET if span == "m" else _DAY_BUCKET
            window = _MINUTE if span == "m" else _DAY
            remaining, resets_in = used, 0.0
            for row in rows:
                if row[0] != span:
                    continue
                remaining -= int(row[column])
                if remaining < limit:
                    resets_in = max(0.0, int(row[1]) + size + window - now)
                    break
            return BudgetExceeded(
                f"project {project!r} used {used} of its {name} limit {limit} (shared); "
                f"resets in {resets_in:.1f}s",
                project=project,
                limit=name,
                resets_in=resets_in,
            )
        return None

    # -- settlement ---------------------------------------------------------------------
    def settle(self, admission: Admission, tokens: int) -> None:
        """Replace ``admission``'s reservation with the ``tokens`` the call really used.

        Queued for a background thread: never blocks on the store.
        """
        if admission.reserved == 0 and tokens == 0:
            return
        if self._closed:
            return
        if self._settler is None:
            with self._lock:
                if self._settler is None:
                    self._settler = threading.Thread(
                        target=self._settle_loop, name="shared-ollama-budgets", daemon=True
                    )
                    self._settler.start()
        self._settles.put((admission, tokens))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued settlement reached the store; False on timeout."""
        if self._settler is None or not self._settler.is_alive():
            return True
        done = threading.Event()
        self._settles.put(done)
        return done.wait(timeout)

    def _settle_loop(self) -> None:
        while True:
            item = self._settles.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()  # a flush: everything queued before it is applied
            else:
                self._settle_now(*item)

    def _settle_now(self, admission: Admission, tokens: int) -> None:
        delta = tokens - admission.reserved
        spans = (("m", admission.minute_bucket), ("d", admission.day_bucket))

        def apply(conn: Any) -> None:
            for span, bucket in spans:
                if bucket is not None:
                    args = (delta, admission.reserved, admission.project, span, bucket)
                    conn.execute(self._sql["settle"], args)

        try:
            self._transaction(admission.project, apply)
        except BudgetUnavailable as exc:
            # The reservation stays counted until its window passes: the budget errs on the
            # safe side. The message carries no credentials (see ``_unavailable``).
            log.warning("budget settlement lost: %s", exc)

    def _transaction(self, project: str, body: Callable[[Any], T]) -> T:
        """Run ``body(conn)`` in one transaction holding ``project``'s lock; commit.

        Any failure of the store (connect, lock wait, statement) is ``BudgetUnavailable``.
        """
        with self._lock:
            if self._down is not None and time.monotonic() < self._down[0]:
                # Fail fast for a moment after a failure: a black-holed host would otherwise
                # cost every call a full connect timeout, on the caller's thread.
                raise BudgetUnavailable(self._down[1])
            conn: Any = None
            try:
                conn = self._connection()
                with self._batched(conn):
                    self._begin(conn, project)
                    result = body(conn)
                    self._end(conn, True)
            except Exception as exc:
                self._abandon(conn)
                error = self._unavailable(exc)
                self._down = (time.monotonic() + _RETRY_AFTER_S, error.message)
                raise error from None
            self._down = None
            return result

    # -- reads and lifetime ---------------------------------------------------------------
    def usage(self, project: str, now: float) -> dict[str, int]:
        """What ``project`` has used (settled plus reserved) in each window at ``now``."""
        since_m, since_d = _horizons(now)
        sums = self._transaction(project, lambda conn: self._sums(conn, project, since_m, since_d))
        return {
            "requests_per_minute": sums.requests_minute,
            "tokens_per_minute": sums.tokens_minute,
            "tokens_per_day": sums.tokens_day,
        }

    def close(self, timeout: float | None = 10.0) -> None:
        """Apply queued settlements, then close the connection (idempotent)."""
        if self._closed:
            return
        if self._settler is not None:
            self._settles.put(None)
            self._settler.join(timeout)
        self._closed = True
        with self._lock:
            self._disconnect()


class SqliteLimits(LimitStore):
    """The store in a SQLite file: every process on this host that opens it agrees."""

    _placeholder = "?"

    def __init__(self, path: Path, *, busy_timeout_s: float = _LOCK_TIMEOUT_S) -> None:
        super().__init__()
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._conn: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"SqliteLimits({str(self.path)!r})"

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            # The ledger's own connection: WAL, its retried switch to WAL (processes starting
            # together), and SQLite's busy handler for another process's write lock;
            # BEGIN IMMEDIATE below is ours.
            conn = connect_sqlite(str(self.path), self._busy_timeout_s)
            try:
                conn.execute(_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _begin(self, conn: sqlite3.Connection, project: str) -> None:
        # IMMEDIATE takes the file's write lock now: the sums read below cannot go stale.
        conn.execute("BEGIN IMMEDIATE")

    def _end(self, conn: sqlite3.Connection, ok: bool) -> None:
        if conn.in_transaction:
            conn.execute("COMMIT" if ok else "ROLLBACK")

    def _unavailable(self, exc: Exception) -> BudgetUnavailable:
        return BudgetUnavailable(
            f"budget store {str(self.path)!r} unavailable: {type(exc).__name__}: {exc}"
        )

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class PostgresLimits(LimitStore):
    """The store in a PostgreSQL database: every process on every host that uses it agrees.

    Needs ``psycopg`` (``pip install 'shared-ollama[postgres]'``). The URL's password never
    appears in its repr, errors or logs.
    """

    _placeholder = "%s"

    def __init__(self, url: str, *, connect_timeout_s: float = _LOCK_TIMEOUT_S) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ConfigError(
                "a postgresql:// budget store needs psycopg: pip install 'shared-ollama[postgres]'"
            ) from None
        super().__init__()
        self._url = url
        self._secrets = secrets_of(url)
        self.url = redact(url)
        self._connect_timeout_s = connect_timeout_s
        self._conn: Any = None

    def __repr__(self) -> str:
        return f"PostgresLimits({self.url!r})"

    def _connection(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            lock_ms = int(_LOCK_TIMEOUT_S * 1000)
            conn = psycopg.connect(
                self._url,
                connect_timeout=max(1, math.ceil(self._connect_timeout_s)),
                autocommit=True,
                options=f"-c lock_timeout={lock_ms} -c statement_timeout={lock_ms}",
                application_name="shared_ollama budgets",
            )
            try:
                # CREATE TABLE IF NOT EXISTS is not safe against itself in PostgreSQL (two
                # processes starting together can both try to create the table's type): the
                # first to take this lock creates the schema, the others then find it.
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(hashtext('shared_ollama budgets'))")
                    conn.execute(_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _batched(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        # Pipeline mode: BEGIN, the lock and the sums go in one round trip, the writes and
        # COMMIT in another (an admission is two round trips, not five).
        return conn.pipeline()  # type: ignore[no-any-return]

    def _begin(self, conn: Any, project: str) -> None:
        conn.execute("BEGIN")
        # Serialises the project's admissions across every connection: the sums read next
        # include every admission committed before ours. Two projects may share a hash; then
        # they only wait for each other.
        conn.execute(
            "SELECT pg_advisory_xact_lock(%s::int4, %s::int4)",
            (_LOCK_CLASS, zlib.crc32(project.encode()) - 2**31),
        )

    def _end(self, conn: Any, ok: bool) -> None:
        if not conn.closed:
            conn.execute("COMMIT" if ok else "ROLLBACK")

    def _unavailable(self, exc: Exception) -> BudgetUnavailable:
        text = scrub(f"{type(exc).__name__}: {exc}".strip(), self._secrets)
        return BudgetUnavailable(f"budget store {self.url} unavailable: {text}")

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                log.debug("closing the budget store's connection failed", exc_info=True)
