"""The result document: from CallRecords, JSON round trip, CSV, version checks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from shared_ollama.bench.metrics import summarize
from shared_ollama.bench.result import (
    SCHEMA,
    SCHEMA_VERSION,
    BenchResult,
    RunMetadata,
    load_result,
    write_csv,
    write_json,
)

from ._helpers import req


def make_result(**summary_kw: object) -> BenchResult:
    """A small valid result with two requests in one phase."""
    reqs = [
        req(seq=1, chunks_ms=(100, 110, 120), end_ms=125, timings={"queue_time_ms": 2.0}),
        req(seq=2, start_ms=10, chunks_ms=(80, 100), end_ms=100),
    ]
    meta = RunMetadata(
        started_at="2025-01-01T00:00:00+00:00",
        finished_at="x",
        wall_duration_s=1.0,
        monotonic_origin_ns=0,
        endpoints=[{"url": "http://a:1", "kind": "openai", "name": "a"}],
        scenario={"name": "t"},
    )
    return BenchResult(metadata=meta, summary=summarize(reqs), requests=reqs)


def test_json_round_trip(tmp_path: Path) -> None:
    result = make_result()
    path = write_json(result, tmp_path / "out" / "result.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["schema"] == SCHEMA and data["schema_version"] == SCHEMA_VERSION
    assert data["requests"][0]["ttft_ms"] == 100  # derived fields are written too
    assert data["summary"]["vllm"]["mean_ttft_ms"] == 90
    again = load_result(path)
    assert again.requests[0].derived() == result.requests[0].derived()
    assert again.summary == result.summary


def test_load_refuses_other_documents(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text('{"schema": "other"}', encoding="utf-8")
    with pytest.raises(ValueError, match="not a shared_ollama bench result"):
        load_result(path)
    path.write_text(json.dumps({"schema": SCHEMA, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ValueError, match="newer"):
        load_result(path)
    with pytest.raises(ValueError, match="cannot read"):
        load_result(tmp_path / "missing.json")


def test_csv_has_one_row_per_request(tmp_path: Path) -> None:
    result = make_result()
    path = write_csv(result.requests, tmp_path / "requests.csv")
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    assert len(rows) == 2
    assert rows[0]["ttft_ms"] == "100.0"
    assert rows[0]["n_chunks"] == "3"
    assert rows[0]["server_queue_ms"] == "2.0"
    assert rows[1]["server_queue_ms"] == ""
    assert rows[1]["t_start_ns"] == str(10_000_000)


def test_energy_and_tokens_per_joule_from_an_nvml_series() -> None:
    from shared_ollama.bench.result import Series
    from shared_ollama.bench.runner import PhaseRun
    from shared_ollama.bench.scheduler import ClosedLoop, PhasePlan, Stop
    from shared_ollama.bench.session import build_result

    reqs = [req(seq=i, start_ms=100 * i, chunks_ms=(10, 20), output_tokens=50) for i in range(4)]
    run = PhaseRun(
        PhasePlan("c=1", ClosedLoop(1), Stop(requests=4)), 0, 1_000_000_000, "requests", reqs
    )
    # The counter climbs 1 J per 10 ms: 100 J over the phase's second.
    times = [i * 100_000_000 for i in range(-2, 13)]
    gpu = Series(
        name="nvml", times_ns=times, values={"gpu0.energy_j": [1000.0 + t / 1e7 for t in times]}
    )
    result = build_result(make_result().metadata, [run], {}, [gpu])
    s = result.phases[0].summary
    assert s.energy_j == pytest.approx(100.0)
    assert s.tokens_per_joule == pytest.approx(200 / 100.0)
    assert result.summary.tokens_per_joule == pytest.approx(2.0)
    assert result.sample_summary["nvml"]["gpu0.energy_j"]["max"] == pytest.approx(1120.0)
