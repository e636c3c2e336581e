"""Terminal report: warnings first, then phases, efficiency, SLO headroom, endpoints, errors,
server timings, findings and the samplers' cadence, as rich tables.

Reads only a ``BenchResult``; the HTML and PDF reports show the same rows (from the
functions here and ``findings``) plus plots.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .findings import findings, slo_headroom, slo_name
from .result import BenchResult, PhaseResult, Stats, Summary

__all__ = [
    "CACHE_COLUMNS",
    "ENDPOINT_COLUMNS",
    "PHASE_COLUMNS",
    "cache_rows",
    "efficiency_table",
    "endpoint_imbalance",
    "endpoint_label",
    "endpoint_rows",
    "fmt",
    "headroom_table",
    "phase_rows",
    "print_summary",
    "sampling_line",
    "warning_lines",
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
    "bench CPU",
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
CACHE_COLUMNS = (
    "phase",
    "TTFT p50/p99 ms",
    "cache reported",
    "cached tok",
    "cache hit %",
    "history hit %",
    "busiest/mean endpoint",
    "routing",
)
#: Marks a phase with warnings in tables (the warnings are listed above them).
WARNED = "(!)"


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
    name = f"{p.name} {WARNED}" if p.warnings else p.name
    if p.mode == "closed":
        return name
    achieved = "-" if p.achieved_rate is None else f"{p.achieved_rate:.2f}"
    return f"{name} (got {achieved}/s)"


def _row(name: str, s: Summary, driver_cpu: float | None) -> list[str]:
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
        "-" if driver_cpu is None else f"{driver_cpu:.2f} cores",
    ]


def phase_rows(result: BenchResult) -> list[list[str]]:
    """One row per phase (``(!)`` after a phase with warnings), then the whole run."""
    rows = [_row(_load(p), p.summary, p.driver_cpu) for p in result.phases]
    if len(result.phases) > 1:
        rows.append(_row("all phases", result.summary, None))
    return rows


def warning_lines(result: BenchResult) -> list[str]:
    """``phase: warning`` for every warning of every phase."""
    return [f"{p.name}: {w}" for p in result.phases for w in p.warnings]


def efficiency_table(result: BenchResult) -> tuple[list[str], list[list[str]]] | None:
    """Energy and cost per phase: (columns, rows), or None when neither is known."""
    phases = [(p.name, p.summary) for p in result.phases]
    if len(result.phases) > 1:
        phases.append(("all phases", result.summary))
    energy = any(s.energy_j is not None for _, s in phases)
    cost = result.cost is not None
    if not energy and not cost:
        return None
    columns = ["phase", "output tokens"]
    if energy:
        columns += ["GPU energy J", "output tok/J"]
    if cost:
        assert result.cost is not None
        columns += [f"{result.cost.currency}/1M out tok", f"{result.cost.currency}/1M tok"]
    rows = []
    for name, s in phases:
        row = [name, f"{s.total_output_tokens:,}"]
        if energy:
            row += [fmt(s.energy_j, 0), fmt(s.tokens_per_joule, 3)]
        if cost:
            row += [fmt(s.cost_per_1m_output_tokens, 3), fmt(s.cost_per_1m_tokens, 3)]
        rows.append(row)
    return columns, rows


def cost_basis(result: BenchResult) -> str | None:
    """What the costs assume, in words."""
    c = result.cost
    if c is None:
        return None
    source = {
        "given": "given",
        "nvml": "seen by NVML here",
        "assumed": "assumed: no GPU seen here, give --gpus",
    }[c.gpus_from]
    return f"cost at {c.gpu_hour_price:g} {c.currency} per GPU-hour x {c.gpus} GPU ({source})"


def headroom_table(result: BenchResult) -> tuple[list[str], list[list[str]]] | None:
    """Each phase's p99 against each SLO, with headroom (negative: over), or None."""
    rows = slo_headroom(result)
    if not rows:
        return None
    keys = list(result.slo)
    columns = ["phase", "goodput %"] + [
        f"{slo_name(k)} p99 / {result.slo[k]:g} ms (headroom)" for k in keys
    ]
    body = []
    for r in rows:
        cells = [r.phase, fmt(None if r.goodput_fraction is None else 100 * r.goodput_fraction)]
        for k in keys:
            if k in r.p99:
                value, room = r.p99[k]
                # Far over the limit, a multiple reads better than "-1821%".
                over = f"{value / result.slo[k]:.1f}x limit" if room < -1 else f"{room:+.0%}"
                cells.append(f"{fmt(value)} ({over})")
            else:
                cells.append("-")
        body.append(cells)
    return columns, body


