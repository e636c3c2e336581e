"""Reading the ledger: typed rows, grouped summaries with percentiles, time windows.

Functions over a DB-API connection (``sqlite3`` or ``psycopg``) and its ``Dialect``, that take
``now`` (epoch seconds) as an argument. The SQL is written once; a dialect supplies only what
differs (placeholders, UTC day/hour buckets), so both backends give identical summaries.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol, TypeAlias

from pydantic import BaseModel, ConfigDict

from .schema import COLUMNS

__all__ = [
    "GROUP_KEYS",
    "POSTGRES",
    "SQLITE",
    "Dialect",
    "GroupKey",
    "SQLConnection",
    "Summary",
    "SummaryRow",
    "UsageRow",
    "When",
    "parse_when",
    "query_rows",
    "query_summary",
]

When: TypeAlias = datetime | timedelta | float | int | str
"""A point in time: a datetime (naive = local time), a timedelta before now, epoch
seconds, or a string: ``"90s"``, ``"15m"``, ``"1h"``, ``"7d"``, ``"2w"`` (before now),
``"2026-11-01"`` / ISO datetime (naive = local time), or epoch seconds."""

GroupKey: TypeAlias = Literal[
    "project",
    "model",
    "served_model",
    "endpoint",
    "endpoint_name",
    "operation",
    "protocol",
    "outcome",
    "error_type",
    "day",
    "hour",
]

#: Group keys and the SQL expression each stands for; ``day``/``hour`` are UTC buckets.
GROUP_KEYS: dict[str, str] = {
    "project": "project",
    "model": "model",
    "served_model": "served_model",
    "endpoint": "endpoint",
    "endpoint_name": "endpoint_name",
    "operation": "operation",
    "protocol": "protocol",
    "outcome": "outcome",
    "error_type": "error_type",
    "day": "strftime('%Y-%m-%d', ts, 'unixepoch')",
    "hour": "strftime('%Y-%m-%dT%H:00Z', ts, 'unixepoch')",
}

_UTC_PG = "to_char(to_timestamp(ts) AT TIME ZONE 'UTC', "


@dataclass(frozen=True)
class Dialect:
    """What differs between the SQL of two backends."""

    name: str
    #: Group key -> SQL expression.
    group_keys: Mapping[str, str]
    #: The driver's parameter placeholder (the SQL here is written with ``?``).
    placeholder: str = "?"

    def sql(self, text: str) -> str:
        """``text`` with this dialect's placeholders."""
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)


SQLITE = Dialect("sqlite", GROUP_KEYS)
# COLLATE "C": group keys sort bytewise, as in SQLite, whatever the database's locale.
POSTGRES = Dialect(
    "postgresql",
    {
        **{k: f'{v} COLLATE "C"' for k, v in GROUP_KEYS.items()},
        "day": _UTC_PG + "'YYYY-MM-DD')",
        "hour": _UTC_PG + '\'YYYY-MM-DD"T"HH24":00Z"\')',
    },
    placeholder="%s",
)


class SQLConnection(Protocol):
    """The part of a DB-API connection the queries use (``sqlite3`` and ``psycopg`` both)."""

    def execute(self, sql: str, params: Any = ..., /) -> Any:
        """Run one statement; the result iterates over rows."""
        ...


# Outcomes counted as errors; "cancelled" is the caller's own doing, not a failure.
_ERROR_OUTCOMES = "('error', 'interrupted')"
#: Percentiles as whole percents: ranks are found with integer arithmetic, which both SQL
#: dialects and Python agree on (a float CAST rounds in PostgreSQL and truncates in SQLite).
_PERCENTILES = (("p50_ms", 50), ("p95_ms", 95))


