"""The ledger's SQLite schema: versioned migrations and the CallRecord -> row mapping.

Pure functions over a ``sqlite3.Connection``; no threads, no clock reads.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..records import CallRecord

__all__ = [
    "COLUMNS",
    "INSERT_SQL",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SchemaTooNew",
    "clean_url",
    "migrate",
    "record_to_row",
    "rows_for",
]

#: Each entry moves the schema from version ``i`` to ``i + 1`` (``PRAGMA user_version``).
#: Append only: a released migration is never edited.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE calls (
        id                   INTEGER PRIMARY KEY,
        request_id           TEXT    NOT NULL UNIQUE,
        ts                   REAL    NOT NULL,
        ts_end               REAL    NOT NULL,
        project              TEXT    NOT NULL,
        operation            TEXT    NOT NULL,
        model                TEXT,
        served_model         TEXT,
        endpoint             TEXT,
        endpoint_name        TEXT,
        protocol             TEXT,
        stream               INTEGER NOT NULL,
        outcome              TEXT    NOT NULL,
        error_type           TEXT,
        attempts             INTEGER NOT NULL,
        input_tokens         INTEGER,
        output_tokens        INTEGER,
        ttft_ms              REAL,
        duration_ms          REAL    NOT NULL,
        finish_reason        TEXT,
        server_total_ms      REAL,
        server_load_ms       REAL,
        server_prompt_eval_ms REAL,
        server_eval_ms       REAL,
        server_queue_ms      REAL,
        server_inference_ms  REAL,
        server_timings       TEXT,
        tags                 TEXT
    );
    CREATE INDEX calls_ts ON calls (ts);
    CREATE INDEX calls_project_ts ON calls (project, ts);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

COLUMNS: tuple[str, ...] = (
    "request_id",
    "ts",
    "ts_end",
    "project",
    "operation",
    "model",
    "served_model",
    "endpoint",
    "endpoint_name",
    "protocol",
    "stream",
    "outcome",
    "error_type",
    "attempts",
    "input_tokens",
    "output_tokens",
    "ttft_ms",
    "duration_ms",
    "finish_reason",
    "server_total_ms",
    "server_load_ms",
    "server_prompt_eval_ms",
    "server_eval_ms",
    "server_queue_ms",
    "server_inference_ms",
    "server_timings",
    "tags",
)

# OR IGNORE: a record submitted twice (same request_id) is counted once.
INSERT_SQL = (
    f"INSERT OR IGNORE INTO calls ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
)


class SchemaTooNew(RuntimeError):
    """The file was written by a newer version of this library."""


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to ``SCHEMA_VERSION``; returns the version found before.

    Runs in one ``BEGIN IMMEDIATE`` transaction so that processes opening a fresh file at the
    same time do not both create the table. ``conn`` must be in autocommit mode.
    """
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found == SCHEMA_VERSION:
        return found
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-read under the write lock: another process may have migrated meanwhile.
        found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"ledger schema version {found} is newer than this library's {SCHEMA_VERSION}"
            )
        for version in range(found, SCHEMA_VERSION):
            for statement in _statements(MIGRATIONS[version]):
                conn.execute(statement)
        # PRAGMA takes no parameters; the value is our own integer.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found


def _statements(script: str) -> Iterator[str]:
    # executescript() would COMMIT our transaction first; run the statements one by one.
    for part in script.split(";"):
        if part.strip():
            yield part


@functools.lru_cache(maxsize=256)
def clean_url(url: str | None) -> str | None:
    """The URL without credentials, query or fragment (nothing secret reaches the ledger)."""
    # Cached: a pool has a handful of endpoints and this runs once per row.
    if not url:
        return url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# One encoder instance: json.dumps() would build one per call.
_to_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


def record_to_row(record: CallRecord, epoch_offset_ns: int) -> tuple[Any, ...]:
    """The ``COLUMNS`` values for one record; monotonic ns become epoch seconds."""
    timings = record.server_timings
    t_start = record.t_start_ns
    t_end = record.t_end_ns or t_start
    first = record.t_first_chunk_ns
    if timings:
        get = timings.get
        total = get("total_duration_ns")
        load, prompt, gen = (
            get("load_duration_ns"),
            get("prompt_eval_duration_ns"),
            get("eval_duration_ns"),
        )
        compute_s = get("compute_time_s")
        server: tuple[Any, ...] = (
            total / 1e6 if total is not None else (None if compute_s is None else compute_s * 1e3),
            None if load is None else load / 1e6,
            None if prompt is None else prompt / 1e6,
            None if gen is None else gen / 1e6,
            get("queue_time_ms"),
            get("inference_time_ms"),
            _to_json(timings),
        )
    else:
        server = (None, None, None, None, None, None, None)
    return (
        record.request_id,
        (t_start + epoch_offset_ns) / 1e9,
        (t_end + epoch_offset_ns) / 1e9,
        record.project,
        record.operation,
        record.model,
        record.served_model,
        clean_url(record.endpoint),
        record.endpoint_name,
        record.protocol,
        int(record.stream),
        record.outcome,
        record.error_type,
        len(record.attempts),
        record.input_tokens,
        record.output_tokens,
        None if first is None else (first - t_start) / 1e6,
        (t_end - t_start) / 1e6,
        record.finish_reason,
        *server,
        _to_json(record.tags) if record.tags else None,
    )


def rows_for(records: Iterable[CallRecord], epoch_offset_ns: int) -> Iterator[tuple[Any, ...]]:
    """Rows lazily, so ``executemany`` interleaves conversion with SQLite's GIL-free steps."""
    for record in records:
        yield record_to_row(record, epoch_offset_ns)
