"""Plots for the HTML and PDF reports (matplotlib, no pyplot): latency CDFs, throughput and
latency against load, per-endpoint comparison, requests in flight, and GPU, host and server
timelines with readable titles, units on every axis and phases shaded.

``plots(result)`` lists the plots the result has data for; each draws onto any matplotlib
figure or subfigure, so the HTML (one SVG per plot) and the PDF (pages of several) share it.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np

from .result import BenchResult, PhaseResult, RequestRecord, Series

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, FigureBase

__all__ = ["WIDTH_IN", "MetricLabel", "Plot", "all_plots", "metric_label", "plots", "series_label"]

_MAX_CDF_POINTS = 400  # keeps each inline SVG small whatever the request count
#: Width of every plot in the HTML report, in inches (at 100 dpi: the page's 1,260 px).
WIDTH_IN = 12.6
#: A spread (max / min) past which a latency axis is logarithmic.
_LOG_SPREAD = 30.0
_GIB = float(2**30)


@dataclass(frozen=True, slots=True)
class Plot:
    """One plot: its title, its height at ``WIDTH_IN``, and how to draw it on a figure."""

    title: str
    height_in: float
    draw: Callable[[FigureBase], None]

    def figure(self, width_in: float = WIDTH_IN) -> Figure:
        """A standalone figure of this plot."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(width_in, self.height_in), layout="constrained")
        self.draw(fig)
        return fig

    def svg(self) -> str:
        """The plot as standalone SVG text (text kept as text: small and sharp)."""
        import matplotlib

        buf = io.StringIO()
        with matplotlib.rc_context({"svg.fonttype": "none"}):
            self.figure().savefig(buf, format="svg")
        return buf.getvalue()


# -- readable names for sampled metrics ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetricLabel:
    """How a sampled metric is shown: a title, the axis unit and the factor to get there."""

    title: str
    unit: str
    scale: float = 1.0


# Family (labels removed, GPU index replaced by N) -> label. Server families are the engines'
# own names (vLLM, llama.cpp, TGI); a family not here is shown under its raw name.
_LABELS = {
    "host.cpu_pct": MetricLabel("Host CPU, all cores", "%"),
    "host.proc_cpu_pct": MetricLabel("Bench process CPU", "% of one core"),
    "host.mem_used_bytes": MetricLabel("Host memory used", "GiB", 1 / _GIB),
    "host.proc_rss_bytes": MetricLabel("Bench process memory (RSS)", "GiB", 1 / _GIB),
    "gpuN.util_pct": MetricLabel("GPU N utilisation", "%"),
    "gpuN.power_w": MetricLabel("GPU N power", "W"),
    "gpuN.energy_j": MetricLabel("GPU N energy counter", "kJ", 1e-3),
    "gpuN.mem_used_bytes": MetricLabel("GPU N memory used", "GiB", 1 / _GIB),
    "gpuN.temp_c": MetricLabel("GPU N temperature", "°C"),
    "gpuN.sm_clock_mhz": MetricLabel("GPU N SM clock", "MHz"),
    "gpuN.throttle_reasons": MetricLabel("GPU N clock event reasons", "bitmask"),
    "vllm:num_requests_running": MetricLabel("Requests running", "requests"),
    "vllm:num_requests_waiting": MetricLabel("Requests waiting", "requests"),
    "vllm:kv_cache_usage_perc": MetricLabel("KV-cache usage", "%", 100.0),
    "vllm:gpu_cache_usage_perc": MetricLabel("KV-cache usage (older vLLM)", "%", 100.0),
    "vllm:generation_tokens_total": MetricLabel("Generated tokens (counter)", "tokens"),
    "vllm:prompt_tokens_total": MetricLabel("Prompt tokens (counter)", "tokens"),
    "vllm:request_success_total": MetricLabel("Requests finished (counter)", "requests"),
    "llamacpp:requests_processing": MetricLabel("Requests processing", "requests"),
    "llamacpp:requests_deferred": MetricLabel("Requests deferred", "requests"),
    "llamacpp:kv_cache_usage_ratio": MetricLabel("KV-cache usage", "%", 100.0),
    "llamacpp:tokens_predicted_total": MetricLabel("Generated tokens (counter)", "tokens"),
    "llamacpp:prompt_tokens_total": MetricLabel("Prompt tokens (counter)", "tokens"),
    "tgi_queue_size": MetricLabel("Requests queued", "requests"),
    "tgi_batch_current_size": MetricLabel("Batch size", "requests"),
    "tgi_batch_current_max_tokens": MetricLabel("Batch token budget", "tokens"),
    "tgi_request_count_total": MetricLabel("Requests received (counter)", "requests"),
    "tgi_request_success_total": MetricLabel("Requests succeeded (counter)", "requests"),
    "ollama.MODEL.size_vram_bytes": MetricLabel("MODEL in VRAM", "GiB", 1 / _GIB),
    "ollama.MODEL.size_bytes": MetricLabel("MODEL loaded size", "GiB", 1 / _GIB),
}
_GPU = re.compile(r"^gpu(\d+)\.")
_OLLAMA = re.compile(r"^ollama\.(.+)\.(size_vram_bytes|size_bytes)$")


