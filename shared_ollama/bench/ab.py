"""``run --strategies a,b,c``: one workload and seed run once per routing strategy, compared.

Each strategy gets a scenario of its own (the same but ``pool.strategy``), so every run
sends the same prompts in the same order; with ``--simulate`` each starts fresh
FakeEngines (empty prefix caches). The comparison is a table per strategy (TTFT, cache hit
ratios, how evenly the endpoints were loaded, why calls went where they went) and the usual
``compare`` deltas of each strategy against the first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, Field
from rich.console import Console
from rich.table import Table

from ..config import Strategy
from .compare import Delta, compare
from .report import endpoint_imbalance, fmt
from .result import BenchResult
from .scenario import Scenario

__all__ = [
    "AB_METRICS",
    "StrategyRow",
    "parse_strategies",
    "print_strategies",
    "strategy_rows",
    "strategy_scenarios",
    "write_comparison",
]

#: The ``compare`` metrics shown for each strategy against the first.
AB_METRICS = ("p50_ttft_ms", "p99_ttft_ms", "mean_e2el_ms", "request_throughput", "error_rate")
COLUMNS = (
    "strategy",
    "ok/failed",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "cache hit %",
    "history hit %",
    "busiest/mean endpoint",
    "routing",
)


def parse_strategies(text: str) -> list[str]:
    """``"affinity,round_robin"`` -> the names, each a known strategy, none twice."""
    known = get_args(Strategy)
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in known]
    if bad:
        raise ValueError(f"unknown strategy {bad[0]!r}: choose from {', '.join(known)}")
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError("--strategies: give two or more different strategies")
    return names


def strategy_scenarios(scenario: Scenario, strategies: Sequence[str]) -> list[Scenario]:
    """The scenario once per strategy: same workload and seed, its own name. Against real
    servers each also gets its own prompt salt (``[ab 1] ``, ``[ab 2] ``...: the same length
    for all), so that no strategy is served from the prompts an earlier one left in the
    servers' caches; simulated runs start with empty caches and send the same prompts."""
    out = []
    width = len(str(len(strategies)))
    for i, strategy in enumerate(strategies, 1):
        pool = scenario.pool.model_copy(update={"strategy": strategy})
        update: dict[str, Any] = {"pool": pool, "name": f"{scenario.name}-{strategy}"}
        if not scenario.simulate:
            update["prompt_salt"] = f"[ab {i:0{width}d}] {scenario.prompt_salt}"
        out.append(scenario.model_copy(update=update))
    return out


class StrategyRow(BaseModel):
    """One strategy's figures over its whole run (every measured phase)."""

    strategy: str
    result: str | None = None
    requests: int
    completed: int
    failed: int
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    e2e_p50_ms: float | None = None
    cache_reported: int = 0
    cached_tokens: int | None = None
    cache_hit_ratio: float | None = None
    history_hit_ratio: float | None = None
    endpoint_imbalance: float | None = None
    #: Requests per endpoint URL.
    endpoint_requests: dict[str, int] = Field(default_factory=dict)
    routing: dict[str, int] = Field(default_factory=dict)


def strategy_rows(
    results: Sequence[tuple[str, BenchResult]], paths: Sequence[Path | None] = ()
) -> list[StrategyRow]:
    """A row per (strategy, result)."""
    rows = []
    for i, (strategy, r) in enumerate(results):
        s = r.summary
        path = paths[i] if i < len(paths) else None
        rows.append(
            StrategyRow(
                strategy=strategy,
                result=None if path is None else str(path),
                requests=s.requests,
                completed=s.completed,
                failed=s.failed,
                ttft_p50_ms=s.ttft_ms.p50 if s.ttft_ms else None,
                ttft_p99_ms=s.ttft_ms.p99 if s.ttft_ms else None,
                e2e_p50_ms=s.e2e_ms.p50 if s.e2e_ms else None,
                cache_reported=s.cache_reported,
                cached_tokens=s.cached_tokens,
                cache_hit_ratio=s.cache_hit_ratio,
                history_hit_ratio=s.history_hit_ratio,
                endpoint_imbalance=endpoint_imbalance(r, s),
                endpoint_requests={ep: e.requests for ep, e in s.per_endpoint.items()},
                routing=dict(s.routing),
            )
        )
    return rows


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _cells(row: StrategyRow) -> list[str]:
    total = sum(row.routing.values())
    reasons = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in row.routing.items()) or "-"
    return [
        row.strategy,
        f"{row.completed}/{row.failed}",
        fmt(row.ttft_p50_ms),
        fmt(row.ttft_p99_ms),
        _pct(row.cache_hit_ratio),
        _pct(row.history_hit_ratio),
        fmt(row.endpoint_imbalance, 2),
        reasons,
    ]


