"""``python -m shared_ollama usage``: the ledger summary as a table, JSON or CSV.

Opens the ledger read-only (a SQLite file or a PostgreSQL URL); never starts a writer and
never prints a password.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import quote

from ..errors import ConfigError, LedgerUnavailable
from .backends import is_url, redact
from .ledger import default_ledger_location
from .query import GROUP_KEYS, SQLITE, Dialect, SQLConnection, SummaryRow, query_summary

__all__ = ["usage_main"]

_METRICS: tuple[str, ...] = (
    "requests",
    "errors",
    "retries",
    "input_tokens",
    "output_tokens",
    "p50_ms",
    "p95_ms",
    "mean_ttft_ms",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m shared_ollama usage",
        description="Summarise the usage ledger: requests, errors, tokens and latency per group.",
    )
    p.add_argument(
        "--ledger",
        metavar="PATH|URL",
        help="ledger file or postgresql:// URL (default: $SHARED_OLLAMA_LEDGER, else the "
        "per-user data dir)",
    )
    p.add_argument("--project", help="only this project")
    p.add_argument("--model", help="only this (logical) model")
    p.add_argument("--since", help="start: 30m, 1h, 7d, 2026-11-01, ISO datetime or epoch s")
    p.add_argument("--until", help="end (exclusive), same forms as --since")
    p.add_argument(
        "--group-by",
        default="project,model",
        help=f"comma-separated keys from {', '.join(GROUP_KEYS)}; 'none' for one total row",
    )
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--csv", action="store_true", help="print CSV")
    return p


def usage_main(argv: list[str] | None = None) -> int:
    """Run the ``usage`` command; returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: argparse already printed why
        return int(exc.code or 0)
    keys = [] if args.group_by.strip() == "none" else _split(args.group_by)
    target = args.ledger or default_ledger_location()
    if not is_url(target) and not Path(target).exists():
        print(f"no usage ledger at {redact(target)}", file=sys.stderr)
        return 1
    try:
        with _open(target) as (conn, dialect):
            rows = query_summary(
                conn,
                now=time.time(),
                project=args.project,
                model=args.model,
                since=args.since,
                until=args.until,
                group_by=keys,
                dialect=dialect,
            )
    except (ConfigError, LedgerUnavailable) as exc:  # already redacted
        print(str(exc), file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"usage: {exc}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:
        print(f"cannot read usage ledger {target}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([_record(r, keys) for r in rows], indent=2))
    elif args.csv:
        sys.stdout.write(_csv(rows, keys))
    else:
        _table(rows, keys)
    return 0


@contextlib.contextmanager
def _open(target: str) -> Iterator[tuple[SQLConnection, Dialect]]:
    """A read-only connection to the ledger at ``target`` and its SQL dialect."""
    if is_url(target):
        from .postgres import PostgresBackend

        backend = PostgresBackend(target, migrate=False)
        try:
            with backend.reading() as conn:
                yield conn, backend.dialect
        finally:
            backend.close()
        return
    conn = sqlite3.connect(f"file:{quote(target)}?mode=ro", uri=True, timeout=5.0)
    try:
        yield conn, SQLITE
    finally:
        conn.close()


def _split(value: str) -> list[str]:
    return [k.strip() for k in value.split(",") if k.strip()]


def _record(row: SummaryRow, keys: Sequence[str]) -> dict[str, object]:
    data = row.model_dump()
    return {k: data[k] for k in (*keys, *_METRICS)}


def _csv(rows: list[SummaryRow], keys: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*keys, *_METRICS], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        # Microsecond precision is plenty; full float reprs only add noise in a spreadsheet.
        writer.writerow(
            {k: round(v, 3) if isinstance(v, float) else v for k, v in _record(row, keys).items()}
        )
    return out.getvalue()


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _table(rows: list[SummaryRow], keys: Sequence[str]) -> None:
    header = [*keys, *_METRICS]
    cells = [[_cell(v) for v in _record(r, keys).values()] for r in rows]
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            table = Table(*header)
            for line in cells:
                table.add_row(*line)
            Console().print(table)
            return
    if not rows:
        print("no calls")
        return
    widths = [max(len(h), *(len(line[i]) for line in cells)) for i, h in enumerate(header)]
    n_keys = len(keys)

    def fmt(line: Sequence[str]) -> str:
        # Group keys align left, numbers right.
        return "  ".join(
            c.ljust(w) if i < n_keys else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()

    print(fmt(header))
    print(fmt(["-" * w for w in widths]))
    for line in cells:
        print(fmt(line))