def _family(key: str) -> str:
    return key.split("{", 1)[0]


def metric_label(key: str) -> MetricLabel:
    """The title, unit and scale of a sampled metric key (``gpu0.power_w`` -> "GPU 0
    power", W); a family without a known name keeps its raw name."""
    family = _family(key)
    if m := _GPU.match(family):
        known = _LABELS.get(_GPU.sub("gpuN.", family))
        if known:
            return MetricLabel(
                known.title.replace(" N ", f" {m.group(1)} "), known.unit, known.scale
            )
    if m := _OLLAMA.match(family):
        known = _LABELS[f"ollama.MODEL.{m.group(2)}"]
        return MetricLabel(known.title.replace("MODEL", m.group(1)), known.unit, known.scale)
    unit = "bytes" if family.endswith("_bytes") else ""
    return _LABELS.get(family, MetricLabel(family, unit))


def series_label(result: BenchResult, name: str) -> str:
    """A sampler's name as a reader knows it: ``metrics@host:port`` -> the endpoint's name
    and kind; ``host`` -> "this host"; ``nvml`` -> "GPUs (NVML)"."""
    if name == "host":
        return "this host"
    if name == "nvml":
        return "GPUs (NVML)"
    _, _, netloc = name.partition("@")
    for ep in result.metadata.endpoints:
        if netloc and urlsplit(ep.get("url", "")).netloc == netloc:
            return f"{ep.get('name') or netloc} ({ep.get('kind')})"
    return name


# -- helpers -------------------------------------------------------------------------------------


def _plain_y(ax: Axes) -> None:
    # No "1e9" offset text above the axis: units are in the label.
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)


def _log_if_spread(ax: Axes, values: Sequence[float], axis: str) -> bool:
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if len(positive) < 2 or max(positive) / min(positive) < _LOG_SPREAD:
        return False
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    which = ax.xaxis if axis == "x" else ax.yaxis
    # Ticks at 1, 2 and 5 per decade (fewer over a wider range), written as plain numbers;
    # minor ticks unlabelled.
    decades = math.log10(max(positive) / min(positive))
    subs = (1.0, 2.0, 5.0) if decades <= 1.6 else (1.0, 3.0) if decades <= 2.6 else (1.0,)
    which.set_major_locator(LogLocator(base=10, subs=subs))
    which.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.6g}"))
    which.set_minor_formatter(NullFormatter())
    return True


def _ok_by_phase(result: BenchResult) -> dict[str, list[RequestRecord]]:
    out: dict[str, list[RequestRecord]] = {p.name: [] for p in result.phases}
    for r in result.requests:
        if r.ok and r.phase in out:
            out[r.phase].append(r)
    return out


def _cdf(ax: Axes, values: Sequence[float], label: str) -> None:
    xs = np.sort(np.asarray(values, dtype=float))
    ys = np.arange(1, xs.size + 1) / xs.size
    if xs.size > _MAX_CDF_POINTS:
        keep = np.unique(np.linspace(0, xs.size - 1, _MAX_CDF_POINTS).astype(int))
        xs, ys = xs[keep], ys[keep]
    ax.step(xs, ys, where="post", label=label, linewidth=1.2)