def deltas_against_first(results: Sequence[tuple[str, BenchResult]]) -> list[Delta]:
    """``compare`` of each strategy's whole run against the first strategy's."""
    if not results:
        return []
    base_name, base = results[0]
    out: list[Delta] = []
    for strategy, r in results[1:]:
        deltas, _ = compare(base, r, threshold_pct=None, metrics=AB_METRICS)
        out += [
            Delta(f"{strategy} vs {base_name}", d.metric, d.a, d.b, d.change_pct, False)
            for d in deltas
            if d.scope == "all"
        ]
    return out


def print_strategies(
    results: Sequence[tuple[str, BenchResult]], console: Console | None = None
) -> None:
    """The strategy table, then each strategy's deltas against the first."""
    console = console or Console()
    table = Table(
        title="Strategies (same workload and seed)", title_justify="left", header_style="bold"
    )
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i in (0, len(COLUMNS) - 1) else "right")
    for row in strategy_rows(results):
        table.add_row(*_cells(row))
    console.print(table)
    deltas = deltas_against_first(results)
    if deltas:
        vs = Table(title="Against the first strategy", title_justify="left", header_style="bold")
        for col in ("strategies", "metric", "first", "this", "change"):
            vs.add_column(col, justify="left" if col in ("strategies", "metric") else "right")
        for d in deltas:
            change = "-" if d.change_pct is None else f"{d.change_pct:+.1f}%"
            vs.add_row(d.scope, d.metric, fmt(d.a, 2), fmt(d.b, 2), change)
        console.print(vs)


def write_comparison(
    results: Sequence[tuple[str, BenchResult]], out: Path, paths: Sequence[Path | None] = ()
) -> list[Path]:
    """``comparison.json`` (rows and deltas) and ``comparison.html`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = strategy_rows(results, paths)
    deltas = deltas_against_first(results)
    meta = results[0][1].metadata if results else None
    doc: dict[str, Any] = {
        "schema": "shared_ollama.bench.strategies",
        "seed": meta.seed if meta else None,
        "simulate": meta.simulate if meta else None,
        "workloads": meta.scenario.get("workloads") if meta else None,
        "strategies": [r.model_dump() for r in rows],
        "deltas": [
            {"scope": d.scope, "metric": d.metric, "a": d.a, "b": d.b, "change_pct": d.change_pct}
            for d in deltas
        ],
    }
    json_path = out / "comparison.json"
    json_path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    html_path = out / "comparison.html"
    html_path.write_text(_html(rows, deltas), encoding="utf-8")
    return [json_path, html_path]


def _html(rows: Sequence[StrategyRow], deltas: Sequence[Delta]) -> str:
    def table(columns: Sequence[str], body: Sequence[Sequence[str]]) -> str:
        head = "".join(f"<th>{escape(c)}</th>" for c in columns)
        cells = "".join(
            "<tr>" + "".join(f"<td>{escape(v)}</td>" for v in row) + "</tr>" for row in body
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>"

    links = "".join(
        f'<li><a href="{escape(Path(r.result).parent.name)}/report.html">'
        f"{escape(r.strategy)}</a></li>"
        for r in rows
        if r.result
    )
    vs = [
        [
            d.scope,
            d.metric,
            fmt(d.a, 2),
            fmt(d.b, 2),
            "-" if d.change_pct is None else f"{d.change_pct:+.1f}%",
        ]
        for d in deltas
    ]
    style = (
        "body{font:14px system-ui,sans-serif;margin:24px}table{border-collapse:collapse}"
        "th,td{padding:3px 8px;border-bottom:1px solid #eef;text-align:right}"
        "td:first-child,th:first-child{text-align:left}"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>bench: strategies</title><style>{style}</style></head><body>"
        "<h1>Routing strategies: same workload and seed</h1>"
        f"{table(COLUMNS, [_cells(r) for r in rows])}"
        f"<h2>Against the first strategy</h2>"
        f"{table(('strategies', 'metric', 'first', 'this', 'change'), vs)}"
        f"<h2>Each run's report</h2><ul>{links}</ul></body></html>"
    )
