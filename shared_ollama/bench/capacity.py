"""``bench capacity``: the highest load (concurrency or request rate) that meets an SLO.

The search is pure: ``next_load`` maps the probes so far (load -> met the SLO or not) to the
next load to try, ``conclude`` to the answer. It brackets by doubling from ``start`` until
the SLO fails (or ``max_load`` passes), then bisects between the highest passing and the
lowest failing load down to the resolution. Measuring is the session's: every probe is one
phase per repeat, run by ``run_scenario`` through its ``driver`` hook, so a capacity run is
an ordinary result (phases, requests, samples) plus a ``capacity`` section.

A probe passes when, for every ``metric<=limit``, the mean over its repeats is within the
limit; a Student's t confidence interval on that mean is reported beside it, and a probe
whose interval straddles a limit is marked uncertain.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import metrics
from .result import BenchResult, CapacityProbe, CapacityResult, Estimate, Summary
from .runner import PhaseRun, ProgressSink, Runner
from .scenario import Scenario
from .scheduler import ClosedLoop, OpenLoop, PhasePlan, Stop, achieved_rate
from .session import RecordSink, RunPhase, run_scenario

__all__ = [
    "CONFIDENCE",
    "CapacitySearch",
    "CapacitySpec",
    "SearchSpace",
    "Verdict",
    "answer_text",
    "conclude",
    "confidence_interval",
    "measure_probe",
    "metric_value",
    "needs_streams",
    "next_load",
    "parse_capacity_slo",
    "parse_resolution",
    "print_capacity",
    "probe_line",
    "run_capacity",
    "search",
]

CONFIDENCE = 0.95
#: Student's t, 97.5th percentile (two-sided 95%), for 1..30 degrees of freedom.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip

_METRIC = re.compile(r"^(mean|median|p50|p90|p95|p99)_(ttft|tpot|itl|e2e|e2el)_ms$")
_STREAM_ONLY = ("ttft", "tpot", "itl")
_SLO_HELP = "use metric<=value pairs, e.g. p99_ttft_ms<=500,p99_itl_ms<=50,error_rate<=0.01"


# -- the SLO -----------------------------------------------------------------------------


def parse_capacity_slo(text: str) -> dict[str, float]:
    """``"p99_ttft_ms<=500,error_rate<=0.01"`` -> ``{"p99_ttft_ms": 500.0, ...}``.

    Metrics: ``{mean,median,p50,p90,p95,p99}_{ttft,tpot,itl,e2e}_ms`` (the vLLM key names
    of the result's summaries; ``e2el`` is accepted for ``e2e``) and ``error_rate`` (failed /
    sent). Every bound is an upper limit: each of these only grows with load.
    """
    out: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("<=")
        name = name.strip().lower()
        if not sep:
            raise ValueError(f"bad SLO {item!r}: {_SLO_HELP}")
        if name != "error_rate" and not _METRIC.match(name):
            raise ValueError(f"bad SLO {item!r}: unknown metric {name!r}; {_SLO_HELP}")
        name = name.replace("_e2el_", "_e2e_")
        try:
            limit = float(value.strip().removesuffix("ms"))
        except ValueError:
            raise ValueError(f"bad SLO {item!r}: {value.strip()!r} is not a number") from None
        if not math.isfinite(limit) or limit < 0 or (name == "error_rate" and limit > 1):
            raise ValueError(f"bad SLO {item!r}: a limit is >= 0 (error_rate: 0 to 1)")
        if name in out:
            raise ValueError(f"bad SLO: {name} given twice")
        out[name] = limit
    if not out:
        raise ValueError(f"empty SLO: {_SLO_HELP}")
    return out


def needs_streams(slo: dict[str, float]) -> list[str]:
    """The SLO metrics only streamed requests have (TTFT, TPOT, ITL)."""
    return [m for m in slo if any(f"_{k}_" in m for k in _STREAM_ONLY)]


def metric_value(summary: Summary, metric: str) -> float | None:
    """One SLO metric of a summary (None: no completed request has it)."""
    if metric == "error_rate":
        return summary.failed / summary.requests if summary.requests else None
    value = summary.vllm.get(metric.replace("_e2e_", "_e2el_"))
    return None if value is None else float(value)


def confidence_interval(
    values: Sequence[float],
) -> tuple[float, float | None, float | None]:
    """Mean and its two-sided 95% Student's t interval (no interval under two values)."""
    mean = statistics.fmean(values)
    n = len(values)
    if n < 2:
        return mean, None, None
    df = n - 1
    if df <= len(_T975):
        t = _T975[df - 1]
    else:  # Cornish-Fisher expansion around the normal quantile: within 1e-4 past 30 df
        z = statistics.NormalDist().inv_cdf(0.975)
        t = z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    half = t * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