def _load_of(p: PhaseResult) -> float:
    return float((p.concurrency if p.mode == "closed" else p.requested_rate) or 0)


def _pct(st: Any, pct: str) -> float:
    return float("nan") if st is None else float(getattr(st, pct))


def _short(url: str) -> str:
    return url.split("://", 1)[-1]


def _shade_phases(ax: Axes, result: BenchResult, t0: int) -> None:
    """Alternate shading per phase, each named above the axes where its span is wide enough."""
    from matplotlib.transforms import blended_transform_factory

    spans = [((p.t_start_ns - t0) / 1e9, (p.t_end_ns - t0) / 1e9, p.name) for p in result.phases]
    if not spans:
        return
    total = max(b for _, b, _ in spans) - min(a for a, _, _ in spans)
    on_top = blended_transform_factory(ax.transData, ax.transAxes)
    named = False
    for i, (a, b, name) in enumerate(spans):
        ax.axvspan(a, b, color="C0" if i % 2 else "C1", alpha=0.07, linewidth=0)
        if total > 0 and (b - a) / total >= 0.04 * max(1, len(name) / 6):
            ax.text(
                (a + b) / 2, 1.01, name, transform=on_top, fontsize=7, ha="center", va="bottom",
                color="#555",
            )  # fmt: skip
            named = True
    if named and ax.get_title():
        ax.set_title(ax.get_title(), fontsize=10, pad=13)  # above the phase names


# -- the plots -----------------------------------------------------------------------------------

_CDF_METRICS: tuple[tuple[str, Callable[[RequestRecord], float | None]], ...] = (
    ("TTFT", lambda r: r.ttft_ms),
    ("TPOT", lambda r: r.tpot_ms),
    ("E2E latency", lambda r: r.e2e_ms),
)


def _latency_cdfs(result: BenchResult) -> Plot | None:
    by_phase = _ok_by_phase(result)
    if not any(by_phase.values()):
        return None

    def draw(fig: FigureBase) -> None:
        axes = fig.subplots(1, 3, squeeze=False)[0]
        for ax, (name, get) in zip(axes, _CDF_METRICS, strict=True):
            every: list[float] = []
            for phase, reqs in by_phase.items():
                values = [v for r in reqs if (v := get(r)) is not None]
                if values:
                    _cdf(ax, values, phase)
                    every += values
            log = _log_if_spread(ax, every, "x")
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("ms (log scale)" if log else "ms")
            ax.set_ylabel("fraction of requests")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, title="phase", title_fontsize=7, loc="lower right")

    return Plot("Latency distributions (completed requests)", 3.2, draw)


def _versus_load(result: BenchResult, mode: str) -> Plot | None:
    phases = sorted(
        (p for p in result.phases if p.mode == mode and p.summary.completed), key=_load_of
    )
    if len(phases) < 2:
        return None
    xs = [_load_of(p) for p in phases]
    x_label = "concurrency (requests in flight)" if mode == "closed" else "requested rate (req/s)"

    def draw(fig: FigureBase) -> None:
        left, right = fig.subplots(1, 2, squeeze=False)[0]
        tok = left.plot(
            xs, [p.summary.output_throughput for p in phases], "o-", label="output tok/s"
        )
        left.set_ylabel("output tokens / s")
        left.set_ylim(bottom=0)
        twin = left.twinx()
        req = twin.plot(
            xs, [p.summary.request_throughput for p in phases], "s--", color="C1", label="req/s"
        )
        twin.set_ylabel("requests / s")
        twin.set_ylim(bottom=0)
        left.legend(handles=tok + req, loc="upper left", fontsize=7)
        left.set_title("Throughput", fontsize=10)
        every: list[float] = []
        for name, attr in (("TTFT", "ttft_ms"), ("E2E", "e2e_ms")):
            for pct, style in (("p50", "o-"), ("p99", "x:")):
                ys = [_pct(getattr(p.summary, attr), pct) for p in phases]
                right.plot(xs, ys, style, label=f"{name} {pct}")
                every += ys
        log = _log_if_spread(right, every, "y")
        right.set_ylabel("ms (log scale)" if log else "ms")
        right.set_title("Latency percentiles", fontsize=10)
        right.legend(fontsize=7, loc="upper left")
        for ax in (left, right):
            ax.set_xlabel(x_label)
            ax.grid(alpha=0.3)
            if mode == "closed":
                ax.set_xscale("log", base=2)
                from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

                ax.xaxis.set_major_locator(FixedLocator(xs))
                ax.xaxis.set_minor_locator(NullLocator())
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))

    title = "Throughput and latency vs " + ("concurrency" if mode == "closed" else "request rate")
    return Plot(title, 3.4, draw)


