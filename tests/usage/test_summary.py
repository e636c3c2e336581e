"""Summaries: grouping, error counts, percentiles, time windows, and the tracker's flush."""

from __future__ import annotations

import doctest
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared_ollama.config import UsageConfig
from shared_ollama.usage import Ledger, SummaryRow, UsageTracker, parse_when, query

from ._helpers import make_record

S = 1_000_000_000  # ns
T0 = 1_800_000_000  # epoch s, a fixed day: 2027-01-15T08:00:00Z


def _ref_percentile(values: list[float], p: float) -> float:
    # Linear interpolation between closest ranks (numpy's default).
    xs = sorted(values)
    pos = (len(xs) - 1) * p
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    with Ledger(":memory:", epoch_offset_ns=0) as led:
        yield led


def test_grouping_tokens_errors_and_percentiles(ledger: Ledger) -> None:
    durations: dict[tuple[str, str], list[float]] = {}
    n = 0
    for project in ("search", "chatbot"):
        for model in ("llama3.2", "qwen3"):
            count = 37 if project == "search" else 11
            for i in range(count):
                ms = float((i * 7919) % 1000 + 1)  # scattered, not sorted
                ledger.submit(make_record(f"r{n}", project=project, model=model, duration_ms=ms))
                durations.setdefault((project, model), []).append(ms)
                n += 1
    # Failed calls count as requests and errors but not in latency percentiles.
    ledger.submit(
        make_record(
            "e1",
            project="search",
            model="qwen3",
            outcome="error",
            error_type="Timeout",
            duration_ms=99999,
            input_tokens=None,
            output_tokens=None,
        )
    )
    ledger.submit(
        make_record(
            "e2",
            project="search",
            model="qwen3",
            outcome="interrupted",
            duration_ms=99999,
            attempts=3,
        )
    )
    ledger.submit(
        make_record(
            "c1",
            project="search",
            model="qwen3",
            outcome="cancelled",
            duration_ms=99999,
            input_tokens=5,
            output_tokens=0,
        )
    )

    rows = ledger.summary()
    assert [(r.project, r.model) for r in rows] == [
        ("chatbot", "llama3.2"),
        ("chatbot", "qwen3"),
        ("search", "llama3.2"),
        ("search", "qwen3"),
    ]
    by_key = {(r.project, r.model): r for r in rows}
    for key, values in durations.items():
        row = by_key[key]
        assert row.p50_ms == pytest.approx(_ref_percentile(values, 0.5))
        assert row.p95_ms == pytest.approx(_ref_percentile(values, 0.95))
    sq = by_key[("search", "qwen3")]
    assert (sq.requests, sq.errors, sq.retries) == (37 + 3, 2, 2)
    assert sq.input_tokens == 37 * 10 + 10 + 5
    assert sq.output_tokens == 37 * 20 + 20 + 0
    cl = by_key[("chatbot", "llama3.2")]
    assert (cl.requests, cl.errors, cl.input_tokens, cl.output_tokens) == (11, 0, 110, 220)
    assert cl.operation is None  # keys not asked for stay empty


def test_single_value_and_two_values(ledger: Ledger) -> None:
    ledger.submit(make_record("a", project="one", duration_ms=42))
    ledger.submit(make_record("b", project="two", duration_ms=10))
    ledger.submit(make_record("c", project="two", duration_ms=20))
    rows = {r.project: r for r in ledger.summary(group_by=["project"])}
    assert (rows["one"].p50_ms, rows["one"].p95_ms) == (42, 42)
    assert rows["two"].p50_ms == pytest.approx(15)
    assert rows["two"].p95_ms == pytest.approx(19.5)


def test_group_with_only_failures_has_no_latency(ledger: Ledger) -> None:
    ledger.submit(make_record("x", outcome="error", error_type="ConnectError"))
    [row] = ledger.summary(group_by=("project", "error_type"))
    assert row.error_type == "ConnectError"
    assert (row.requests, row.errors, row.p50_ms, row.p95_ms) == (1, 1, None, None)


def test_no_grouping_and_no_rows(ledger: Ledger) -> None:
    assert ledger.summary() == []
    assert ledger.summary(group_by=()) == []
    for i in range(4):
        ledger.submit(make_record(f"r{i}", project=f"p{i % 2}", duration_ms=10 * (i + 1)))
    [total] = ledger.summary(group_by=())
    assert total.p95_ms == pytest.approx(38.5)
    assert total.model_copy(update={"p95_ms": None}) == SummaryRow(
        requests=4,
        errors=0,
        retries=0,
        input_tokens=40,
        output_tokens=80,
        p50_ms=25.0,
        mean_ttft_ms=None,
    )


