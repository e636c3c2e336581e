"""The PostgreSQL ledger backend (``pip install 'shared-ollama[postgres]'``, psycopg 3).

Chosen by a ``postgresql://user:password@host:port/db`` ledger URL. The table mirrors the
SQLite one (``schema.PG_MIGRATIONS``); several processes and hosts may write one database.
The password never leaves this module: ``location`` and every message are redacted.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Final

from ..errors import ConfigError, LedgerUnavailable
from ..records import CallRecord
from .backends import LedgerBackend, WriteBusy, redact, scrub, secrets_of
from .query import POSTGRES, SQLConnection
from .schema import PG_INSERT_SQL, PG_MIGRATIONS, SCHEMA_VERSION, rows_for, statements

try:
    import psycopg
except ImportError:  # pragma: no cover - the extra is not installed
    psycopg = None  # type: ignore[assignment]

__all__ = ["PostgresBackend", "pg_migrate"]

#: ``pg_advisory_xact_lock`` key serialising migrations between processes ("shOl").
_MIGRATION_LOCK: Final = 0x73684F6C
_VERSION_TABLE: Final = "shared_ollama_schema"


def pg_migrate(conn: Any) -> int:
    """Bring the schema to ``SCHEMA_VERSION`` in one transaction; returns the version found.

    An advisory lock makes processes that open a new database at once take turns.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(f"CREATE TABLE IF NOT EXISTS {_VERSION_TABLE} (version INTEGER NOT NULL)")
        row = conn.execute(f"SELECT version FROM {_VERSION_TABLE}").fetchone()
        found = int(row[0]) if row else 0
        if found > SCHEMA_VERSION:
            raise ConfigError(
                f"ledger schema version {found} is newer than this library's {SCHEMA_VERSION}"
            )
        for version in range(found, SCHEMA_VERSION):
            for statement in statements(PG_MIGRATIONS[version]):
                conn.execute(statement)
        if row is None:
            conn.execute(f"INSERT INTO {_VERSION_TABLE} VALUES (%s)", (SCHEMA_VERSION,))
        elif found != SCHEMA_VERSION:
            conn.execute(f"UPDATE {_VERSION_TABLE} SET version = %s", (SCHEMA_VERSION,))
    return found


class PostgresBackend(LedgerBackend):
    """Rows in table ``calls`` of a PostgreSQL database; one connection for the writer, one
    for queries, each reopened after it breaks."""

    kind = "postgresql"
    dialect = POSTGRES

    def __init__(self, url: str, *, timeout_s: float = 5.0, migrate: bool = True) -> None:
        """Connect and migrate (``migrate=False``: read-only use, e.g. the CLI).

        ``ConfigError`` (redacted) when psycopg is missing or the server refuses.
        """
        self._location = redact(url)
        self._secrets = secrets_of(url)
        if psycopg is None:
            raise ConfigError(
                f"usage ledger {self._location} needs psycopg: "
                "pip install 'shared-ollama[postgres]'"
            )
        self._url = url
        self._timeout_s = timeout_s
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._reader: psycopg.Connection[Any] | None = None
        self._writer: psycopg.Connection[Any] | None = None
        try:
            self._writer = self._connect()
            if migrate:
                pg_migrate(self._writer)
        except ConfigError as exc:
            self.close()
            raise ConfigError(f"cannot open usage ledger {self._location}: {exc}") from None
        except (psycopg.Error, OSError, ValueError) as exc:
            self.close()
            # from None: the driver's exception is not chained, so nothing it holds is shown.
            raise ConfigError(
                f"cannot open usage ledger {self._location}: {self.scrub(str(exc))}"
            ) from None

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self._url,
            autocommit=True,
            connect_timeout=max(1, round(self._timeout_s)),
            application_name="shared_ollama-ledger",
        )

    @property
    def location(self) -> str:
        """The URL with its password replaced by ``***``."""
        return self._location

    def scrub(self, text: str) -> str:
        """``text`` without the password."""
        return scrub(text, self._secrets)

    def write(self, records: list[CallRecord], epoch_offset_ns: int) -> None:
        """One transaction of ``INSERT ... ON CONFLICT DO NOTHING`` rows (pipelined)."""
        with self._write_lock:
            try:
                if self._writer is None or self._writer.closed:
                    self._writer = self._connect()
                conn = self._writer
                with conn.transaction(), conn.cursor() as cur:
                    cur.executemany(PG_INSERT_SQL, rows_for(records, epoch_offset_ns))
            except psycopg.OperationalError as exc:
                # A lost connection or a server restart: reconnect on the retry.
                self._drop_writer()
                raise WriteBusy(self.scrub(str(exc))) from None

    def _drop_writer(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(psycopg.Error):
                self._writer.close()
            self._writer = None

    def recover(self) -> None:
        """Start the next batch on a fresh connection."""
        with self._write_lock:
            self._drop_writer()

    @contextlib.contextmanager
    def reading(self) -> Iterator[SQLConnection]:
        """The read connection (reopened if it broke); a failure is ``LedgerUnavailable``."""
        with self._read_lock:
            try:
                if self._reader is None or self._reader.closed or self._reader.broken:
                    self._reader = self._connect()
                yield self._reader
            except psycopg.Error as exc:
                if self._reader is not None and self._reader.broken:
                    self._reader = None
                raise LedgerUnavailable(
                    f"cannot read usage ledger {self._location}: {self.scrub(str(exc))}"
                ) from None

    def close_writer(self) -> None:
        """Close the writer's connection."""
        with self._write_lock:
            self._drop_writer()

    def close(self) -> None:
        """Close both connections (idempotent)."""
        self.close_writer()
        with self._read_lock:
            if self._reader is not None:
                with contextlib.suppress(psycopg.Error):
                    self._reader.close()
                self._reader = None