def _per_endpoint(result: BenchResult) -> Plot | None:
    eps = result.summary.per_endpoint
    if len(eps) < 2:
        return None
    names = list(eps)
    labels = {e["url"]: e.get("name") or e["url"] for e in result.metadata.endpoints}
    bars = (
        ("TTFT p50", "ttft_ms", "p50"),
        ("TTFT p99", "ttft_ms", "p99"),
        ("E2E p50", "e2e_ms", "p50"),
        ("E2E p99", "e2e_ms", "p99"),
    )

    def draw(fig: FigureBase) -> None:
        lat, thr = fig.subplots(1, 2, squeeze=False)[0]
        x = np.arange(len(names))
        width = 0.2
        for i, (label, attr, pct) in enumerate(bars):
            ys = [_pct(getattr(eps[n], attr), pct) for n in names]
            lat.bar(x + (i - 1.5) * width, ys, width, label=label)
        thr.bar(x, [eps[n].output_throughput for n in names], 0.5, color="C2")
        lat.set_title("Latency by endpoint", fontsize=10)
        lat.set_ylabel("ms")
        lat.legend(fontsize=7)
        thr.set_title("Output throughput by endpoint", fontsize=10)
        thr.set_ylabel("output tokens / s")
        for ax in (lat, thr):
            ax.set_xlabel("endpoint")
            ax.set_xticks(x, [labels.get(n, _short(n)) for n in names], fontsize=8)
            ax.grid(alpha=0.3, axis="y")

    return Plot("Per-endpoint comparison (all phases)", 3.2, draw)


def _in_flight(result: BenchResult) -> Plot | None:
    if not result.requests:
        return None
    t0 = result.metadata.monotonic_origin_ns
    events = sorted(
        [(r.t_start_ns, 1) for r in result.requests] + [(r.t_end_ns, -1) for r in result.requests]
    )
    times = np.array([(t - t0) / 1e9 for t, _ in events])
    level = np.cumsum([d for _, d in events])

    def draw(fig: FigureBase) -> None:
        (ax,) = fig.subplots(1, 1, squeeze=False)[0]
        ax.step(times, level, where="post", linewidth=0.8)
        ax.set_ylabel("requests in flight")
        ax.set_xlabel("seconds since start")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        _shade_phases(ax, result, t0)

    return Plot("Requests in flight", 2.6, draw)


def _timeline(
    result: BenchResult, series: Series, keys: Sequence[str], title: str, *, rates: bool = False
) -> Plot | None:
    """One panel per metric family of ``keys``, a line per label set; ``rates`` plots the
    per-second increase of counters instead of their value."""
    families: dict[str, list[str]] = {}
    for key in keys:
        if sum(v is not None for v in series.values[key]) >= 2:
            families.setdefault(_family(key), []).append(key)
    if not families or len(series.times_ns) < 2:
        return None
    t0 = result.metadata.monotonic_origin_ns
    times = np.array([(t - t0) / 1e9 for t in series.times_ns])

    def draw(fig: FigureBase) -> None:
        axes = fig.subplots(1, len(families), squeeze=False)[0]
        for ax, (family, members) in zip(axes, families.items(), strict=True):
            label = metric_label(members[0])
            for key in members:
                ys = np.array(
                    [np.nan if v is None else v * label.scale for v in series.values[key]],
                    dtype=float,
                )
                xs = times
                if rates:
                    xs, ys = _rate(times, ys, series.interval_s)
                tag = key[len(family) :].strip("{}") if len(members) > 1 else None
                ax.plot(xs, ys, linewidth=1, label=tag)
            name = label.title.replace(" (counter)", "")
            ax.set_title(f"{name} per second" if rates else name, fontsize=10)
            ax.set_ylabel(f"{label.unit} / s" if rates else label.unit)
            ax.set_xlabel("seconds since start")
            ax.set_ylim(bottom=0)
            if label.unit == "%":
                ax.set_ylim(0, 105)
            elif label.unit == "requests":
                from matplotlib.ticker import MaxNLocator

                # Whole requests; an idle gauge (all zeros) still gets a 0..1 axis.
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
            _plain_y(ax)
            if len(members) > 1:
                ax.legend(fontsize=6)
            ax.grid(alpha=0.3)
            _shade_phases(ax, result, t0)

    return Plot(title, 2.8, draw)