# -- the search (pure) -------------------------------------------------------------------


def parse_resolution(text: str) -> tuple[float, bool]:
    """``"5%"`` -> (0.05, relative); ``"2"`` -> (2.0, absolute, in load units)."""
    raw = text.strip()
    relative = raw.endswith("%")
    try:
        value = float(raw.removesuffix("%"))
    except ValueError:
        raise ValueError(f"bad resolution {text!r}: use a percentage (5%) or a step") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"bad resolution {text!r}: must be positive")
    return (value / 100, True) if relative else (value, False)


@dataclass(frozen=True, slots=True)
class SearchSpace:
    """Where to search: loads from ``start`` up to ``max_load``; stop bisecting once the
    bracket is at most ``resolution`` wide (a fraction of its lower end when ``relative``).
    ``integer``: concurrency levels."""

    start: float
    max_load: float
    resolution: float = 0.05
    relative: bool = True
    integer: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", float(self.start))
        object.__setattr__(self, "max_load", float(self.max_load))
        if not (math.isfinite(self.start) and self.start > 0):
            raise ValueError("the start load must be positive")
        if not (math.isfinite(self.max_load) and self.max_load >= self.start):
            raise ValueError(f"--max-load ({self.max_load:g}) is below the start load")
        if not self.resolution > 0:
            raise ValueError("the resolution must be positive")
        if self.integer and not (self.start.is_integer() and self.max_load.is_integer()):
            raise ValueError("concurrency loads are whole numbers")

    def snap(self, load: float) -> float:
        """A load as the search uses it: whole for concurrency, 4 significant digits else
        (phase names stay distinct and readable)."""
        if self.integer:
            return float(math.floor(load))
        return float(f"{load:.4g}")

    def narrow(self, lo: float, hi: float) -> bool:
        """Whether [lo, hi] is within the resolution."""
        step = self.resolution * lo if self.relative else self.resolution
        return hi - lo <= max(step, 1.0 if self.integer else 0.0)


#: (load, met the SLO), in the order measured.
History = Sequence[tuple[float, bool]]


def _bracket(history: History) -> tuple[float | None, float | None]:
    # The lowest failing load, and the highest passing load below it: a pass above a
    # failure is noise the search does not follow.
    hi = min((load for load, ok in history if not ok), default=None)
    lo = max((load for load, ok in history if ok and (hi is None or load < hi)), default=None)
    return lo, hi


