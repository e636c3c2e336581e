"""The HTML report: self-contained, every plot present, rendered by headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from shared_ollama.bench.html_report import render_html, write_html
from shared_ollama.bench.metrics import summarize
from shared_ollama.bench.result import BenchResult, PhaseResult, RunMetadata, Series

from ._helpers import MS, req


def rich_result() -> BenchResult:
    """Two closed-loop phases over two endpoints, plus host and GPU samples."""
    reqs, phases = [], []
    for i, (conc, base) in enumerate(((1, 0.0), (4, 2000.0))):
        rs = [
            req(
                seq=100 * i + k,
                phase=f"c={conc}",
                start_ms=base + 100 * k,
                chunks_ms=(40 + 10 * conc + k, 60 + 10 * conc + k, 80 + 12 * conc + k),
                end_ms=100 + 15 * conc + k,
                endpoint="http://a:1" if k % 2 else "http://b:2",
                timings={"queue_time_ms": float(k)},
            )
            for k in range(12)
        ]
        reqs += rs
        phases.append(
            PhaseResult(
                name=f"c={conc}",
                mode="closed",
                concurrency=conc,
                t_start_ns=int(base * MS),
                t_end_ns=int((base + 1300) * MS),
                summary=summarize(rs, slo={"ttft_ms": 80}),
            )
        )
    times = [int(t * 100 * MS) for t in range(40)]
    host = Series(
        name="host", times_ns=times, values={"host.cpu_pct": [float(t % 7 * 10) for t in range(40)]}
    )
    gpu = Series(
        name="nvml",
        times_ns=times,
        values={
            "gpu0.util_pct": [float(min(100, t * 5)) for t in range(40)],
            "gpu0.power_w": [100.0 + t for t in range(40)],
            "gpu0.mem_used_bytes": [None] * 2 + [8e9] * 38,
        },
    )
    down = Series(name="metrics@c:3", available=False, reason="unavailable: connection refused")
    meta = RunMetadata(
        started_at="2025-01-01T00:00:00+00:00",
        finished_at="x",
        wall_duration_s=3.4,
        monotonic_origin_ns=0,
        seed=1,
        endpoints=[
            {"url": "http://a:1", "kind": "ollama", "name": "a"},
            {"url": "http://b:2", "kind": "openai", "name": "b"},
        ],
        gpus=[{"index": 0, "name": "Fake GPU"}],
        notes=["a <note> & more"],
        scenario={"name": "html-test"},
    )
    return BenchResult(
        metadata=meta,
        summary=summarize(reqs, slo={"ttft_ms": 80}),
        phases=phases,
        requests=reqs,
        samples=[host, gpu, down],
        slo={"ttft_ms": 80.0},
        definitions={"ttft_ms": "first content chunk"},
    )


def test_report_is_self_contained_and_complete() -> None:
    html = render_html(rich_result())
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing fetched
    assert "@import" not in html and "url(http" not in html
    for title in (
        "Latency distributions",
        "Throughput and latency vs concurrency",
        "Per-endpoint comparison",
        "Requests in flight",
        "GPU 0 over time",
        "Host and bench process CPU over time",
    ):
        assert title in html, title
    assert html.count("data:image/svg+xml;base64,") == 6
    assert "a &lt;note&gt; &amp; more" in html  # escaped
    assert "unavailable: connection refused" in html
    assert "a (ollama)" in html and "Fake GPU" in html


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def _screenshot(page: Path, shot: Path, profile: Path) -> str:
    browser = _chromium()
    assert browser is not None
    proc = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--screenshot={shot}",
            "--window-size=1400,3000",
            "--enable-logging=stderr",
            "--v=0",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def _console_messages(log: str) -> list[str]:
    # Chromium logs each page console message as "...:INFO:CONSOLE:<line>] "text", source: ...".
    return [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.fixture
def chromium() -> str:
    browser = _chromium()
    if browser is None:
        message = (
            "chromium is not installed: the HTML report was NOT rendered (apt install chromium)"
        )
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    return browser


def test_report_renders_in_headless_chromium(tmp_path: Path, chromium: str) -> None:
    page = write_html(rich_result(), tmp_path / "report.html")
    shot = tmp_path / "report.png"
    log = _screenshot(page, shot, tmp_path / "profile")
    assert shot.exists() and shot.stat().st_size > 50_000
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    assert pixels.std() > 0.05  # text, tables and plots, not a blank page
    assert _console_messages(log) == []


def test_console_errors_would_be_caught(tmp_path: Path, chromium: str) -> None:
    # The check above must not pass vacuously: a page that logs is detected.
    page = tmp_path / "noisy.html"
    page.write_text('<html><body><script>console.error("boom")</script>x</body></html>')
    log = _screenshot(page, tmp_path / "noisy.png", tmp_path / "profile")
    assert any("boom" in m for m in _console_messages(log))