def sampling_line(result: BenchResult) -> str | None:
    """The samplers' cadences and where they ran, in words (None when they were off)."""
    info = result.metadata.sampling
    if info.enabled is False:
        return "samplers: off"
    if info.interval_s is None:
        intervals = sorted({s.interval_s for s in result.samples if s.interval_s})
        if not intervals:
            return None
        return "samplers: every " + ", ".join(f"{i:g} s" for i in intervals)
    text = f"samplers: host and GPU every {info.interval_s:g} s"
    if info.server_interval_s is not None:
        text += f", servers every {info.server_interval_s:g} s"
    if info.where == "process":
        cpu = "" if info.process_cpu_s is None else f", {info.process_cpu_s:.2f} CPU-s"
        text += f", in a sampler process of their own{cpu}"
    elif info.where == "thread":
        text += ", on a thread of the bench process"
        if info.fallback:
            text += f" (no sampler process: {info.fallback})"
    return text


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


def endpoint_imbalance(result: BenchResult, summary: Summary) -> float | None:
    """Requests of the busiest endpoint over the mean per endpoint of the pool (endpoints
    that got none count: a router that leaves one idle is uneven)."""
    counts = [e.requests for ep, e in summary.per_endpoint.items() if ep != "(none)"]
    n = max(len(result.metadata.endpoints), len(counts))
    if not counts or n == 0 or sum(counts) == 0:
        return None
    return max(counts) / (sum(counts) / n)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _reasons(s: Summary) -> str:
    total = sum(s.routing.values())
    if not total:
        return "-"
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in s.routing.items())


def cache_rows(result: BenchResult) -> list[list[str]] | None:
    """Prefix cache and routing per phase (then the run), or None when no request
    reported cache hits or a routing decision."""
    phases = [(p.name, p.summary) for p in result.phases]
    if len(result.phases) > 1:
        phases.append(("all phases", result.summary))
    if not any(s.cache_reported or s.routing for _, s in phases):
        return None
    return [
        [
            name,
            _pair(s.ttft_ms),
            f"{s.cache_reported}/{s.completed}",
            "-" if s.cached_tokens is None else f"{s.cached_tokens:,}",
            _pct(s.cache_hit_ratio),
            _pct(s.history_hit_ratio),
            fmt(endpoint_imbalance(result, s), 2),
            _reasons(s),
        ]
        for name, s in phases
    ]


def _table(title: str, columns: Sequence[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    return table


def print_summary(result: BenchResult, console: Console | None = None) -> None:
    """Print warnings, the phase table, efficiency, SLO headroom, per-endpoint table,
    errors, server timings, findings, the samplers' cadence and notes."""
    console = console or Console()
    meta = result.metadata
    flags = " (simulated)" if meta.simulate else ""
    flags += " [bold red](interrupted)[/]" if meta.interrupted else ""
    console.print(
        f"[bold]{meta.scenario.get('name', 'bench')}[/]{flags}: "
        f"{len(result.requests)} requests in {meta.wall_duration_s:.1f} s"
    )
    for line in warning_lines(result):
        console.print(f"[bold red]warning:[/] {escape(line)}", highlight=False)
    console.print(_table("Phases", PHASE_COLUMNS, phase_rows(result)))
    if (cache := cache_rows(result)) is not None:
        console.print(_table("Prefix cache and routing", CACHE_COLUMNS, cache))
    if (eff := efficiency_table(result)) is not None:
        console.print(_table("Energy and cost", *eff))
        if (basis := cost_basis(result)) is not None:
            console.print(escape(basis), highlight=False)
    if (room := headroom_table(result)) is not None:
        console.print(_table("SLO headroom at p99", *room))
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
    found = findings(result)
    if found:
        console.print("[bold]Findings[/]")
        for line in found:
            console.print(f"- {escape(line)}", highlight=False)
    if (sampling := sampling_line(result)) is not None:
        console.print(escape(sampling), highlight=False)
    for note in meta.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