def next_load(space: SearchSpace, history: History) -> float | None:
    """The next load to measure given the probes so far; None when the search is done."""
    if not history:
        return space.start
    lo, hi = _bracket(history)
    if lo is None:
        return None  # fails at the start load
    if hi is None:
        if lo >= space.max_load:
            return None
        return min(space.snap(lo * 2), space.max_load)
    if space.narrow(lo, hi):
        return None
    mid = space.snap((lo + hi) / 2)
    tried = {load for load, _ in history}
    return None if mid in tried or not lo < mid < hi else mid


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a search found: ``capacity`` met the SLO, ``ceiling`` did not."""

    status: Literal["found", "at_max_load", "below_start", "interrupted"]
    capacity: float | None
    ceiling: float | None


def conclude(space: SearchSpace, history: History, *, complete: bool = True) -> Verdict:
    """The answer of the probes so far (``complete=False``: the search was cut short)."""
    lo, hi = _bracket(history)
    if not complete:
        return Verdict("interrupted", lo, hi)
    if lo is None:
        return Verdict("below_start", None, hi)
    if hi is None and lo >= space.max_load:
        return Verdict("at_max_load", lo, None)
    return Verdict("found", lo, hi)


def search(space: SearchSpace, passes: Callable[[float], bool]) -> tuple[Verdict, list[float]]:
    """Run the search against ``passes(load)``; the verdict and the loads tried, in order."""
    history: list[tuple[float, bool]] = []
    while (load := next_load(space, history)) is not None:
        history.append((load, passes(load)))
    return conclude(space, history), [load for load, _ in history]


# -- measuring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CapacitySpec:
    """A capacity search: what to vary, the SLO, the space, repeats, and each probe's shape
    (stop rule; open loop: arrivals)."""

    search: Literal["concurrency", "rate"]
    slo: dict[str, float]
    space: SearchSpace
    repeats: int = 3
    stop: Stop = field(default_factory=lambda: Stop(requests=100))
    arrival: Literal["constant", "poisson"] = "poisson"
    burstiness: float = 1.0
    ramp_s: float = 0.0
    resolution_text: str = "5%"

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError("--repeats must be at least 1")
        if not self.burstiness > 0 or not self.ramp_s >= 0:
            raise ValueError("burstiness must be positive and the ramp >= 0")
        if self.search == "concurrency" and not self.space.integer:
            raise ValueError("a concurrency search needs an integer search space")

    def plan(self, load: float, repeat: int) -> PhasePlan:
        """The phase measuring ``load``'s ``repeat``-th time (1-based)."""
        suffix = "" if repeat == 1 else f"#{repeat}"
        if self.search == "concurrency":
            return PhasePlan(
                f"c={int(load)}{suffix}", ClosedLoop(int(load), self.ramp_s), self.stop
            )
        sched = OpenLoop(load, self.arrival, self.burstiness, self.ramp_s)
        return PhasePlan(f"rate={load:g}/s{suffix}", sched, self.stop)


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def measure_probe(spec: CapacitySpec, load: float, runs: Sequence[PhaseRun]) -> CapacityProbe:
    """The probe of ``load`` from its repeats' phases: estimates, verdict, uncertainty."""
    summaries = [
        metrics.summarize(r.requests, duration_s=(r.t_end_ns - r.t_start_ns) / 1e9) for r in runs
    ]
    estimates: dict[str, Estimate] = {}
    passed = all(s.completed > 0 for s in summaries)
    uncertain = False
    for metric, limit in spec.slo.items():
        values = [metric_value(s, metric) for s in summaries]
        if any(v is None for v in values):
            estimates[metric] = Estimate(values=values, mean=_mean(values))
            passed = False  # a repeat that cannot show the SLO met does not meet it
            continue
        known = [v for v in values if v is not None]
        mean, low, high = confidence_interval(known)
        estimates[metric] = Estimate(values=values, mean=mean, low=low, high=high)
        passed = passed and mean <= limit
        uncertain = uncertain or (low is not None and high is not None and low <= limit < high)
    rates = [achieved_rate([q.t_start_ns for q in r.requests]) for r in runs]
    return CapacityProbe(
        load=load,
        phases=[r.plan.name for r in runs],
        metrics=estimates,
        throughput=_mean([s.request_throughput for s in summaries]),
        achieved_rate=_mean(rates) if spec.search == "rate" else None,
        passed=passed,
        uncertain=uncertain,
    )


class CapacitySearch:
    """Drives the search through a session (``run_scenario(driver=search.drive)``)."""

    def __init__(
        self, spec: CapacitySpec, on_probe: Callable[[CapacityProbe], None] | None = None
    ) -> None:
        self.spec = spec
        self.on_probe = on_probe
        self.probes: list[CapacityProbe] = []
        self.complete = False

    def history(self) -> list[tuple[float, bool]]:
        """(load, passed) of every probe so far."""
        return [(p.load, p.passed) for p in self.probes]

    async def drive(self, run_phase: RunPhase) -> None:
        """Measure loads until ``next_load`` says done (or the run is stopped)."""
        while (load := next_load(self.spec.space, self.history())) is not None:
            runs: list[PhaseRun] = []
            for repeat in range(1, self.spec.repeats + 1):
                run = await run_phase(self.spec.plan(load, repeat))
                if run is None or run.stop_reason == "interrupted":
                    return  # a cut probe says nothing: the search ends incomplete
                runs.append(run)
            probe = measure_probe(self.spec, load, runs)
            self.probes.append(probe)
            if self.on_probe is not None:
                self.on_probe(probe)
        self.complete = True

    def result(self) -> CapacityResult:
        """The ``capacity`` section of the result."""
        spec = self.spec
        verdict = conclude(spec.space, self.history(), complete=self.complete)
        return CapacityResult(
            search=spec.search,
            slo=dict(spec.slo),
            repeats=spec.repeats,
            confidence=CONFIDENCE,
            start=spec.space.start,
            max_load=spec.space.max_load,
            resolution=spec.resolution_text,
            status=verdict.status,
            capacity=verdict.capacity,
            ceiling=verdict.ceiling,
            probes=list(self.probes),
        )


