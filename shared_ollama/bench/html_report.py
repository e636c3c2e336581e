"""The self-contained HTML report: warnings, findings, tables and inline plots; no script, no
external file.

Plots are SVG embedded as base64 data URIs (each image is isolated, so the ids matplotlib
writes cannot collide); styles are inline. Every table sits in a box that scrolls rather
than widening the page, and long names (metric keys, URLs) may break anywhere.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from html import escape
from pathlib import Path

from .capacity import answer_text, capacity_notes, capacity_table
from .findings import findings
from .plots import metric_label, plots, series_label
from .report import (
    CACHE_COLUMNS,
    ENDPOINT_COLUMNS,
    PHASE_COLUMNS,
    cache_rows,
    cost_basis,
    efficiency_table,
    endpoint_rows,
    fmt,
    headroom_table,
    phase_rows,
    sampling_line,
)
from .result import BenchResult, Series

__all__ = ["render_html", "write_html"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1320px;padding:0 16px;color:#1d2330}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid
#dde;padding-bottom:4px}h3{font-size:14px;margin:18px 0 4px}
.tbl{max-width:100%;overflow-x:auto;margin:6px 0 12px}
table{border-collapse:collapse;font-size:13px}
th,td{padding:3px 8px;border-bottom:1px solid #eef;text-align:right;vertical-align:top}
td{white-space:nowrap}th{background:#f4f6fb;font-weight:600}
td:first-child,th:first-child{text-align:left}
td.text,th.text,.meta td{white-space:normal;overflow-wrap:anywhere;text-align:left}
.meta td:first-child{white-space:nowrap;font-weight:600}
code,.key{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;overflow-wrap:anywhere;
color:#556}
.banner{background:#fff3cd;border:1px solid #e6c200;padding:8px;margin:8px 0}
.warn{background:#fde8e8;border:1px solid #d33;padding:8px 12px;margin:10px 0}
.warn h2{border:0;margin:0 0 4px;color:#a11}.warn ul{margin:0;padding-left:20px}
.findings li{margin:3px 0}.muted{color:#667}
img{max-width:100%;height:auto;display:block;margin:6px 0}
pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:12px;white-space:pre-wrap}
dt{font-weight:600}dd{margin:0 0 6px 16px}details{margin:4px 0 10px}
summary{cursor:pointer}
"""


def _table(
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    cls: str = "",
    text_cols: Sequence[int] = (),
) -> str:
    """A table in a scrolling box; ``text_cols`` may wrap (names, not numbers)."""
    head = "".join(
        f'<th class="text">{escape(str(c))}</th>'
        if i in text_cols
        else f"<th>{escape(str(c))}</th>"
        for i, c in enumerate(columns)
    )
    thead = f"<thead><tr>{head}</tr></thead>" if any(columns) else ""
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="text">{escape(str(v))}</td>'
            if i in text_cols
            else f"<td>{escape(str(v))}</td>"
            for i, v in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    attr = f' class="{cls}"' if cls else ""
    return f'<div class="tbl"><table{attr}>{thead}<tbody>{body}</tbody></table></div>'


def _img(title: str, svg: str) -> str:
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return f'<h3>{escape(title)}</h3><img alt="{escape(title)}" src="data:image/svg+xml;base64,{data}">'  # noqa: E501


def _metadata(result: BenchResult) -> str:
    m = result.metadata
    rows: list[tuple[str, str]] = [
        ("started", m.started_at),
        ("wall time", f"{m.wall_duration_s:.1f} s"),
        ("seed", str(m.seed)),
        ("endpoints", ", ".join(f"{e['url']} ({e['kind']})" for e in m.endpoints)),
        (
            "host",
            f"{m.host.get('hostname', '?')}: {m.host.get('platform', '')}, "
            f"{m.host.get('cpu_count_logical', '?')} CPUs",
        ),
        ("GPUs", ", ".join(str(g.get("name")) for g in m.gpus) or "none seen"),
        ("versions", ", ".join(f"{k} {v}" for k, v in m.versions.items())),
        ("SLOs", ", ".join(f"{k} <= {v:g}" for k, v in result.slo.items()) or "none"),
    ]
    if (sampling := sampling_line(result)) is not None:
        rows.append(("samplers", sampling.removeprefix("samplers: ")))
    if (basis := cost_basis(result)) is not None:
        rows.append(("cost", basis.removeprefix("cost at ")))
    return _table(("", ""), rows, "meta")


def _warnings(result: BenchResult) -> str:
    items = "".join(
        f"<li><b>{escape(p.name)}</b>: {escape(w)}</li>" for p in result.phases for w in p.warnings
    )
    if not items:
        return ""
    return f'<div class="warn"><h2>Warnings</h2><ul>{items}</ul></div>'


def _findings(result: BenchResult) -> str:
    items = "".join(f"<li>{escape(line)}</li>" for line in findings(result))
    return f'<h2>Findings</h2><ul class="findings">{items}</ul>' if items else ""


def _capacity(result: BenchResult) -> str:
    """``bench capacity``'s search: every probe and the answer (none for other runs)."""
    cap = result.capacity
    if cap is None:
        return ""
    title, columns, rows, _ = capacity_table(cap)
    note = "".join(f'<p class="muted">{escape(n)}</p>' for n in capacity_notes(cap))
    return (
        f"<h2>{escape(title)}</h2>{_table(columns, rows)}{note}"
        f"<p><b>{escape(answer_text(cap))}</b></p>"
    )


