"""``python -m shared_ollama status|models|usage``: look at a pool and its accounting.

The pool comes from ``--config FILE`` / ``--endpoint URL[,kind]`` / ``SHARED_OLLAMA_*`` env.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .client import SyncSharedClient
from .config import Endpoint, HealthPolicy, UsageConfig
from .errors import SharedOllamaError

__all__ = ["main"]


def _client(args: argparse.Namespace) -> SyncSharedClient:
    overrides: dict[str, Any] = {
        # One probe round at start-up is the status; a one-shot command needs no more
        # (the background prober is stopped at close) and must not write the ledger.
        "health": HealthPolicy(interval_s=3600),
        "usage": UsageConfig(enabled=False),
    }
    if args.endpoint:
        eps = []
        for spec in args.endpoint:
            url, _, kind = spec.partition(",")
            eps.append(Endpoint(url, kind=kind or "auto"))
        overrides["endpoints"] = eps
    return SyncSharedClient.from_config(args.config, **overrides)


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value * 1000:.1f}ms" if value < 100 else f"{value:.1f}"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows = [s.as_dict() for s in client.pool_status()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        cols = ["name", "kind", "health", "breaker", "in_flight", "latency_ewma_s", "models",
                "last_error"]  # fmt: skip
        print(_table(rows, cols))
    return 0 if all(r["health"] == "up" for r in rows) else 1


def _models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        listing = client.list()
    rows = [m.model_dump(include={"model", "served_model", "endpoint", "size"})
            for m in listing.models]  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_table(rows, ["model", "served_model", "endpoint", "size"]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m shared_ollama``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "usage":
        from .usage.cli import usage_main

        return usage_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m shared_ollama")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("status", "health, breaker and load per endpoint"),
                        ("models", "models served across the pool")):  # fmt: skip
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", help="TOML pool file (default: $SHARED_OLLAMA_CONFIG)")
        p.add_argument("--endpoint", action="append", help="URL[,kind] (repeatable)")
        p.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("usage", help="usage per project/model from the ledger (see --help)")
    args = parser.parse_args(argv)
    try:
        return _status(args) if args.command == "status" else _models(args)
    except SharedOllamaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