def _rate(times: np.ndarray, counter: np.ndarray, interval_s: float | None) -> Any:
    """Per-second increase of a counter between readings at least half a cadence apart: a
    phase-boundary reading a few milliseconds after another would make a spike of noise."""
    ok = ~np.isnan(counter)
    t, v = times[ok], counter[ok]
    if t.size < 2:
        return t[:0], v[:0]
    gap = 0.5 * (interval_s or float(np.median(np.diff(t))))
    keep = [0]
    for i in range(1, t.size):
        if t[i] - t[keep[-1]] >= gap:
            keep.append(i)
    t, v = t[keep], v[keep]
    return t[1:], np.diff(v) / np.diff(t)


#: Server gauges worth a timeline: requests running and waiting, batch, KV cache, VRAM.
_SERVER_GAUGES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "llamacpp:requests_processing",
    "llamacpp:requests_deferred",
    "llamacpp:kv_cache_usage_ratio",
    "tgi_queue_size",
    "tgi_batch_current_size",
)
#: Server counters shown as a rate: tokens generated per second.
_SERVER_RATES = ("vllm:generation_tokens_total", "llamacpp:tokens_predicted_total")


def _server_plots(result: BenchResult, s: Series) -> list[Plot]:
    who = series_label(result, s.name)
    gauges = [k for k in s.values if _family(k) in _SERVER_GAUGES]
    gauges += [k for k in s.values if _OLLAMA.match(k) and k.endswith("size_vram_bytes")]
    out = [_timeline(result, s, gauges[:6], f"Server {who}: queue and batch over time")]
    counters = [k for k in s.values if _family(k) in _SERVER_RATES]
    out.append(_timeline(result, s, counters, f"Server {who}: generation rate", rates=True))
    return [p for p in out if p is not None]


def _timelines(result: BenchResult) -> list[Plot]:
    out: list[Plot | None] = []
    for s in result.samples:
        if not s.available:
            continue
        if s.name.startswith(("metrics@", "ollama-ps@")):
            out += _server_plots(result, s)
            continue
        gpus = sorted({m.group(1) for k in s.values if (m := _GPU.match(k))}, key=int)
        for gpu in gpus:
            keys = [f"gpu{gpu}.{m}" for m in ("util_pct", "power_w", "mem_used_bytes")]
            keys = [k for k in keys if k in s.values]
            out.append(_timeline(result, s, keys, f"GPU {gpu} over time"))
        host = [k for k in ("host.cpu_pct", "host.proc_cpu_pct") if k in s.values]
        if host:
            out.append(_timeline(result, s, host, "Host and bench process CPU over time"))
    return [p for p in out if p is not None]


def plots(result: BenchResult) -> list[Plot]:
    """Every plot the result has data for, in report order."""
    fixed = [
        _latency_cdfs(result),
        _versus_load(result, "closed"),
        _versus_load(result, "open"),
        _per_endpoint(result),
        _in_flight(result),
    ]
    return [p for p in fixed if p is not None] + _timelines(result)


def all_plots(result: BenchResult) -> list[tuple[str, str]]:
    """(title, SVG) of every plot the result has data for, in report order."""
    return [(p.title, p.svg()) for p in plots(result)]
