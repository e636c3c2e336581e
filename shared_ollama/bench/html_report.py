"""The self-contained HTML report: tables and inline plots, no script, no external file.

Plots are SVG embedded as base64 data URIs (each image is isolated, so the ids matplotlib
writes cannot collide); styles are inline. Opens offline in any browser.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from html import escape
from pathlib import Path

from .plots import all_plots
from .report import ENDPOINT_COLUMNS, PHASE_COLUMNS, endpoint_rows, fmt, phase_rows
from .result import BenchResult

__all__ = ["render_html", "write_html"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1320px;padding:0 16px;color:#1d2330}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid
#dde;padding-bottom:4px}table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{padding:3px 10px;border-bottom:1px solid #eef;text-align:right;white-space:nowrap}
td:last-child{white-space:normal}
th{background:#f4f6fb}td:first-child,th:first-child{text-align:left}
.meta td{text-align:left}.banner{background:#fff3cd;border:1px solid #e6c200;padding:8px;
margin:8px 0}.muted{color:#667}img{max-width:100%;height:auto;display:block;margin:6px 0}
pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:12px}dt{font-weight:600}
dd{margin:0 0 6px 16px}
"""


def _table(columns: Sequence[str], rows: Sequence[Sequence[object]], cls: str = "") -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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
    return _table(("", ""), rows, "meta")


def _breakdowns(result: BenchResult) -> str:
    s = result.summary
    parts = []
    if len(s.per_endpoint) > 0:
        parts.append("<h2>Endpoints (all phases)</h2>")
        parts.append(_table(ENDPOINT_COLUMNS, endpoint_rows(result, s)))
    errors = [(k, v) for k, v in s.errors_by_type.items()]
    parts.append("<h2>Errors and retries</h2>")
    parts.append(_table(("error type", "count"), errors) if errors else "<p>No failed calls.</p>")
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


def _samplers(result: BenchResult) -> str:
    rows = []
    for s in result.samples:
        summary = result.sample_summary.get(s.name, {})
        shown = ", ".join(f"{k} mean {fmt(v.get('mean'), 2)}" for k, v in list(summary.items())[:6])
        state = "ok" if s.available else (s.reason or "unavailable")
        rows.append((s.name, state, len(s.times_ns), shown))
    if not rows:
        return ""
    energy = ""
    if result.summary.energy_j is not None:
        per_j = fmt(result.summary.tokens_per_joule, 3)
        energy = f"<p>GPU energy: {result.summary.energy_j:.0f} J; {per_j} output tokens/J.</p>"
    return "<h2>Samplers</h2>" + _table(("sampler", "state", "readings", "summary"), rows) + energy


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
    plots = "".join(_img(title, svg) for title, svg in all_plots(result))
    scenario = escape(json.dumps(m.scenario, indent=1))
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>bench: {escape(name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>shared_ollama bench: {escape(name)}</h1>"
        f'<p class="muted">{len(result.requests)} requests, schema v{result.schema_version}</p>'
        f"{banner}{_metadata(result)}"
        f"<h2>Phases</h2>{_table(PHASE_COLUMNS, phase_rows(result))}"
        f"<h2>Plots</h2>{plots or '<p>No completed requests to plot.</p>'}"
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