def test_mean_ttft_and_other_keys(ledger: Ledger) -> None:
    ledger.submit(make_record("s1", stream=True, ttft_ms=100, operation="chat"))
    ledger.submit(make_record("s2", stream=True, ttft_ms=300, operation="chat"))
    ledger.submit(
        make_record("g1", operation="generate", endpoint="http://gpu-b:8000", protocol="openai")
    )
    rows = ledger.summary(group_by=("operation", "protocol", "endpoint"))
    assert [(r.operation, r.protocol, r.endpoint, r.mean_ttft_ms) for r in rows] == [
        ("chat", "ollama", "http://gpu-a:11434", pytest.approx(200)),
        ("generate", "openai", "http://gpu-b:8000", None),
    ]


def test_filters_and_time_windows(ledger: Ledger) -> None:
    for h in range(48):  # one call per hour over two days
        ledger.submit(
            make_record(
                f"h{h}",
                t_start_ns=(T0 + h * 3600) * S,
                project="a" if h % 2 else "b",
                model="m1" if h < 24 else "m2",
            )
        )

    def total(**kw: Any) -> int:
        return sum(r.requests for r in ledger.summary(**kw))

    assert total() == 48
    assert total(project="a") == 24
    assert total(model="m2") == 24
    assert total(project="a", model="m2") == 12
    assert total(since=T0 + 10 * 3600) == 38
    assert total(since=T0 + 10 * 3600, until=T0 + 20 * 3600) == 10  # until is exclusive
    since_dt = datetime.fromtimestamp(T0 + 40 * 3600, tz=UTC)
    assert total(since=since_dt) == 8
    assert total(since=since_dt.isoformat()) == 8
    assert total(until=str(T0 + 3600)) == 1
    days = ledger.summary(group_by=("day",))
    assert [(r.day, r.requests) for r in days] == [
        ("2027-01-15", 16),
        ("2027-01-16", 24),
        ("2027-01-17", 8),
    ]
    hours = ledger.summary(group_by=("hour",), until=T0 + 2 * 3600)
    assert [r.hour for r in hours] == ["2027-01-15T08:00Z", "2027-01-15T09:00Z"]


def test_relative_windows_use_the_wall_clock() -> None:
    now = time.time()
    with Ledger(":memory:", epoch_offset_ns=0) as ledger:
        for i, ago_s in enumerate((7200, 1800, 60)):
            ledger.submit(make_record(f"w{i}", t_start_ns=int((now - ago_s) * S)))
        assert sum(r.requests for r in ledger.summary(since=timedelta(hours=1))) == 2
        assert sum(r.requests for r in ledger.summary(since="5m")) == 1
        assert sum(r.requests for r in ledger.summary(since="1d", until="10m")) == 2


def test_parse_when() -> None:
    now = 1_000_000.0
    assert parse_when(None, now) is None
    assert parse_when("90s", now) == now - 90
    assert parse_when("15m", now) == now - 900
    assert parse_when("2h", now) == now - 7200
    assert parse_when("7d", now) == now - 7 * 86400
    assert parse_when("1w", now) == now - 604800
    assert parse_when("1.5h", now) == now - 5400
    assert parse_when(123, now) == 123.0
    assert parse_when("123.5", now) == 123.5
    assert parse_when("2026-11-01T00:00:00+00:00", now) == 1793491200.0
    local = datetime(2026, 11, 1).timestamp()  # a date alone is local midnight
    assert parse_when("2026-11-01", now) == local
    with pytest.raises(ValueError, match="not a time"):
        parse_when("yesterday", now)


def test_doctests() -> None:
    assert doctest.testmod(query).failed == 0


def test_unknown_group_key(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="unknown group_by"):
        ledger.summary(group_by=("project", "colour"))


def test_tracker_summary_sees_its_own_calls_at_once(tmp_path: object) -> None:
    cfg = UsageConfig(path=str(tmp_path) + "/u.db", flush_interval_s=3600, batch_size=10_000)
    with UsageTracker(cfg) as tracker:
        for i in range(25):
            tracker(make_record(f"t{i}", project="mine"))
        [row] = tracker.summary(project="mine")
        assert row.requests == 25
        assert len(tracker.rows(project="mine", limit=5)) == 5


async def test_async_summary(tmp_path: object) -> None:
    tracker = UsageTracker(UsageConfig(path=str(tmp_path) + "/u.db"))
    tracker(make_record("a"))
    [row] = await tracker.asummary(group_by=["model"])
    assert (row.model, row.requests) == ("llama3.2", 1)
    await tracker.aclose()
