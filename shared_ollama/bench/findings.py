"""What the report says about a result beyond its tables: phases measured on a saturated CPU,
cost per million tokens, the knee of the throughput curve and each load's SLO headroom.

Pure functions of a ``BenchResult`` (and its sampled series): the terminal summary, the HTML
and the PDF report all read the same sentences and rows from here.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from .result import BenchResult, CostBasis, PhaseResult, Series, Stats, Summary

__all__ = [
    "BENCH_BUSY_PCT",
    "HOST_BUSY_PCT",
    "HOST_BUSY_SHARE",
    "KNEE_ELASTICITY",
    "Headroom",
    "Knee",
    "apply_cost",
    "cpu_warnings",
    "findings",
    "knee",
    "slo_headroom",
    "slo_name",
]

#: A host CPU reading at or above this (all cores, %) means every core was busy ...
HOST_BUSY_PCT = 95.0
#: ... and a phase that spent at least this share of its time so ran on a saturated host.
HOST_BUSY_SHARE = 0.25
#: The bench process's mean CPU over a phase, in % of one core, from which its event loop
#: (one thread) was the bottleneck.
BENCH_BUSY_PCT = 90.0
#: A load step whose throughput grows by less than this power of the load's growth
#: (log-log slope: 1 proportional, 0 flat) is past the knee.
KNEE_ELASTICITY = 0.5


# -- CPU saturation ------------------------------------------------------------------------------


def _windows(series: Series, key: str, t0_ns: int, t1_ns: int) -> list[tuple[float, float]]:
    """(value, seconds inside ``[t0_ns, t1_ns]``) of each reading of a rate (CPU %): a
    reading is the mean since the one before it, so a short window (a reading at a phase
    boundary) weighs little. The first reading, whose window is unknown, is left out."""
    column = series.values.get(key)
    if column is None:
        return []
    out: list[tuple[float, float]] = []
    previous: int | None = None
    for t, value in zip(series.times_ns, column, strict=True):
        if value is None:
            continue
        if previous is not None:
            inside = min(t, t1_ns) - max(previous, t0_ns)
            if inside > 0:
                out.append((value, inside / 1e9))
        previous = t
    return out


def _mean(windows: Sequence[tuple[float, float]]) -> float:
    return math.fsum(v * w for v, w in windows) / math.fsum(w for _, w in windows)


def cpu_warnings(
    series: Sequence[Series], t0_ns: int, t1_ns: int, *, driver_cpu: float | None = None
) -> list[str]:
    """Warnings for a phase run on a saturated host CPU (the host sampler's readings) or by a
    saturated bench process (the host sampler's ``host.proc_cpu_pct``). Where the phase's
    ``driver_cpu`` is known, the bench's own backlog warnings judge the bench process and
    this only judges the host. Empty when neither was saturated, or nothing was sampled."""
    host = next((s for s in series if s.available and "host.cpu_pct" in s.values), None)
    out: list[str] = []
    if host is None:
        return out
    if busy := _windows(host, "host.cpu_pct", t0_ns, t1_ns):
        total = math.fsum(w for _, w in busy)
        hot = math.fsum(w for v, w in busy if v >= HOST_BUSY_PCT) / total
        if hot >= HOST_BUSY_SHARE:
            out.append(
                f"host CPU saturated: {HOST_BUSY_PCT:g}% or more for {hot:.0%} of the phase "
                f"(mean {_mean(busy):.0f}%); client-side times include waiting for a core"
            )
    if driver_cpu is not None:
        return out
    proc = _windows(host, "host.proc_cpu_pct", t0_ns, t1_ns)
    if proc and (proc_pct := _mean(proc)) >= BENCH_BUSY_PCT:
        out.append(
            f"bench process CPU saturated: {proc_pct:.0f}% of one core on average; its event "
            "loop runs on one core, so latencies include the client's own delays"
        )
    return out


# -- cost ----------------------------------------------------------------------------------------


def apply_cost(
    result: BenchResult, gpu_hour_price: float, gpus: int | None = None, currency: str = "USD"
) -> None:
    """Fill ``cost_per_1m_output_tokens`` and ``cost_per_1m_tokens`` of every summary:
    price x GPUs x duration in hours, per million tokens of completed requests. ``gpus``
    defaults to the GPUs NVML saw here, else 1 (said in ``result.cost.gpus_from``)."""
    if not gpu_hour_price >= 0:
        raise ValueError(f"gpu_hour_price must be >= 0, got {gpu_hour_price!r}")
    if gpus is not None:
        basis = CostBasis(gpu_hour_price=gpu_hour_price, gpus=gpus, currency=currency)
    elif result.metadata.gpus:
        n = len(result.metadata.gpus)
        basis = CostBasis(
            gpu_hour_price=gpu_hour_price, gpus=n, gpus_from="nvml", currency=currency
        )
    else:
        basis = CostBasis(
            gpu_hour_price=gpu_hour_price, gpus=1, gpus_from="assumed", currency=currency
        )
    result.cost = basis
    for summary in [p.summary for p in result.phases] + [result.summary]:
        spent = basis.gpu_hour_price * basis.gpus * summary.duration_s / 3600.0
        out = summary.total_output_tokens
        both = out + summary.total_input_tokens
        summary.cost_per_1m_output_tokens = spent / out * 1e6 if out else None
        summary.cost_per_1m_tokens = spent / both * 1e6 if both else None


# -- the knee of the throughput curve ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Knee:
    """Where throughput stops growing with load, for one kind of schedule."""

    mode: str  # "closed" (load: concurrency) or "open" (load: requested rate)
    #: The loads measured and their mean throughput (output tokens/s, else requests/s).
    loads: tuple[float, ...]
    throughputs: tuple[float, ...]
    unit: str
    #: Index into ``loads`` of the knee: the last load before a step below
    #: ``KNEE_ELASTICITY``; None when every step still scaled.
    index: int | None
    #: The log-log slope of each step (len(loads) - 1 values).
    elasticities: tuple[float, ...]


def _load(p: PhaseResult) -> float | None:
    value = p.concurrency if p.mode == "closed" else p.requested_rate
    return None if value is None else float(value)


def knee(result: BenchResult, mode: str) -> Knee | None:
    """The knee over the phases of one mode (``closed`` or ``open``); None with fewer than
    two distinct loads that completed requests."""
    by_load: dict[float, list[Summary]] = defaultdict(list)
    for p in result.phases:
        load = _load(p)
        if p.mode == mode and load and p.summary.completed:
            by_load[load].append(p.summary)
    if len(by_load) < 2:
        return None
    loads = sorted(by_load)
    tokens = all(s.output_throughput > 0 for group in by_load.values() for s in group)

    def rate(s: Summary) -> float:
        return s.output_throughput if tokens else s.request_throughput

    thr = [math.fsum(rate(s) for s in by_load[x]) / len(by_load[x]) for x in loads]
    slopes = []
    for i in range(len(loads) - 1):
        growth = thr[i + 1] / thr[i] if thr[i] > 0 and thr[i + 1] > 0 else 0.0
        step = math.log(loads[i + 1] / loads[i])
        slopes.append(math.log(growth) / step if growth > 0 else -math.inf)
    index = next((i for i, e in enumerate(slopes) if e < KNEE_ELASTICITY), None)
    unit = "output tok/s" if tokens else "req/s"
    return Knee(mode, tuple(loads), tuple(thr), unit, index, tuple(slopes))


# -- SLO headroom --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Headroom:
    """One phase against the SLOs: each SLO's p99 and its headroom (1 - p99 / limit:
    positive is room left, negative is over)."""

    phase: str
    mode: str
    load: float | None
    goodput_fraction: float | None
    #: SLO key (``ttft_ms``) -> (p99, headroom); absent where the phase has no such values.
    p99: dict[str, tuple[float, float]]

    @property
    def met(self) -> bool:
        """Every SLO met at p99."""
        return bool(self.p99) and all(room >= 0 for _, room in self.p99.values())


def slo_headroom(result: BenchResult) -> list[Headroom]:
    """One row per phase (empty without SLOs)."""
    rows: list[Headroom] = []
    if not result.slo:
        return rows
    for p in result.phases:
        p99: dict[str, tuple[float, float]] = {}
        for key, limit in result.slo.items():
            st = getattr(p.summary, key, None)
            if isinstance(st, Stats) and limit > 0:
                p99[key] = (st.p99, 1.0 - st.p99 / limit)
        rows.append(Headroom(p.name, p.mode, _load(p), p.summary.goodput_fraction, p99))
    return rows


# -- sentences -----------------------------------------------------------------------------------

_SLO_NAMES = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "e2e_ms": "E2E", "itl_ms": "ITL"}


def slo_name(key: str) -> str:
    """``ttft_ms`` -> ``TTFT``."""
    return _SLO_NAMES.get(key, key)


def _num(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.0f}"


def _load_name(mode: str, load: float) -> str:
    return f"c={load:g}" if mode == "closed" else f"{load:g} req/s"


def _knee_sentence(result: BenchResult, k: Knee) -> str:
    last = k.loads[-1]
    if k.index is None:
        growth = k.throughputs[-1] / k.throughputs[-2]
        step = k.loads[-1] / k.loads[-2]
        return (
            f"No throughput knee up to {_load_name(k.mode, last)}: the last step still grew "
            f"throughput {growth:.2g}x for {step:.2g}x the load; try higher loads."
        )
    at = k.loads[k.index]
    where = _load_name(k.mode, at)
    nxt = k.loads[k.index + 1]
    growth = k.throughputs[k.index + 1] / k.throughputs[k.index] if k.throughputs[k.index] else 0
    text = (
        f"Throughput knee at {where} ({_num(k.throughputs[k.index])} {k.unit}): "
        f"from {where} to {_load_name(k.mode, nxt)} throughput grew {growth:.2g}x for "
        f"{nxt / at:.2g}x the load"
    )
    ttft = _p99_at(result, k.mode, at), _p99_at(result, k.mode, nxt)
    if ttft[0] is not None and ttft[1] is not None:
        text += f", while TTFT p99 went from {_num(ttft[0])} to {_num(ttft[1])} ms"
    return text + "."


def _p99_at(result: BenchResult, mode: str, load: float) -> float | None:
    values = [
        p.summary.ttft_ms.p99
        for p in result.phases
        if p.mode == mode and _load(p) == load and p.summary.ttft_ms is not None
    ]
    return max(values) if values else None


def _slo_sentence(result: BenchResult, rows: Sequence[Headroom]) -> str | None:
    if not rows:
        return None
    slos = ", ".join(f"{slo_name(k)} <= {v:g} ms" for k, v in result.slo.items())
    met = [r for r in rows if r.met]
    if not met:
        return f"No phase met every SLO ({slos}) at p99."
    # Loads compare within a kind of schedule; closed loops (concurrency) first.
    best = max(met, key=lambda r: (r.mode == "closed", r.load or 0.0))
    rooms = "; ".join(
        f"{slo_name(k)} p99 {_num(v)} ms, {room:.0%} headroom" for k, (v, room) in best.p99.items()
    )
    text = f"Highest load meeting every SLO ({slos}) at p99: {best.phase} ({rooms})"
    over = [
        r
        for r in rows
        if not r.met and r.p99 and r.mode == best.mode and (r.load or 0.0) > (best.load or 0.0)
    ]
    if over:
        first = min(over, key=lambda r: r.load or 0.0)
        worst_key, (value, room) = min(first.p99.items(), key=lambda kv: kv[1][1])
        text += (
            f"; {first.phase} is over: {slo_name(worst_key)} p99 {_num(value)} ms, "
            f"{-room:.0%} above its limit"
        )
    return text + "."


def findings(result: BenchResult) -> list[str]:
    """A few sentences: the knee per schedule kind, SLO headroom, phases with warnings and
    the cheapest or most energy-efficient load."""
    out: list[str] = []
    for mode in ("closed", "open"):
        if (k := knee(result, mode)) is not None:
            out.append(_knee_sentence(result, k))
    if (slo := _slo_sentence(result, slo_headroom(result))) is not None:
        out.append(slo)
    elif not result.slo:
        out.append("No SLO given: headroom per load needs --slo ttft:MS,tpot:MS,e2e:MS.")
    warned = [p.name for p in result.phases if p.warnings]
    if warned:
        out.append(
            f"{len(warned)} of {len(result.phases)} phases carry warnings "
            f"({', '.join(warned)}): read their latencies with care."
        )
    per_j = [p for p in result.phases if p.summary.tokens_per_joule]
    if len(per_j) > 1:
        best = max(per_j, key=lambda p: p.summary.tokens_per_joule or 0.0)
        per_joule = best.summary.tokens_per_joule or 0.0
        out.append(f"Most output tokens per joule: {best.name} ({per_joule:.3g} tok/J).")
    priced = [p for p in result.phases if p.summary.cost_per_1m_output_tokens is not None]
    if result.cost is not None and priced:
        best = min(priced, key=lambda p: p.summary.cost_per_1m_output_tokens or math.inf)
        cost = best.summary.cost_per_1m_output_tokens or 0.0
        out.append(
            f"Cheapest load: {best.name} at {cost:.3g} {result.cost.currency} per million "
            f"output tokens ({result.cost.gpus} GPU x {result.cost.gpu_hour_price:g} "
            f"{result.cost.currency}/h)."
        )
    return out
