"""Plots for the HTML report, each returned as standalone SVG text (matplotlib, Agg backend).

Latency CDFs, throughput and latency against load, per-endpoint comparison, in-flight
requests, host CPU and GPU utilisation/power over time. A figure with no data is None.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .result import BenchResult, PhaseResult, RequestRecord, Series

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["all_plots"]

_MAX_CDF_POINTS = 400  # keeps each inline SVG small whatever the request count


def _figure(ncols: int, height: float = 3.2) -> tuple[Figure, list[Axes]]:
    # A bare Figure renders through its own canvas: no pyplot, no global backend switch.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _svg(fig: Figure) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text: small and sharp
        fig.savefig(buf, format="svg")
    return buf.getvalue()


def _cdf(ax: Axes, values: Sequence[float], label: str) -> None:
    xs = np.sort(np.asarray(values, dtype=float))
    ys = np.arange(1, xs.size + 1) / xs.size
    if xs.size > _MAX_CDF_POINTS:
        keep = np.unique(np.linspace(0, xs.size - 1, _MAX_CDF_POINTS).astype(int))
        xs, ys = xs[keep], ys[keep]
    ax.step(xs, ys, where="post", label=label, linewidth=1.2)


def latency_cdfs(result: BenchResult) -> str | None:
    """TTFT, TPOT and E2E CDFs, one line per phase."""
    metrics: tuple[tuple[str, Callable[[RequestRecord], float | None]], ...] = (
        ("TTFT (ms)", lambda r: r.ttft_ms),
        ("TPOT (ms)", lambda r: r.tpot_ms),
        ("E2E latency (ms)", lambda r: r.e2e_ms),
    )
    by_phase = _ok_by_phase(result)
    if not any(by_phase.values()):
        return None
    fig, axes = _figure(3)
    for ax, (title, get) in zip(axes, metrics, strict=True):
        for phase, reqs in by_phase.items():
            values = [v for r in reqs if (v := get(r)) is not None]
            if values:
                _cdf(ax, values, phase)
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _svg(fig)


def _ok_by_phase(result: BenchResult) -> dict[str, list[RequestRecord]]:
    out: dict[str, list[RequestRecord]] = {p.name: [] for p in result.phases}
    for r in result.requests:
        if r.ok and r.phase in out:
            out[r.phase].append(r)
    return out


def versus_load(result: BenchResult, mode: str) -> str | None:
    """Throughput and latency percentiles against concurrency (closed) or rate (open)."""
    phases = [p for p in result.phases if p.mode == mode and p.summary.completed]
    if len(phases) < 2:
        return None
    phases.sort(key=_load_of)
    xs = [_load_of(p) for p in phases]
    fig, (left, right) = _figure(2)
    left.plot(xs, [p.summary.output_throughput for p in phases], "o-", label="output tok/s")
    left.set_ylabel("output tokens / s")
    twin = left.twinx()
    twin.plot(
        xs, [p.summary.request_throughput for p in phases], "s--", color="C1", label="requests/s"
    )
    twin.set_ylabel("requests / s")
    left.legend(loc="upper left", fontsize=7)
    twin.legend(loc="lower right", fontsize=7)
    for name, attr in (("TTFT", "ttft_ms"), ("E2E", "e2e_ms")):
        for pct, style in (("p50", "o-"), ("p99", "x:")):
            ys = [_pct(getattr(p.summary, attr), pct) for p in phases]
            right.plot(xs, ys, style, label=f"{name} {pct}")
    right.set_ylabel("ms")
    right.legend(fontsize=7)
    label = "concurrency" if mode == "closed" else "requested rate (req/s)"
    for ax in (left, right):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        if mode == "closed":
            ax.set_xscale("log", base=2)
    return _svg(fig)


def _load_of(p: PhaseResult) -> float:
    return float((p.concurrency if p.mode == "closed" else p.requested_rate) or 0)


def _pct(st: Any, pct: str) -> float:
    return float("nan") if st is None else float(getattr(st, pct))


def per_endpoint(result: BenchResult) -> str | None:
    """p50/p99 TTFT and E2E and output throughput per endpoint (all phases)."""
    eps = result.summary.per_endpoint
    if len(eps) < 2:
        return None
    names = list(eps)
    labels = {e["url"]: e.get("name") or e["url"] for e in result.metadata.endpoints}
    fig, (lat, thr) = _figure(2)
    x = np.arange(len(names))
    width = 0.2
    bars = (
        ("TTFT p50", "ttft_ms", "p50"),
        ("TTFT p99", "ttft_ms", "p99"),
        ("E2E p50", "e2e_ms", "p50"),
        ("E2E p99", "e2e_ms", "p99"),
    )
    for i, (label, attr, pct) in enumerate(bars):
        lat.bar(
            x + (i - 1.5) * width,
            [_pct(getattr(eps[n], attr), pct) for n in names],
            width,
            label=label,
        )
    thr.bar(x, [eps[n].output_throughput for n in names], 0.5, color="C2")
    thr.set_ylabel("output tokens / s")
    lat.set_ylabel("ms")
    lat.legend(fontsize=7)
    for ax in (lat, thr):
        ax.set_xticks(x, [labels.get(n, _short(n)) for n in names], fontsize=7, rotation=15)
        ax.grid(alpha=0.3, axis="y")
    return _svg(fig)


def _short(url: str) -> str:
    return url.split("://", 1)[-1]


def _shade_phases(ax: Axes, result: BenchResult, t0: int) -> None:
    for i, p in enumerate(result.phases):
        a, b = (p.t_start_ns - t0) / 1e9, (p.t_end_ns - t0) / 1e9
        ax.axvspan(a, b, color="C0" if i % 2 else "C1", alpha=0.06)
        ax.text(a, 1.0, p.name, transform=ax.get_xaxis_transform(), fontsize=6, va="bottom")


def in_flight(result: BenchResult) -> str | None:
    """Requests in flight over time (from the records' start and end), phases shaded."""
    if not result.requests:
        return None
    t0 = result.metadata.monotonic_origin_ns
    events = sorted(
        [(r.t_start_ns, 1) for r in result.requests] + [(r.t_end_ns, -1) for r in result.requests]
    )
    times = np.array([(t - t0) / 1e9 for t, _ in events])
    level = np.cumsum([d for _, d in events])
    fig, (ax,) = _figure(1, 2.6)
    fig.set_figwidth(12.6)
    ax.step(times, level, where="post", linewidth=0.8)
    ax.set_ylabel("requests in flight")
    ax.set_xlabel("seconds since start")
    ax.grid(alpha=0.3)
    _shade_phases(ax, result, t0)
    return _svg(fig)


def _series_plot(
    result: BenchResult, series: Series, keys: Sequence[tuple[str, str]], title: str
) -> str | None:
    present = [(k, label) for k, label in keys if any(v is not None for v in series.values[k])]
    if not present or len(series.times_ns) < 2:
        return None
    t0 = result.metadata.monotonic_origin_ns
    fig, axes = _figure(len(present), 2.6)
    times = np.array([(t - t0) / 1e9 for t in series.times_ns])
    for ax, (key, label) in zip(axes, present, strict=True):
        ys = np.array([np.nan if v is None else v for v in series.values[key]], dtype=float)
        ax.plot(times, ys, linewidth=1)
        ax.set_title(f"{title}: {key.split('{', 1)[0]}", fontsize=8)
        ax.set_ylabel(label)
        ax.set_xlabel("seconds since start")
        ax.grid(alpha=0.3)
        _shade_phases(ax, result, t0)
    return _svg(fig)


#: Server gauges worth a timeline: running and waiting requests, batch and KV-cache use.
_SERVER_GAUGES = (
    "num_requests_running",
    "num_requests_waiting",
    "queue_size",
    "batch_current_size",
    "kv_cache_usage",
    "size_vram",
)


def _server_keys(s: Series) -> list[tuple[str, str]]:
    keys = [k for k in s.values if any(g in k for g in _SERVER_GAUGES)]
    return [(k, "bytes" if "bytes" in k else "") for k in keys[:3]]


def timelines(result: BenchResult) -> list[tuple[str, str]]:
    """GPU utilisation/power/memory, host CPU and server gauges over time, where sampled."""
    out: list[tuple[str, str]] = []
    for s in result.samples:
        if not s.available:
            continue
        if s.name.startswith(("metrics@", "ollama-ps@")):
            if svg := _series_plot(result, s, _server_keys(s), s.name):
                out.append((f"Server {s.name} over time", svg))
            continue
        gpus = sorted({k.split(".", 1)[0] for k in s.values if k.startswith("gpu")})
        for gpu in gpus:
            keys = [
                (f"{gpu}.util_pct", "%"),
                (f"{gpu}.power_w", "W"),
                (f"{gpu}.mem_used_bytes", "bytes"),
            ]
            keys = [k for k in keys if k[0] in s.values]
            if svg := _series_plot(result, s, keys, gpu.upper()):
                out.append((f"{gpu.upper()} over time", svg))
        host = [(k, "%") for k in ("host.cpu_pct", "host.proc_cpu_pct") if k in s.values]
        if host and (svg := _series_plot(result, s, host, "host")):
            out.append(("Host CPU over time", svg))
    return out


def all_plots(result: BenchResult) -> list[tuple[str, str]]:
    """(title, SVG) of every plot the result has data for, in report order."""
    plots: list[tuple[str, str | None]] = [
        ("Latency CDFs (completed requests)", latency_cdfs(result)),
        ("Throughput and latency vs concurrency", versus_load(result, "closed")),
        ("Throughput and latency vs request rate", versus_load(result, "open")),
        ("Per-endpoint comparison (all phases)", per_endpoint(result)),
        ("Requests in flight", in_flight(result)),
    ]
    done = [(title, svg) for title, svg in plots if svg is not None]
    return done + timelines(result)