async def run_capacity(
    scenario: Scenario,
    spec: CapacitySpec,
    *,
    on_probe: Callable[[CapacityProbe], None] | None = None,
    progress: ProgressSink | None = None,
    on_record: RecordSink | None = None,
    on_runner: Callable[[Runner], None] | None = None,
) -> BenchResult:
    """Search ``scenario``'s pool with its workloads (its schedules are not used); the
    other arguments are ``run_scenario``'s."""
    finder = CapacitySearch(spec, on_probe)
    result = await run_scenario(
        scenario, progress=progress, on_record=on_record, on_runner=on_runner, driver=finder.drive
    )
    result.capacity = finder.result()
    return result


# -- output ------------------------------------------------------------------------------


def _load(search: str, load: float | None) -> str:
    if load is None:
        return "-"
    return f"c={int(load)}" if search == "concurrency" else f"{load:g} req/s"


def _slo_text(slo: dict[str, float]) -> str:
    return ", ".join(f"{k}<={v:g}" for k, v in slo.items())


def answer_text(cap: CapacityResult) -> str:
    """One line: the capacity, or why there is none."""
    slo = _slo_text(cap.slo)
    best, ceiling = _load(cap.search, cap.capacity), _load(cap.search, cap.ceiling)
    if cap.status == "found":
        return f"capacity: {best} meets {slo} ({ceiling} does not; resolution {cap.resolution})"
    if cap.status == "at_max_load":
        return f"capacity: at least {best}: {slo} still holds at --max-load (raise it)"
    if cap.status == "below_start":
        start = _load(cap.search, cap.start)
        return f"capacity: below {start}: {slo} fails even at the lowest load"
    return f"capacity: search interrupted; best so far {best}, lowest failing {ceiling}"


def _estimate(e: Estimate | None) -> str:
    if e is None or e.mean is None:
        return "-"
    if e.low is None or e.high is None:
        return f"{e.mean:.4g}"
    return f"{e.mean:.4g} ± {(e.high - e.low) / 2:.2g}"


def capacity_table(cap: CapacityResult) -> tuple[str, list[str], list[list[str]], list[bool]]:
    """The search as a table: title, columns, a row per probe (by load) and whether each
    passed; the terminal and the HTML report both show it."""
    how = f"mean of {cap.repeats} ± {cap.confidence:.0%} CI" if cap.repeats > 1 else "1 run each"
    columns = ["load", "req/s"] + (["achieved"] if cap.search == "rate" else [])
    columns += [f"{metric} (<={limit:g})" for metric, limit in cap.slo.items()] + ["verdict"]
    rows: list[list[str]] = []
    passed: list[bool] = []
    for p in sorted(cap.probes, key=lambda p: p.load):
        row = [_load(cap.search, p.load), f"{p.throughput or 0:.3g}"]
        if cap.search == "rate":
            row.append("-" if p.achieved_rate is None else f"{p.achieved_rate:.3g}")
        row += [_estimate(p.metrics.get(m)) for m in cap.slo]
        rows.append([*row, ("pass" if p.passed else "FAIL") + ("?" if p.uncertain else "")])
        passed.append(p.passed)
    return f"Capacity search ({cap.search}; {how})", columns, rows, passed


def capacity_notes(cap: CapacityResult) -> list[str]:
    """What goes under the table: what a "?" verdict means, where one is."""
    if any(p.uncertain for p in cap.probes):
        return ["?: the confidence interval straddles a limit (more --repeats to be sure)"]
    return []


def print_capacity(cap: CapacityResult, console: Console | None = None) -> None:
    """Every probe (load, each SLO metric's mean ± CI half-width, verdict), then the answer."""
    console = console or Console()
    title, columns, rows, passed = capacity_table(cap)
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        table.add_column(column, justify="left" if column == "verdict" else "right")
    for row, ok in zip(rows, passed, strict=True):
        table.add_row(*row, style="" if ok else "red")
    console.print(table)
    for note in capacity_notes(cap):
        console.print(note)
    style = "bold green" if cap.status in ("found", "at_max_load") else "bold red"
    console.print(f"[{style}]{escape(answer_text(cap))}[/]")


def probe_line(search: str, probe: CapacityProbe, slo: dict[str, float]) -> str:
    """One line per measured probe, for progress output."""
    parts = [f"{m} {_estimate(probe.metrics.get(m))}" for m in slo]
    verdict = "pass" if probe.passed else "fail"
    return f"probe {_load(search, probe.load)}: {verdict} ({', '.join(parts)})"
