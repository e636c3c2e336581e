"""``compare A.json B.json``: per-metric deltas of B against A and a regression verdict.

A metric regresses when it moves the wrong way (latency up, throughput or ``bench
capacity``'s answer down) by more than the threshold, relative to A; the CLI exits non-zero
on any regression.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .result import BenchResult, CapacityResult, Summary

__all__ = ["DEFAULT_METRICS", "Delta", "compare", "parse_threshold", "print_deltas"]

#: Metric -> True when higher is better.
_DIRECTION = {
    **{
        f"{stat}_{m}_ms": False
        for m in ("ttft", "tpot", "itl", "e2el")
        for stat in ("mean", "median", "std", "p50", "p90", "p95", "p99")
    },
    "request_throughput": True,
    "output_throughput": True,
    "total_token_throughput": True,
    "request_goodput": True,
    "error_rate": False,
    #: ``bench capacity``'s answer (the highest load meeting its SLO).
    "capacity": True,
}
DEFAULT_METRICS = (
    "mean_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "p99_tpot_ms",
    "mean_itl_ms",
    "p99_itl_ms",
    "mean_e2el_ms",
    "p99_e2el_ms",
    "request_throughput",
    "output_throughput",
    "request_goodput",
    "error_rate",
    "capacity",
)


@dataclass(frozen=True, slots=True)
class Delta:
    """One metric of one scope (``all`` or a phase name) in A and B."""

    scope: str
    metric: str
    a: float | None
    b: float | None
    #: (B - A) / A in percent; inf when A is 0 and B is not; None when either is unknown.
    change_pct: float | None
    regression: bool


def parse_threshold(text: str) -> float:
    """``"10%"`` or ``"10"`` -> 10.0 (percent)."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise ValueError(f"bad threshold {text!r}: use a percentage such as 10%") from None
    if value < 0 or math.isnan(value):
        raise ValueError(f"bad threshold {text!r}: must be >= 0")
    return value


def _values(s: Summary) -> dict[str, float | None]:
    out: dict[str, float | None] = {k: None if v is None else float(v) for k, v in s.vllm.items()}
    out["error_rate"] = s.failed / s.requests if s.requests else None
    return out


def _delta(
    scope: str, metric: str, a: float | None, b: float | None, threshold: float | None
) -> Delta:
    if a is None or b is None:
        return Delta(scope, metric, a, b, None, False)
    change = (b - a) / abs(a) * 100 if a != 0 else (0.0 if b == 0 else math.copysign(math.inf, b))
    worse = -change if _DIRECTION[metric] else change
    return Delta(scope, metric, a, b, change, threshold is not None and worse > threshold)


def compare(
    a: BenchResult,
    b: BenchResult,
    *,
    threshold_pct: float | None,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> tuple[list[Delta], list[str]]:
    """Deltas for the whole run and each phase both results have; plus notes.

    With ``threshold_pct=None`` nothing is judged a regression (changes only).
    """
    unknown = [m for m in metrics if m not in _DIRECTION]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(_DIRECTION)}")
    scopes: list[tuple[str, Summary, Summary]] = [("all", a.summary, b.summary)]
    b_phases = {p.name: p for p in b.phases}
    notes = []
    for p in a.phases:
        if p.name in b_phases:
            scopes.append((p.name, p.summary, b_phases[p.name].summary))
        else:
            notes.append(f"phase {p.name!r} is only in A")
    a_names = {p.name for p in a.phases}
    notes += [f"phase {n!r} is only in B" for n in b_phases if n not in a_names]
    deltas = []
    per_scope = [m for m in metrics if m != "capacity"]
    for scope, sa, sb in scopes:
        va, vb = _values(sa), _values(sb)
        deltas += [_delta(scope, m, va.get(m), vb.get(m), threshold_pct) for m in per_scope]
    if "capacity" in metrics:
        asked = list(metrics) != list(DEFAULT_METRICS)
        deltas += _capacity_delta(a.capacity, b.capacity, threshold_pct, notes, asked)
    return deltas, notes


def _capacity_value(cap: CapacityResult) -> float | None:
    if cap.status == "below_start":
        return 0.0  # nothing met the SLO: any capacity in A is lost
    return None if cap.status == "interrupted" else cap.capacity


def _capacity_delta(
    a: CapacityResult | None,
    b: CapacityResult | None,
    threshold: float | None,
    notes: list[str],
    asked: bool,
) -> list[Delta]:
    if a is None or b is None:
        if a is not None or b is not None:
            notes.append(f"only {'A' if b is None else 'B'} has a capacity search")
        elif asked:
            notes.append("neither result has a capacity search")
        return []
    if (a.search, a.slo) != (b.search, b.slo):
        notes.append("the capacity searches differ (search or SLO): capacity not compared")
        return []
    for name, cap in (("A", a), ("B", b)):
        if cap.status == "interrupted":
            notes.append(f"{name}'s capacity search was interrupted")
        elif cap.status == "at_max_load":
            notes.append(f"{name}'s capacity is at least {cap.capacity:g} (its --max-load)")
    return [_delta("all", "capacity", _capacity_value(a), _capacity_value(b), threshold)]


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:,.3f}"


def print_deltas(
    deltas: Sequence[Delta],
    notes: Sequence[str],
    threshold_pct: float | None,
    console: Console | None = None,
) -> None:
    """A table of A, B and the change, regressions in red."""
    console = console or Console()
    rule = "no threshold" if threshold_pct is None else f"worse by more than {threshold_pct:g}%"
    table = Table(title=f"B vs A (regression: {rule})", title_justify="left", header_style="bold")
    for col in ("scope", "metric", "A", "B", "change"):
        table.add_column(col, justify="left" if col in ("scope", "metric") else "right")
    for d in deltas:
        change = "-" if d.change_pct is None else f"{d.change_pct:+.1f}%"
        style = "bold red" if d.regression else ""
        table.add_row(d.scope, d.metric, _num(d.a), _num(d.b), change, style=style)
    console.print(table)
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    bad = [d for d in deltas if d.regression]
    if threshold_pct is None:
        return
    if bad:
        console.print(
            f"[bold red]{len(bad)} regression(s)[/]: "
            + ", ".join(f"{d.scope}/{d.metric}" for d in bad)
        )
    else:
        console.print("[green]no regression[/]")
