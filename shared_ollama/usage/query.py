"""Reading the ledger: typed rows, grouped summaries with percentiles, time windows.

Functions over a ``sqlite3.Connection`` that take ``now`` (epoch seconds) as an argument.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict

from .schema import COLUMNS

__all__ = [
    "GROUP_KEYS",
    "GroupKey",
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

# Outcomes counted as errors; "cancelled" is the caller's own doing, not a failure.
_ERROR_OUTCOMES = "('error', 'interrupted')"
_PERCENTILES = (("p50_ms", 0.50), ("p95_ms", 0.95))


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
    conn: sqlite3.Connection,
    *,
    now: float,
    project: str | None = None,
    model: str | None = None,
    since: When | None = None,
    until: When | None = None,
    group_by: Sequence[str] = ("project", "model"),
) -> list[SummaryRow]:
    """Aggregates per group, ordered by the group keys; no matching call: no row."""
    keys = _check_keys(group_by)
    where, params = _where(project, model, parse_when(since, now), parse_when(until, now))
    key_sql = [f"{GROUP_KEYS[k]} AS k{i}" for i, k in enumerate(keys)]
    key_refs = ", ".join(f"k{i}" for i in range(len(keys)))
    group = f" GROUP BY {key_refs} ORDER BY {key_refs}" if keys else ""
    aggregate = (
        f"SELECT {''.join(s + ', ' for s in key_sql)}COUNT(*), "
        f"COALESCE(SUM(outcome IN {_ERROR_OUTCOMES}), 0), "
        "COALESCE(SUM(MAX(attempts - 1, 0)), 0), "
        "COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), AVG(ttft_ms) "
        f"FROM calls{where}{group}"
    )
    percentiles = _percentiles(conn, keys, key_sql, key_refs, where, params)
    out: list[SummaryRow] = []
    n = len(keys)
    for row in conn.execute(aggregate, params):
        if row[n] == 0:  # an ungrouped aggregate over nothing
            continue
        key = tuple(row[:n])
        out.append(
            SummaryRow(
                **dict(zip(keys, key, strict=True)),
                requests=row[n],
                errors=row[n + 1],
                retries=row[n + 2],
                input_tokens=row[n + 3],
                output_tokens=row[n + 4],
                mean_ttft_ms=row[n + 5],
                **percentiles.get(key, {}),
            )
        )
    return out


def _percentiles(
    conn: sqlite3.Connection,
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
        f"i = CAST((n - 1) * {p!r} AS INTEGER) OR i = CAST((n - 1) * {p!r} AS INTEGER) + 1"
        for _, p in _PERCENTILES
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
    for row in conn.execute(sql, params):
        key = tuple(row[:n_keys])
        i, count, d = row[n_keys], row[n_keys + 1], row[n_keys + 2]
        found.setdefault(key, (count, {}))[1][i] = d
    result: dict[tuple[Any, ...], dict[str, float]] = {}
    for key, (count, values) in found.items():
        result[key] = {name: _interpolate(values, count, p) for name, p in _PERCENTILES}
    return result


def _interpolate(values: dict[int, float], n: int, p: float) -> float:
    pos = (n - 1) * p
    lo = int(pos)
    if lo + 1 >= n:
        return values[lo]
    return values[lo] + (values[lo + 1] - values[lo]) * (pos - lo)


def query_rows(
    conn: sqlite3.Connection,
    *,
    now: float,
    project: str | None = None,
    model: str | None = None,
    since: When | None = None,
    until: When | None = None,
    limit: int | None = None,
) -> list[UsageRow]:
    """Raw rows, oldest first."""
    where, params = _where(project, model, parse_when(since, now), parse_when(until, now))
    sql = f"SELECT {', '.join(COLUMNS)} FROM calls{where} ORDER BY ts, id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    out: list[UsageRow] = []
    for row in conn.execute(sql, params):
        data = dict(zip(COLUMNS, row, strict=True))
        data["stream"] = bool(data["stream"])
        data["server_timings"] = json.loads(data["server_timings"] or "{}")
        data["tags"] = json.loads(data["tags"] or "{}")
        out.append(UsageRow(**data))
    return out
