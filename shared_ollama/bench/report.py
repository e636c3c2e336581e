"""Terminal report: the result's phases, endpoints, errors and server timings as rich tables.

Reads only a ``BenchResult``; the HTML report (``html.py``) shows the same rows plus plots.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .result import BenchResult, PhaseResult, Stats, Summary

__all__ = [
    "ENDPOINT_COLUMNS",
    "PHASE_COLUMNS",
    "endpoint_label",
    "endpoint_rows",
    "fmt",
    "phase_rows",
    "print_summary",
]

PHASE_COLUMNS = (
    "phase",
    "ok/failed",
    "req/s",
    "out tok/s",
    "TTFT p50/p99 ms",
    "TPOT p50/p99 ms",
    "ITL p50/p99 ms",
    "E2E p50/p99 ms",
    "goodput/s",
    "send lag p99 ms",
)
ENDPOINT_COLUMNS = (
    "endpoint",
    "requests",
    "ok/failed",
    "out tok/s",
    "TTFT p50/p99 ms",
    "TPOT p50/p99 ms",
    "E2E p50/p99 ms",
)


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for a table cell; "-" when unknown."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _pair(st: Stats | None) -> str:
    return "-" if st is None else f"{fmt(st.p50)} / {fmt(st.p99)}"


def _load(p: PhaseResult) -> str:
    if p.mode == "closed":
        return p.name
    achieved = "-" if p.achieved_rate is None else f"{p.achieved_rate:.2f}"
    return f"{p.name} (got {achieved}/s)"


def _row(name: str, s: Summary) -> list[str]:
    lag = s.send_lag_ms.p99 if s.send_lag_ms else None
    return [
        name,
        f"{s.completed}/{s.failed}" + (f" (+{s.cancelled} cancelled)" if s.cancelled else ""),
        fmt(s.request_throughput, 2),
        fmt(s.output_throughput),
        _pair(s.ttft_ms),
        _pair(s.tpot_ms),
        _pair(s.itl_ms),
        _pair(s.e2e_ms),
        fmt(s.goodput, 2),
        fmt(lag, 2),
    ]


def phase_rows(result: BenchResult) -> list[list[str]]:
    """One row per phase, then the whole run."""
    rows = [_row(_load(p), p.summary) for p in result.phases]
    if len(result.phases) > 1:
        rows.append(_row("all phases", result.summary))
    return rows


def endpoint_label(result: BenchResult, url: str) -> str:
    """``name (kind)`` of an endpoint URL, from the run metadata."""
    for ep in result.metadata.endpoints:
        if ep.get("url") == url:
            return f"{ep.get('name') or url} ({ep.get('kind')})"
    return url


def endpoint_rows(result: BenchResult, summary: Summary) -> list[list[str]]:
    """One row per endpoint of a summary."""
    return [
        [
            endpoint_label(result, ep),
            str(e.requests),
            f"{e.completed}/{e.failed}",
            fmt(e.output_throughput),
            _pair(e.ttft_ms),
            _pair(e.tpot_ms),
            _pair(e.e2e_ms),
        ]
        for ep, e in summary.per_endpoint.items()
    ]


def _table(title: str, columns: Sequence[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    return table


def print_summary(result: BenchResult, console: Console | None = None) -> None:
    """Print the phase table, per-endpoint table, errors, server timings and notes."""
    console = console or Console()
    meta = result.metadata
    flags = " (simulated)" if meta.simulate else ""
    flags += " [bold red](interrupted)[/]" if meta.interrupted else ""
    console.print(
        f"[bold]{meta.scenario.get('name', 'bench')}[/]{flags}: "
        f"{len(result.requests)} requests in {meta.wall_duration_s:.1f} s"
    )
    console.print(_table("Phases", PHASE_COLUMNS, phase_rows(result)))
    if len(result.summary.per_endpoint) > 1:
        console.print(
            _table(
                "Endpoints (all phases)", ENDPOINT_COLUMNS, endpoint_rows(result, result.summary)
            )
        )
    s = result.summary
    if s.errors_by_type or s.retries:
        errs = ", ".join(f"{k}: {v}" for k, v in s.errors_by_type.items()) or "none"
        console.print(f"Errors: {errs}; retries: {s.retries} ({s.retried_requests} requests)")
    if s.server:
        rows = [
            [k, str(v.count), fmt(v.mean, 2), fmt(v.p50, 2), fmt(v.p99, 2)]
            for k, v in s.server.items()
        ]
        console.print(_table("Server-reported (ms)", ("timing", "n", "mean", "p50", "p99"), rows))
    if s.tokens_per_joule is not None:
        console.print(f"Energy: {s.energy_j:.0f} J, {s.tokens_per_joule:.2f} output tokens/J")
    for note in meta.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