class UsageRow(BaseModel):
    """One ledger row: one call, successful or not."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    #: Call start, epoch seconds.
    ts: float
    #: Call end, epoch seconds.
    ts_end: float
    project: str
    operation: str
    model: str | None
    served_model: str | None
    #: Endpoint URL (never with credentials).
    endpoint: str | None
    endpoint_name: str | None
    protocol: str | None
    stream: bool
    outcome: str
    error_type: str | None
    attempts: int
    input_tokens: int | None
    output_tokens: int | None
    ttft_ms: float | None
    duration_ms: float
    finish_reason: str | None
    server_total_ms: float | None
    server_load_ms: float | None
    server_prompt_eval_ms: float | None
    server_eval_ms: float | None
    server_queue_ms: float | None
    server_inference_ms: float | None
    #: All server timings as reported (see ``types.ServerTimings``).
    server_timings: dict[str, float]
    tags: dict[str, str]
    #: Prompt tokens the server served from its cache (NULL if not reported).
    cached_tokens: int | None = None
    #: Why the router chose the endpoint (see ``records.CallRecord.routing``).
    route_reason: str | None = None


class SummaryRow(BaseModel):
    """Aggregates for one group; group keys not asked for are None."""

    model_config = ConfigDict(frozen=True)

    project: str | None = None
    model: str | None = None
    served_model: str | None = None
    endpoint: str | None = None
    endpoint_name: str | None = None
    operation: str | None = None
    protocol: str | None = None
    outcome: str | None = None
    error_type: str | None = None
    #: UTC day ``YYYY-MM-DD`` (group key ``day``).
    day: str | None = None
    #: UTC hour ``YYYY-MM-DDTHH:00Z`` (group key ``hour``).
    hour: str | None = None
    #: Calls, successful or not.
    requests: int
    #: Calls that failed or were interrupted (cancelled calls are not errors).
    errors: int
    #: Attempts beyond the first, summed.
    retries: int
    input_tokens: int
    output_tokens: int
    #: Median end-to-end latency of successful calls (linear interpolation).
    p50_ms: float | None = None
    #: 95th percentile end-to-end latency of successful calls.
    p95_ms: float | None = None
    #: Mean time to first chunk / first byte, over calls that got one.
    mean_ttft_ms: float | None


class Summary(list[SummaryRow]):
    """The rows of a summary (a list, as before), plus whether the ledger kept every record.

    ``persisted`` is False when the ledger lives in memory only (``":memory:"``, or the
    default location could not be opened); ``dropped`` counts the records this process's
    ledger lost (queue overflow, failed writes, submits after ``close()``), which the rows
    therefore undercount.
    """

    def __init__(
        self, rows: Iterable[SummaryRow] = (), *, persisted: bool = True, dropped: int = 0
    ) -> None:
        super().__init__(rows)
        self.persisted = persisted
        self.dropped = dropped

    @property
    def complete(self) -> bool:
        """True when no record of this process was dropped."""
        return self.dropped == 0

    def __repr__(self) -> str:
        return f"Summary({list(self)!r}, persisted={self.persisted}, dropped={self.dropped})"


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(value: When | None, now: float) -> float | None:
    """Epoch seconds for ``value`` (see ``When``); None stays None.

    >>> parse_when("1h", now=7200.0)
    3600.0
    >>> parse_when(timedelta(minutes=1), now=100.0)
    40.0
    """
    if value is None:
        return None
    if isinstance(value, timedelta):
        return now - value.total_seconds()
    if isinstance(value, datetime):
        return value.timestamp()  # naive datetimes are local time, as documented
    if isinstance(value, int | float):
        return float(value)
    if m := _RELATIVE.match(value):
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value.strip()).timestamp()
    except ValueError:
        raise ValueError(
            f"not a time: {value!r} (use e.g. 30m, 1h, 7d, 2026-11-01 or epoch seconds)"
        ) from None


def _where(
    project: str | None, model: str | None, since: float | None, until: float | None
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (("project", project), ("model", model)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        clauses.append("ts >= ?")
        params.append(since)
    if until is not None:
        clauses.append("ts < ?")
        params.append(until)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _check_keys(group_by: Sequence[str]) -> list[str]:
    keys = list(dict.fromkeys(group_by))
    unknown = [k for k in keys if k not in GROUP_KEYS]
    if unknown:
        raise ValueError(f"unknown group_by key(s) {unknown}; choose from {sorted(GROUP_KEYS)}")
    return keys


def query_summary(
    conn: SQLConnection,
    *,
    now: float,
    project: str | None = None,
    model: str | None = None,
    since: When | None = None,
    until: When | None = None,
    group_by: Sequence[str] = ("project", "model"),
    dialect: Dialect = SQLITE,
) -> list[SummaryRow]:
    """Aggregates per group, ordered by the group keys; no matching call: no row."""
    keys = _check_keys(group_by)
    where, params = _where(project, model, parse_when(since, now), parse_when(until, now))
    key_sql = [f"{dialect.group_keys[k]} AS k{i}" for i, k in enumerate(keys)]
    key_refs = ", ".join(f"k{i}" for i in range(len(keys)))
    # NULLs sort first in SQLite and last in PostgreSQL: say it, so both order alike.
    order = ", ".join(f"k{i} NULLS FIRST" for i in range(len(keys)))
    group = f" GROUP BY {key_refs} ORDER BY {order}" if keys else ""
    # CASE instead of summing booleans or a two-argument MAX: portable between dialects.
    aggregate = (
        f"SELECT {''.join(s + ', ' for s in key_sql)}COUNT(*), "
        f"COALESCE(SUM(CASE WHEN outcome IN {_ERROR_OUTCOMES} THEN 1 ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN attempts > 1 THEN attempts - 1 ELSE 0 END), 0), "
        "COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), AVG(ttft_ms) "
        f"FROM calls{where}{group}"
    )
    percentiles = _percentiles(conn, dialect, keys, key_sql, key_refs, where, params)
    out: list[SummaryRow] = []
    n = len(keys)
    for row in conn.execute(dialect.sql(aggregate), params):
        if row[n] == 0:  # an ungrouped aggregate over nothing
            continue
        key = tuple(row[:n])
        out.append(
            SummaryRow(
                **dict(zip(keys, key, strict=True)),
                requests=int(row[n]),
                errors=int(row[n + 1]),
                retries=int(row[n + 2]),
                input_tokens=int(row[n + 3]),
                output_tokens=int(row[n + 4]),
                mean_ttft_ms=None if row[n + 5] is None else float(row[n + 5]),
                **percentiles.get(key, {}),
            )
        )
    return out


def _percentiles(
    conn: SQLConnection,
    dialect: Dialect,
    keys: list[str],
    key_sql: list[str],
    key_refs: str,
    where: str,
    params: list[Any],
) -> dict[tuple[Any, ...], dict[str, float]]:
    # SQLite has no percentile function: let it sort within each group (window functions,
    # in C) and hand back only the rows at the ranks needed, then interpolate here.
    partition = f"PARTITION BY {key_refs} " if keys else ""
    ranks = " OR ".join(
        f"i = ((n - 1) * {p}) / 100 OR i = ((n - 1) * {p}) / 100 + 1" for _, p in _PERCENTILES
    )
    ok = "outcome = 'ok'"
    filt = f"{where} AND {ok}" if where else f" WHERE {ok}"
    keys_sel = "".join(s + ", " for s in key_sql)
    sql = (
        f"WITH f AS (SELECT {keys_sel}duration_ms AS d FROM calls{filt}), "
        f"r AS (SELECT *, ROW_NUMBER() OVER ({partition}ORDER BY d) - 1 AS i, "
        f"COUNT(*) OVER ({partition.strip()}) AS n FROM f) "
        f"SELECT {''.join(f'k{i}, ' for i in range(len(keys)))}i, n, d FROM r WHERE {ranks}"
    )
    found: dict[tuple[Any, ...], tuple[int, dict[int, float]]] = {}
    n_keys = len(keys)
    for row in conn.execute(dialect.sql(sql), params):
        key = tuple(row[:n_keys])
        i, count, d = int(row[n_keys]), int(row[n_keys + 1]), float(row[n_keys + 2])
        found.setdefault(key, (count, {}))[1][i] = d
    result: dict[tuple[Any, ...], dict[str, float]] = {}
    for key, (count, values) in found.items():
        result[key] = {name: _interpolate(values, count, p) for name, p in _PERCENTILES}
    return result


def _interpolate(values: dict[int, float], n: int, percent: int) -> float:
    lo = (n - 1) * percent // 100  # the rank the SQL picked
    if lo + 1 >= n:
        return values[lo]
    return values[lo] + (values[lo + 1] - values[lo]) * ((n - 1) * percent / 100 - lo)


def query_rows(
    conn: SQLConnection,
    *,
    now: float,
    project: str | None = None,
    model: str | None = None,
    since: When | None = None,
    until: When | None = None,
    limit: int | None = None,
    dialect: Dialect = SQLITE,
) -> list[UsageRow]:
    """Raw rows, oldest first."""
    where, params = _where(project, model, parse_when(since, now), parse_when(until, now))
    sql = f"SELECT {', '.join(COLUMNS)} FROM calls{where} ORDER BY ts, id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    out: list[UsageRow] = []
    for row in conn.execute(dialect.sql(sql), params):
        data = dict(zip(COLUMNS, row, strict=True))
        data["stream"] = bool(data["stream"])
        data["server_timings"] = json.loads(data["server_timings"] or "{}")
        data["tags"] = json.loads(data["tags"] or "{}")
        out.append(UsageRow(**data))
    return out