def _phases(result: BenchResult) -> str:
    parts = [f"<h2>Phases</h2>{_table(PHASE_COLUMNS, phase_rows(result), text_cols=(0,))}"]
    if any(p.warnings for p in result.phases):
        parts.append('<p class="muted">(!): the phase has warnings (above).</p>')
    if (cache := cache_rows(result)) is not None:
        table = _table(CACHE_COLUMNS, cache, text_cols=(0, 7))
        parts.append(f"<h3>Prefix cache and routing</h3>{table}")
    if (eff := efficiency_table(result)) is not None:
        parts.append(f"<h3>Energy and cost</h3>{_table(*eff, text_cols=(0,))}")
        if (basis := cost_basis(result)) is not None:
            parts.append(f'<p class="muted">{escape(basis)}</p>')
    if (room := headroom_table(result)) is not None:
        parts.append(f"<h3>SLO headroom at p99</h3>{_table(*room, text_cols=(0,))}")
        parts.append(
            '<p class="muted">Headroom: 1 - p99 / limit; negative means over the limit.</p>'
        )
    return "".join(parts)


def _breakdowns(result: BenchResult) -> str:
    s = result.summary
    parts = []
    if len(s.per_endpoint) > 0:
        parts.append("<h2>Endpoints (all phases)</h2>")
        parts.append(_table(ENDPOINT_COLUMNS, endpoint_rows(result, s), text_cols=(0,)))
    errors = [(k, v) for k, v in s.errors_by_type.items()]
    parts.append("<h2>Errors and retries</h2>")
    parts.append(
        _table(("error type", "count"), errors, text_cols=(0,))
        if errors
        else "<p>No failed calls.</p>"
    )
    parts.append(
        f"<p>Retries: {s.retries} over {s.retried_requests} requests; cancelled: {s.cancelled}.</p>"
    )
    if s.server:
        rows = [
            (k, v.count, fmt(v.mean, 2), fmt(v.p50, 2), fmt(v.p90, 2), fmt(v.p99, 2))
            for k, v in s.server.items()
        ]
        parts.append("<h2>Server-reported timings (ms)</h2>")
        parts.append(_table(("timing", "n", "mean", "p50", "p90", "p99"), rows))
    return "".join(parts)


def _metric_rows(result: BenchResult, s: Series) -> str:
    summary = result.sample_summary.get(s.name, {})
    rows = []
    for key, stats in summary.items():
        label = metric_label(key)
        cells = [fmt(stats[k] * label.scale if k in stats else None, 2) for k in _STATS]
        rows.append(
            f'<tr><td class="text">{escape(label.title)}<br><span class="key">{escape(key)}'
            f"</span></td><td>{escape(label.unit)}</td>"
            + "".join(f"<td>{escape(c)}</td>" for c in cells)
            + "</tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in ("metric", "unit", *_STATS))
    return f'<div class="tbl"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'  # noqa: E501


_STATS = ("mean", "min", "max", "last")


def _samplers(result: BenchResult) -> str:
    if not result.samples:
        return ""
    rows = []
    for s in result.samples:
        state = "ok" if s.available else (s.reason or "unavailable")
        every = "-" if s.interval_s is None else f"{s.interval_s:g} s"
        rows.append((series_label(result, s.name), state, every, len(s.times_ns), s.errors))
    parts = ["<h2>Samplers</h2>"]
    if (sampling := sampling_line(result)) is not None:
        parts.append(f"<p>{escape(sampling[0].upper() + sampling[1:])}.</p>")
    parts.append(
        _table(("sampler", "state", "every", "readings", "errors"), rows, text_cols=(0, 1))
    )
    for s in result.samples:
        if s.available and result.sample_summary.get(s.name):
            title = escape(series_label(result, s.name))
            rows_html = _metric_rows(result, s)
            parts.append(f"<details><summary>{title}: every metric</summary>{rows_html}</details>")
    if result.summary.energy_j is not None:
        per_j = fmt(result.summary.tokens_per_joule, 3)
        parts.append(
            f"<p>GPU energy: {result.summary.energy_j:.0f} J; {per_j} output tokens/J.</p>"
        )
    return "".join(parts)


def _definitions(result: BenchResult) -> str:
    items = "".join(
        f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in result.definitions.items()
    )
    return f"<h2>How each figure is computed</h2><dl>{items}</dl>"


def render_html(result: BenchResult) -> str:
    """The whole report as one HTML string."""
    m = result.metadata
    name = str(m.scenario.get("name", "bench"))
    banner = ""
    if m.interrupted:
        banner = '<div class="banner">Interrupted: the figures cover what was measured.</div>'
    if m.simulate:
        banner += '<div class="banner">Simulated pool (FakeEngines), not real servers.</div>'
    notes = "".join(f"<li>{escape(n)}</li>" for n in m.notes)
    images = "".join(_img(p.title, p.svg()) for p in plots(result))
    scenario = escape(json.dumps(m.scenario, indent=1))
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>bench: {escape(name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>shared_ollama bench: {escape(name)}</h1>"
        f'<p class="muted">{len(result.requests)} requests, schema v{result.schema_version}</p>'
        f"{banner}{_warnings(result)}{_metadata(result)}{_findings(result)}{_capacity(result)}"
        f"{_phases(result)}"
        f"<h2>Plots</h2>{images or '<p>No completed requests to plot.</p>'}"
        f"{_breakdowns(result)}{_samplers(result)}"
        f"{'<h2>Notes</h2><ul>' + notes + '</ul>' if notes else ''}"
        f"{_definitions(result)}<h2>Scenario</h2><pre>{scenario}</pre></body></html>"
    )


def write_html(result: BenchResult, path: str | Path) -> Path:
    """Write the report and return its path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(result), encoding="utf-8")
    return out
