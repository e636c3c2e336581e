"""Scenario files and flags: validation with one readable line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared_ollama.bench.scenario import (
    ConcurrencySpec,
    RateSpec,
    ScenarioError,
    load_scenario,
    phase_plans,
    public_scenario,
    validate_scenario,
)
from shared_ollama.bench.scheduler import ClosedLoop, OpenLoop

GOOD = """
name = "nightly"
model = "llama3.2"
seed = 7

[pool]
endpoints = [{url = "http://gpu-a:11434", kind = "ollama"},
             {url = "http://gpu-b:8000", kind = "openai", api_key = "sk-secret"}]

[[workloads]]
name = "short"
weight = 3
prompt_tokens = "normal:128:32:16:512"
max_tokens = 64

[[workloads]]
name = "long"
operation = "generate"
stream = false
prompt_tokens = {dist = "uniform", min = 512, max = 1024}

[[schedules]]
kind = "concurrency"
levels = [1, 8]
requests = 50

[[schedules]]
kind = "rate"
rates = [2.0, 4.0]
arrival = "poisson"
burstiness = 0.5
duration_s = 30

[[schedules]]
kind = "sweep"
points = 4

[warmup]
requests = 4

[slo]
ttft_ms = 500
tpot_ms = 50
"""


def test_a_full_scenario_file(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(GOOD, encoding="utf-8")
    s = load_scenario(path)
    assert s.name == "nightly" and s.seed == 7
    assert [w.name for w in s.workloads] == ["short", "long"]
    assert s.workloads[1].prompt_tokens.max == 1024
    assert s.slo.as_dict() == {"ttft_ms": 500, "tpot_ms": 50}
    assert [type(x).__name__ for x in s.schedules] == ["ConcurrencySpec", "RateSpec", "SweepSpec"]
    closed = phase_plans(s.schedules[0])  # type: ignore[arg-type]
    assert [p.name for p in closed] == ["c=1", "c=8"]
    assert closed[1].schedule == ClosedLoop(8) and closed[1].stop.requests == 50
    open_ = phase_plans(s.schedules[1])  # type: ignore[arg-type]
    assert open_[0].schedule == OpenLoop(2.0, "poisson", 0.5)
    assert open_[0].stop.duration_s == 30


def test_public_scenario_keeps_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(GOOD, encoding="utf-8")
    public = public_scenario(load_scenario(path))
    assert "sk-secret" not in repr(public)
    assert public["pool"]["endpoints"][1] == {
        "url": "http://gpu-b:8000",
        "kind": "openai",
        "name": "gpu-b:8000",
    }


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"schedules": [{"kind": "concurrency", "levels": [1, 0]}]},
            "schedules.0.concurrency.levels.1: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            {"schedules": [{"kind": "rate", "rates": [2], "burstiness": -1}]},
            "schedules.0.rate.burstiness: Input should be greater than 0",
        ),
        ({"schedules": [{"kind": "warp"}]}, "schedules.0: Input tag 'warp'"),
        (
            {"workloads": [{"max_tokens": "uniform:5"}]},
            "workloads.0.max_tokens: Value error, bad length",
        ),
        (
            {"workloads": [{"operation": "embed"}]},
            "workloads.0.operation: Input should be 'chat' or 'generate'",
        ),
        ({"slo": {"ttft_ms": 0}}, "slo.ttft_ms: Input should be greater than 0"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"pool": {"endpoints": []}}, "no endpoints"),
    ],
)
def test_validation_errors_say_where_and_why(data: dict[str, object], expected: str) -> None:
    base: dict[str, object] = {"model": "m", "pool": {"endpoints": [{"url": "http://a:1"}]}}
    with pytest.raises(ScenarioError) as info:
        validate_scenario({**base, **data}, "x.toml")
    assert "invalid scenario (x.toml)" in str(info.value)
    assert expected in str(info.value)


def test_pool_errors_never_echo_values() -> None:
    bad = {"model": "m", "pool": {"endpoints": [{"url": "ftp://x", "api_key": "sk-secret"}]}}
    with pytest.raises(ScenarioError) as info:
        validate_scenario(bad)
    assert "pool.endpoints.0" in str(info.value) and "url" in str(info.value)
    assert "sk-secret" not in str(info.value) and "ftp://x" not in str(info.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="not found"):
        load_scenario(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("levels = [1,", encoding="utf-8")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(broken)


def test_model_is_required_unless_simulated() -> None:
    with pytest.raises(ScenarioError, match="no model"):
        validate_scenario({"pool": {"endpoints": [{"url": "http://a:1"}]}})
    assert validate_scenario({"simulate": True}).simulate


def test_stop_defaults_to_100_requests() -> None:
    assert ConcurrencySpec(levels=[1]).stop().requests == 100
    assert RateSpec(rates=[1], duration_s=5).stop().requests is None


def test_the_example_scenario_stays_valid() -> None:
    example = Path(__file__).parents[2] / "benchmarks" / "scenario.example.toml"
    s = load_scenario(example)
    assert [w.name for w in s.workloads] == ["chat", "summary"]
    assert s.slo.as_dict() == {"ttft_ms": 500, "tpot_ms": 50, "e2e_ms": 20000}
