"""The report: tables that fit the page, readable plot titles and axes, CPU-saturation
warnings, tokens per joule (through a fake ``pynvml``), cost per million tokens, the PDF
export and the findings (knee of the throughput curve, SLO headroom)."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
from rich.console import Console

from shared_ollama.bench.cli import main
from shared_ollama.bench.findings import apply_cost, cpu_warnings, findings, knee, slo_headroom
from shared_ollama.bench.html_report import render_html, write_html
from shared_ollama.bench.metrics import summarize
from shared_ollama.bench.pdf_report import PAGE_IN, pdf_pages, write_pdf
from shared_ollama.bench.plots import metric_label, plots
from shared_ollama.bench.report import print_summary
from shared_ollama.bench.result import BenchResult, PhaseResult, Series, load_result, write_json
from shared_ollama.bench.samplers import SampleSeries
from shared_ollama.bench.samplers import summarize as summarize_series
from shared_ollama.bench.scenario import validate_scenario
from shared_ollama.bench.session import run_scenario
from shared_ollama.testing import FakeEngine

from ._helpers import MS, req
from .test_html import chromium, rich_result
from .test_samplers import FakeNVML, two_gpus

__all__ = ["chromium"]  # the fixture, shared with test_html

S = 1_000_000_000
VLLM_LABELS = "engine=0,model_name=a-model-with-a-rather-long-name-for-the-labels"


def loaded_result() -> BenchResult:
    """``rich_result`` plus a vLLM /metrics series with long keys, a saturated host during
    the second phase, SLOs and a price."""
    result = rich_result()
    times = [int(t * 100 * MS) for t in range(40)]
    names = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    server = Series(
        name="metrics@a:1",
        interval_s=2.0,
        times_ns=times,
        values={
            f"vllm:{n}{{{VLLM_LABELS}}}": [
                float(t % 5) / (10 if "perc" in n else 1) for t in range(40)
            ]
            for n in names
        }
        | {f"vllm:generation_tokens_total{{{VLLM_LABELS}}}": [100.0 * t for t in range(40)]},
    )
    host = result.samples[0]
    # Busy from 2 s on (the second phase): every core.
    host.values["host.cpu_pct"] = [100.0 if t >= 20 else 30.0 for t in range(40)]
    result.samples.insert(1, server)
    result.sample_summary = {
        s.name: summarize_series(SampleSeries.model_validate(s.model_dump()))
        for s in result.samples
    }
    for p in result.phases:
        p.warnings = cpu_warnings(result.samples, p.t_start_ns, p.t_end_ns)
    result.slo = {"ttft_ms": 80.0, "tpot_ms": 15.0}
    return result


# -- CPU saturation ------------------------------------------------------------------------------


def _host(cpu: list[float], proc: list[float] | None = None) -> Series:
    values: dict[str, list[float | None]] = {"host.cpu_pct": list(cpu)}
    if proc is not None:
        values["host.proc_cpu_pct"] = list(proc)
    return Series(name="host", times_ns=[i * S for i in range(len(cpu))], values=values)


def test_a_saturated_host_warns_for_the_phases_it_overlaps() -> None:
    host = _host([20, 20, 99, 100, 100, 30, 30])
    # A reading is the mean since the one before: over 1.5-4.5 s the windows ending at 2 s
    # (half inside), 3 and 4 s were busy, the one ending at 5 s (half inside) was not.
    (warning,) = cpu_warnings([host], int(1.5 * S), int(4.5 * S))
    assert warning.startswith("host CPU saturated: 95% or more for 83% of the phase (mean 88%)")
    assert cpu_warnings([host], 0, int(0.9 * S)) == []  # only the window ending at 1 s: 20%
    assert cpu_warnings([host], int(5.5 * S), 6 * S) == []
    # A short busy window (a reading at a phase boundary) weighs by its length: 0.1 of 1 s.
    spike = Series(
        name="host", times_ns=[0, S, S + S // 10, 2 * S], values={"host.cpu_pct": [9, 9, 100, 9]}
    )
    assert cpu_warnings([spike], S, 2 * S) == []
    assert cpu_warnings([], 0, S) == []  # nothing sampled, nothing said


def test_a_saturated_bench_process_warns_unless_its_cpu_is_measured() -> None:
    host = _host([50, 50, 50], proc=[95, 97, 99])
    (warning,) = cpu_warnings([host], 0, 2 * S)
    assert warning.startswith("bench process CPU saturated: 98% of one core")  # 97, 99
    # The phase's driver_cpu is the bench's own measure, judged by its backlog warnings.
    assert cpu_warnings([host], 0, 2 * S, driver_cpu=0.97) == []
    assert cpu_warnings([_host([50, 50, 50], proc=[40, 50, 60])], 0, 2 * S) == []


def test_warnings_are_shown_first_everywhere(tmp_path: Path) -> None:
    result = loaded_result()
    assert result.phases[0].warnings == []
    (warning,) = result.phases[1].warnings
    assert warning.startswith("host CPU saturated")
    again = load_result(write_json(result, tmp_path / "r.json"))  # kept in the JSON
    assert again.phases[1].warnings == [warning]

    console = Console(record=True, width=200)
    print_summary(result, console)
    text = console.export_text()
    assert text.index(f"warning: c=4: {warning}") < text.index("Phases")
    assert "c=4 (!)" in text and "c=1 (!)" not in text

    html = render_html(result)
    box = html.index('<div class="warn">')
    assert box < html.index("<h2>Phases</h2>")
    assert "host CPU saturated" in html[box : html.index("</div>", box)]


def test_old_results_without_the_new_fields_still_load_and_render(tmp_path: Path) -> None:
    data = json.loads(rich_result().model_dump_json(by_alias=True))
    for phase in data["phases"]:
        for key in ("warnings", "driver_cpu"):
            phase.pop(key, None)
    for key in ("cost_per_1m_output_tokens", "cost_per_1m_tokens"):
        data["summary"].pop(key, None)
    data["metadata"].pop("sampling", None)
    data.pop("cost", None)
    for s in data["samples"]:
        s.pop("interval_s", None)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    old = load_result(path)
    assert old.phases[0].warnings == [] and old.cost is None
    assert "<h2>Samplers</h2>" in render_html(old)


# -- plots: titles, labels, axes -----------------------------------------------------------------

RAW = re.compile(r"vllm:|\{|_pct|_bytes|host\.|gpu\d|metrics@")


def test_plot_titles_and_axes_are_readable() -> None:
    result = loaded_result()
    made = plots(result)
    titles = [p.title for p in made]
    assert "Server a (ollama): queue and batch over time" in titles
    assert "Server a (ollama): generation rate" in titles
    for plot in made:
        assert not RAW.search(plot.title), plot.title
        fig = plot.figure()
        for ax in fig.axes:
            if not ax.has_data():
                continue
            twin = any(o is not ax and o.bbox.bounds == ax.bbox.bounds for o in fig.axes)
            assert ax.get_xlabel() or twin, (plot.title, ax.get_title())
            assert ax.get_ylabel(), (plot.title, ax.get_title())
            assert not RAW.search(ax.get_title()), ax.get_title()
            assert not ax.yaxis.get_offset_text().get_text()  # no "1e9" above an axis
    panels = {ax.get_title(): ax for p in made for ax in p.figure().axes}
    assert {"Requests running", "Requests waiting", "KV-cache usage"} <= set(panels)
    assert panels["KV-cache usage"].get_ylabel() == "%"
    assert panels["KV-cache usage"].get_ylim() == (0.0, 105.0)
    memory = panels["GPU 0 memory used"]
    assert memory.get_ylabel() == "GiB"
    assert np.nanmax(memory.lines[0].get_ydata()) == pytest.approx(8e9 / 2**30)
    assert panels["Generated tokens per second"].get_ylabel() == "tokens / s"
    # 100 tokens per 0.1 s reading: the rate, not the counter.
    assert max(panels["Generated tokens per second"].lines[0].get_ydata()) == pytest.approx(1000)


def test_metric_labels() -> None:
    assert metric_label("gpu3.power_w").title == "GPU 3 power"
    assert metric_label(f"vllm:num_requests_waiting{{{VLLM_LABELS}}}").title == "Requests waiting"
    vram = metric_label("ollama.llama3.2:1b.size_vram_bytes")
    assert (vram.title, vram.unit, vram.scale) == ("llama3.2:1b in VRAM", "GiB", 1 / 2**30)
    unknown = metric_label("tgi_something_new{x=1}")
    assert (unknown.title, unknown.unit) == ("tgi_something_new", "")


# -- tables fit the page (rendered by headless Chromium) -----------------------------------------

_PROBE = """<script>
addEventListener("load", () => {
  document.querySelectorAll("details").forEach(d => { d.open = true; });
  const boxes = [...document.querySelectorAll(".tbl")].map(b => [b.scrollWidth, b.clientWidth]);
  const page = [document.documentElement.scrollWidth, innerWidth];
  document.body.setAttribute("data-probe", JSON.stringify({boxes, page}));
});
</script>"""


def _measure(page: Path, width: int, chromium: str, profile: Path) -> dict[str, Any]:
    probed = page.with_name(f"probe-{width}.html")
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"))
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--window-size={width},1000", "--dump-dom",
         probed.as_uri()],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'data-probe="([^"]*)"', proc.stdout)
    assert found, proc.stdout[-2000:]
    data: dict[str, Any] = json.loads(found.group(1).replace("&quot;", '"'))
    return data


def test_tables_fit_the_page(tmp_path: Path, chromium: str) -> None:
    page = write_html(loaded_result(), tmp_path / "report.html")
    wide = _measure(page, 1400, chromium, tmp_path / "profile")
    assert len(wide["boxes"]) >= 8
    # At the report's width no table needs its scroll box, metrics tables included ...
    assert all(scroll <= client for scroll, client in wide["boxes"]), wide
    assert wide["page"][0] <= wide["page"][1], wide
    # ... and on a narrow window the page itself never widens: a wide table scrolls inside.
    narrow = _measure(page, 640, chromium, tmp_path / "profile")
    assert narrow["page"][0] <= narrow["page"][1], narrow


# -- findings: knee and SLO headroom -------------------------------------------------------------


def _phases(loads: list[int], throughputs: list[float], ttft_p99: list[float]) -> BenchResult:
    """Closed-loop phases with the given request throughput and a TTFT p99 each."""
    result = rich_result()
    phases = []
    for i, (c, thr, ttft) in enumerate(zip(loads, throughputs, ttft_p99, strict=True)):
        reqs = [
            req(seq=i * 100 + k, phase=f"c={c}", start_ms=k, chunks_ms=(ttft, ttft + 10.0))
            for k in range(10)
        ]
        s = summarize(reqs, duration_s=10 / thr)  # 10 requests, 2 tokens each
        phases.append(
            PhaseResult(
                name=f"c={c}", mode="closed", concurrency=c, t_start_ns=0, t_end_ns=1, summary=s
            )
        )
    result.phases = phases
    result.slo = {"ttft_ms": 100.0}
    return result


def test_the_knee_is_where_throughput_stops_following_the_load() -> None:
    # Proportional to c=16, then 1.1x for 4x the load: a server saturating at ~16.
    result = _phases([1, 4, 16, 64], [10, 40, 150, 165], [20, 22, 40, 900])
    k = knee(result, "closed")
    assert k is not None and k.loads[k.index or 0] == 16 and k.unit == "output tok/s"
    assert [round(e, 2) for e in k.elasticities] == [1.0, 0.95, 0.07]
    text = findings(result)
    assert text[0] == (
        "Throughput knee at c=16 (300 output tok/s): from c=16 to c=64 throughput grew 1.1x "
        "for 4x the load, while TTFT p99 went from 40 to 900 ms."
    )
    still = knee(_phases([1, 2, 4], [10, 20, 39], [20, 20, 20]), "closed")
    assert still is not None and still.index is None
    assert knee(_phases([4], [40], [20]), "closed") is None  # one load: no curve
    assert knee(result, "open") is None


def test_slo_headroom_per_load() -> None:
    result = _phases([1, 4, 16, 64], [10, 40, 150, 165], [20, 22, 40, 900])
    rows = slo_headroom(result)
    assert [r.phase for r in rows] == ["c=1", "c=4", "c=16", "c=64"]
    assert rows[2].p99["ttft_ms"][1] == pytest.approx(0.6, abs=0.01)  # p99 ~40 of 100 ms
    assert [r.met for r in rows] == [True, True, True, False]
    sentence = next(line for line in findings(result) if line.startswith("Highest load"))
    assert sentence.startswith("Highest load meeting every SLO (TTFT <= 100 ms) at p99: c=16")
    assert "c=64 is over: TTFT p99 900 ms, 800% above its limit" in sentence
    result.slo = {}
    assert slo_headroom(result) == []


# -- cost and energy -----------------------------------------------------------------------------


def test_cost_per_million_tokens() -> None:
    result = rich_result()
    apply_cost(result, 2.0, gpus=4)
    s = result.phases[0].summary
    spent = 2.0 * 4 * s.duration_s / 3600
    assert s.cost_per_1m_output_tokens == pytest.approx(spent / s.total_output_tokens * 1e6)
    both = s.total_output_tokens + s.total_input_tokens
    assert s.cost_per_1m_tokens == pytest.approx(spent / both * 1e6)
    assert result.cost is not None and (result.cost.gpus, result.cost.gpus_from) == (4, "given")
    apply_cost(result, 2.0)  # the metadata's one GPU
    assert result.cost is not None and (result.cost.gpus, result.cost.gpus_from) == (1, "nvml")
    result.metadata.gpus = []
    apply_cost(result, 2.0)
    assert result.cost is not None and result.cost.gpus_from == "assumed"
    with pytest.raises(ValueError, match="gpu_hour_price"):
        apply_cost(result, -1.0)


async def test_tokens_per_joule_from_nvml_through_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNVML(two_gpus())
    module = fake.module()
    counter = itertools.count(1_000_000, 50_000)  # +50 J on every read of GPU 0's counter
    unsupported = module.nvmlDeviceGetTotalEnergyConsumption  # GPU 1 has no counter
    module.nvmlDeviceGetTotalEnergyConsumption = lambda handle: (  # type: ignore[attr-defined]
        next(counter) if handle is fake.gpus[0] else unsupported(handle)
    )
    monkeypatch.setitem(sys.modules, "pynvml", module)
    with FakeEngine(kind="openai", models=("m",)) as engine:
        scenario = validate_scenario(
            {
                "model": "m",
                "pool": {
                    "endpoints": [{"url": engine.url, "kind": "openai"}],
                    "health": {"enabled": False},
                },
                "workloads": [{"prompt_tokens": 8, "max_tokens": 6}],
                "schedules": [{"kind": "concurrency", "levels": [2], "requests": 6}],
                "warmup": {"requests": 0},
                "calibrate": "off",
                # The fake lives in this process: sample on a thread of it.
                "samplers": {"interval_s": 0.02, "process": False, "servers": False},
                "cost": {"gpu_hour_price": 3.0},
            }
        )
        result = await run_scenario(scenario)
    assert [g["name"] for g in result.metadata.gpus] == ["H100 A", "T4 B"]
    s = result.phases[0].summary
    assert s.energy_j is not None and s.energy_j > 0
    assert s.tokens_per_joule == pytest.approx(s.total_output_tokens / s.energy_j)
    assert result.cost is not None and (result.cost.gpus, result.cost.gpus_from) == (2, "nvml")
    console = Console(record=True, width=200)
    print_summary(result, console)
    text = console.export_text()
    assert "output tok/J" in text and "USD/1M out tok" in text
    assert f"{s.tokens_per_joule:.3f}" in text


# -- PDF -----------------------------------------------------------------------------------------


def _pdf_text(data: bytes) -> str:
    """The text of an uncompressed matplotlib PDF (its TJ arrays, kerning dropped)."""
    out = []
    for array in re.findall(rb"\[(.*?)\]\s*TJ", data, re.S):
        out.append(b"".join(re.findall(rb"\(((?:\\.|[^\\)])*)\)", array)).decode("latin-1"))
    return "\n".join(out).replace("\\(", "(").replace("\\)", ")")


def test_pdf_report(tmp_path: Path) -> None:
    result = loaded_result()
    apply_cost(result, 2.5)
    pages = pdf_pages(result)
    with matplotlib.rc_context({"pdf.compression": 0}):
        path = write_pdf(result, tmp_path / "report.pdf")
    data = path.read_bytes()
    assert data.startswith(b"%PDF-")
    assert len(re.findall(rb"/Type /Page\b", data)) == len(pages) >= 4
    boxes = re.findall(rb"/MediaBox \[ ?([^\]]+?) ?\]", data)
    assert len(boxes) == len(pages)
    for box in boxes:  # A4 landscape, in points
        assert [float(x) for x in box.split()] == pytest.approx([0, 0, *(x * 72 for x in PAGE_IN)])
    text = _pdf_text(data)
    for expected in (
        "Warnings",
        "host CPU saturated",
        "Findings",
        "Phases",
        "SLO headroom",
        "USD/1M",
        "Latency distributions (completed requests)",
        "Server a (ollama): queue and batch over time",
        "Requests running",
    ):
        assert expected in text, expected


def test_cli_writes_pdf_and_costs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["--simulate", "--concurrency", "1,2", "--requests", "4", "--warmup", "0", "--quiet"]
    argv += ["--pdf", "--gpu-hour-price", "2", "--gpus", "2", "--server-sample-interval", "1"]
    assert main([*argv, "--no-html", "--out", str(out)]) == 0
    result = load_result(out / "result.json")
    assert (out / "report.pdf").read_bytes().startswith(b"%PDF-")
    assert result.cost is not None and (result.cost.gpus, result.cost.gpus_from) == (2, "given")
    assert all(p.summary.cost_per_1m_output_tokens for p in result.phases)
    assert result.metadata.sampling.server_interval_s == 1.0
    printed = capsys.readouterr().out
    assert "servers every 1 s, in a sampler process of their own" in printed
    # The report subcommand prices an older result too, and writes its PDF beside it.
    again = ["report", str(out / "result.json"), "--no-html", "--pdf", "--gpu-hour-price", "4"]
    assert main(again) == 0
    assert (out / "report.pdf").exists() and "4 USD per GPU-hour" in capsys.readouterr().out
    assert main(["--simulate", "--gpu-hour-price", "-1"]) == 2
    err = capsys.readouterr().err
    assert "gpu_hour_price" in err and err.count("\n") == 1
