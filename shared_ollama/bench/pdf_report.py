"""The PDF report (matplotlib's PDF backend, A4 landscape): warnings, findings and the run's
facts first, then the tables sized to the page's width, then the plots two to a page.

Everything comes from the same functions as the terminal and HTML reports (``report``,
``findings``, ``plots``); nothing but matplotlib is needed.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .capacity import answer_text, capacity_notes, capacity_table
from .findings import findings
from .plots import Plot, plots, series_label
from .report import (
    ENDPOINT_COLUMNS,
    PHASE_COLUMNS,
    cost_basis,
    efficiency_table,
    endpoint_rows,
    headroom_table,
    phase_rows,
    sampling_line,
    warning_lines,
)
from .result import BenchResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PAGE_IN", "pdf_pages", "write_pdf"]

#: A4 landscape, in inches.
PAGE_IN = (11.69, 8.27)
_MARGIN_IN = 0.45
_MAX_FONT_PT = 8.0
_MIN_FONT_PT = 4.5
# Average glyph width of matplotlib's default sans-serif as a share of the font size, with a
# little room: enough to size columns without a renderer.
_CHAR_EM = 0.6
_ROWS_PER_BLOCK = 30
# A heading needs this much room below it (a few table rows) or it moves to the next page.
_KEEP_WITH_NEXT_IN = 1.3
# Room for a plot's title on a page of plots.
_PLOT_TITLE_IN = 0.3


class _Flow:
    """Blocks of text and tables laid out top to bottom, a new page when one is full."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.pages: list[Figure] = []
        self._y = 0.0  # inches from the top already used on the current page

    def _footer(self, fig: Figure) -> None:
        """The page's title and number, bottom right."""
        fig.text(
            1 - _MARGIN_IN / PAGE_IN[0],
            _MARGIN_IN / 2 / PAGE_IN[1],
            f"{self.title} - page {len(self.pages) + 1}",
            ha="right",
            fontsize=7,
            color="#667",
        )

    def _page(self) -> Figure:
        from matplotlib.figure import Figure

        fig = Figure(figsize=PAGE_IN)
        self._footer(fig)
        self.pages.append(fig)
        self._y = _MARGIN_IN
        return fig

    def _room(self, height_in: float) -> Figure:
        if not self.pages or self._y + height_in > PAGE_IN[1] - _MARGIN_IN:
            return self._page()
        return self.pages[-1]

    def _put_text(self, text: str, size: float, **style: object) -> None:
        height = size / 72 * 1.45 * (text.count("\n") + 1)
        fig = self._room(height)
        fig.text(
            _MARGIN_IN / PAGE_IN[0],
            1 - self._y / PAGE_IN[1],
            text,
            va="top",
            ha="left",
            fontsize=size,
            **style,  # type: ignore[arg-type]
        )
        self._y += height

    def heading(self, text: str, size: float = 12.0, color: str = "#1d2330") -> None:
        """A bold line with a little space above it, kept on the page of what follows it."""
        if self.pages and self._y + _KEEP_WITH_NEXT_IN > PAGE_IN[1] - _MARGIN_IN:
            self._page()
        else:
            self._y += 0.12
        self._put_text(text, size, fontweight="bold", color=color)

    def paragraph(self, lines: Sequence[str], *, bullet: str = "", color: str = "#1d2330") -> None:
        """Lines wrapped to the page's width, each starting with ``bullet``."""
        width = int((PAGE_IN[0] - 2 * _MARGIN_IN) * 72 / (9 * _CHAR_EM * 0.92))
        for line in lines:
            wrapped = textwrap.fill(
                line, width, initial_indent=bullet, subsequent_indent=" " * len(bullet)
            )
            self._put_text(wrapped, 9, color=color)

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """A table whose columns fit the page's width (smaller type when needed), split
        across pages past ``_ROWS_PER_BLOCK`` rows."""
        if not rows:
            self.paragraph(["(none)"])
            return
        for start in range(0, len(rows), _ROWS_PER_BLOCK):
            self._table_block(columns, rows[start : start + _ROWS_PER_BLOCK])

    def _table_block(self, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        from matplotlib.transforms import Bbox

        usable = PAGE_IN[0] - 2 * _MARGIN_IN
        widths = [max([len(r[i]) for r in rows] + [8]) + 2 for i in range(len(columns))]
        heads = [textwrap.fill(c, max(w - 1, 8)) for c, w in zip(columns, widths, strict=True)]
        widths = [
            max(w, max(len(x) for x in h.split("\n")) + 2)
            for w, h in zip(widths, heads, strict=True)
        ]
        size = max(_MIN_FONT_PT, min(_MAX_FONT_PT, usable * 72 / (sum(widths) * _CHAR_EM)))
        total_w = min(usable, sum(widths) * size * _CHAR_EM / 72)
        row_h = size / 72 * 1.8
        head_lines = max(h.count("\n") + 1 for h in heads)
        head_h = row_h * (0.6 + 0.6 * head_lines)
        height = head_h + row_h * len(rows)
        fig = self._room(height)
        top = 1 - self._y / PAGE_IN[1]
        ax = fig.add_axes(
            (
                _MARGIN_IN / PAGE_IN[0],
                top - height / PAGE_IN[1],
                total_w / PAGE_IN[0],
                height / PAGE_IN[1],
            )
        )
        ax.axis("off")
        table = ax.table(
            cellText=[list(r) for r in rows],
            colLabels=heads,
            colWidths=[w / sum(widths) for w in widths],
            cellLoc="right",
            bbox=Bbox.from_bounds(0.0, 0.0, 1.0, 1.0),
        )
        table.auto_set_font_size(False)
        table.set_fontsize(size)
        for (r, c), cell in table.get_celld().items():
            cell.set_edgecolor("#dde")
            cell.set_linewidth(0.4)
            cell.set_height((head_h if r == 0 else row_h) / height)
            if r == 0:
                cell.set_facecolor("#f4f6fb")
                cell.get_text().set_fontweight("bold")
            if c == 0:
                cell.get_text().set_horizontalalignment("left")
                cell.PAD = 0.02
        self._y += height + 0.15

    def plots(self, items: Sequence[Plot]) -> None:
        """Plots stacked on fresh pages, as many as fit each (one at least)."""
        usable = PAGE_IN[1] - 2 * _MARGIN_IN
        page: list[Plot] = []
        for plot in items:
            used = sum(p.height_in + _PLOT_TITLE_IN for p in page)
            if page and used + plot.height_in + _PLOT_TITLE_IN > usable:
                self._plot_page(page)
                page = []
            page.append(plot)
        if page:
            self._plot_page(page)

    def _plot_page(self, items: Sequence[Plot]) -> None:
        from matplotlib.figure import Figure
        from matplotlib.layout_engine import ConstrainedLayoutEngine

        pad = ConstrainedLayoutEngine(w_pad=_MARGIN_IN / 2, h_pad=_MARGIN_IN / 2)
        fig = Figure(figsize=PAGE_IN, layout=pad)
        heights = [p.height_in + _PLOT_TITLE_IN for p in items]
        spare = PAGE_IN[1] - 2 * _MARGIN_IN - sum(heights)
        # A last, empty row takes the page's spare height: plots keep their own heights.
        subs = fig.subfigures(len(items) + 1, 1, height_ratios=[*heights, max(spare, 0.01)])
        assert isinstance(subs, np.ndarray)  # several rows: an array of subfigures
        for sub, plot in zip(subs, items, strict=False):
            sub.suptitle(plot.title, fontsize=11, fontweight="bold", x=0.01, ha="left")
            plot.draw(sub)
        self._footer(fig)
        self.pages.append(fig)
        self._y = PAGE_IN[1]  # the next text or table starts a page of its own


def pdf_pages(result: BenchResult) -> list[Figure]:
    """The report's pages as matplotlib figures (A4 landscape), in order."""
    m = result.metadata
    name = str(m.scenario.get("name", "bench"))
    flow = _Flow(f"shared_ollama bench: {name}")
    flow.heading(f"shared_ollama bench: {name}", 16)
    facts = [
        f"{len(result.requests)} requests in {m.wall_duration_s:.1f} s, started {m.started_at}",
        "endpoints: " + ", ".join(f"{e['url']} ({e['kind']})" for e in m.endpoints),
        f"host: {m.host.get('hostname', '?')}, {m.host.get('cpu_count_logical', '?')} CPUs; "
        f"GPUs: {', '.join(str(g.get('name')) for g in m.gpus) or 'none seen'}",
        "SLOs: " + (", ".join(f"{k} <= {v:g}" for k, v in result.slo.items()) or "none"),
    ]
    facts += [x for x in (sampling_line(result), cost_basis(result)) if x is not None]
    if m.simulate:
        facts.append("Simulated pool (FakeEngines), not real servers.")
    if m.interrupted:
        facts.append("Interrupted: the figures cover what was measured.")
    flow.paragraph(facts)
    if warnings := warning_lines(result):
        flow.heading("Warnings", color="#a11")
        flow.paragraph(warnings, bullet="- ", color="#a11")
    if found := findings(result):
        flow.heading("Findings")
        flow.paragraph(found, bullet="- ")
    if (cap := result.capacity) is not None:
        title, columns, rows, _ = capacity_table(cap)
        flow.heading(title)
        flow.table(columns, rows)
        flow.paragraph([*capacity_notes(cap), answer_text(cap)])
    flow.heading("Phases")
    flow.table(PHASE_COLUMNS, phase_rows(result))
    if (eff := efficiency_table(result)) is not None:
        flow.heading("Energy and cost", 10)
        flow.table(*eff)
    if (room := headroom_table(result)) is not None:
        flow.heading("SLO headroom at p99 (1 - p99 / limit; negative: over)", 10)
        flow.table(*room)
    if len(result.summary.per_endpoint) > 1:
        flow.heading("Endpoints (all phases)", 10)
        flow.table(ENDPOINT_COLUMNS, endpoint_rows(result, result.summary))
    if result.samples:
        flow.heading("Samplers", 10)
        rows = [
            [
                series_label(result, s.name),
                "ok" if s.available else (s.reason or "unavailable")[:60],
                "-" if s.interval_s is None else f"{s.interval_s:g} s",
                str(len(s.times_ns)),
            ]
            for s in result.samples
        ]
        flow.table(("sampler", "state", "every", "readings"), rows)
    flow.plots(plots(result))
    return flow.pages


def write_pdf(result: BenchResult, path: str | Path) -> Path:
    """Write the PDF report and return its path."""
    from matplotlib.backends.backend_pdf import PdfPages

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = str(result.metadata.scenario.get("name", "bench"))
    meta = {"Title": f"shared_ollama bench: {name}", "Creator": "shared_ollama bench"}
    with PdfPages(out, metadata=meta) as pdf:
        for page in pdf_pages(result):
            pdf.savefig(page)
    return out
