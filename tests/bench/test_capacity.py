"""Capacity at an SLO: the pure search, the SLO grammar, the probe's estimates, compare's
gate, and searches against FakeEngines whose capacity follows from their parameters."""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from shared_ollama.bench.capacity import (
    CapacitySearch,
    CapacitySpec,
    SearchSpace,
    conclude,
    confidence_interval,
    measure_probe,
    next_load,
    parse_capacity_slo,
    parse_resolution,
    run_capacity,
    search,
)
from shared_ollama.bench.cli import main
from shared_ollama.bench.compare import compare
from shared_ollama.bench.result import CapacityResult, load_result, write_json
from shared_ollama.bench.runner import PhaseRun
from shared_ollama.bench.scenario import validate_scenario
from shared_ollama.bench.scheduler import ClosedLoop, PhasePlan, Stop
from shared_ollama.testing import TimingModel, engine_process

from ..conftest import MODEL
from ._helpers import MS, req
from .test_result import make_result

# -- the SLO grammar ---------------------------------------------------------------------


def test_slo_grammar() -> None:
    assert parse_capacity_slo("p99_ttft_ms<=500, p50_itl_ms<=50ms,error_rate<=0.01") == {
        "p99_ttft_ms": 500.0,
        "p50_itl_ms": 50.0,
        "error_rate": 0.01,
    }
    # vLLM's e2el spelling and median are the result's own key names too.
    assert parse_capacity_slo("median_e2el_ms<=900") == {"median_e2e_ms": 900.0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty SLO"),
        ("p99_ttft_ms=500", "use metric<=value"),
        ("p99_ttft_ms>=500", "use metric<=value"),
        ("p99_ttft<=500", "unknown metric 'p99_ttft'"),
        ("p42_ttft_ms<=500", "unknown metric"),
        ("p99_ttft_ms<=fast", "'fast' is not a number"),
        ("p99_ttft_ms<=-1", "a limit is >= 0"),
        ("error_rate<=2", "error_rate: 0 to 1"),
        ("p99_ttft_ms<=1,p99_ttft_ms<=2", "given twice"),
    ],
)
def test_bad_slo_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_capacity_slo(text)


def test_resolution() -> None:
    assert parse_resolution("5%") == (0.05, True)
    assert parse_resolution(" 2 ") == (2.0, False)
    for bad in ("0", "-5%", "fine", "nan"):
        with pytest.raises(ValueError, match="resolution"):
            parse_resolution(bad)


def test_t_interval() -> None:
    mean, low, high = confidence_interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, 2 df) * sd / sqrt(n)
    assert mean == 2.0
    assert low == pytest.approx(2 - half, abs=1e-3) and high == pytest.approx(2 + half, abs=1e-3)
    assert confidence_interval([7.0]) == (7.0, None, None)
    # Student's t quantiles (scipy.stats.t.ppf(0.975, df)): the table, then the expansion.
    for df, t in ((1, 12.706205), (4, 2.776445), (30, 2.042272), (40, 2.021075), (99, 1.984217)):
        values = [0.0, 2.0] * ((df + 1) // 2) + [1.0] * ((df + 1) % 2)
        mean, low, high = confidence_interval(values)
        assert low is not None and high is not None
        expected = t * statistics.stdev(values) / math.sqrt(len(values))
        assert (high - low) / 2 == pytest.approx(expected, rel=2e-4), df


# -- the search (pure) -------------------------------------------------------------------


@pytest.mark.parametrize("true", [1.0, 3.3, 7.9, 20.0, 63.7, 100.0, 250.0])
def test_finds_the_boundary_within_the_resolution(true: float) -> None:
    space = SearchSpace(start=1.0, max_load=512.0, resolution=0.05)
    verdict, loads = search(space, lambda load: load <= true)
    assert verdict.status == "found"
    assert verdict.capacity is not None and verdict.ceiling is not None
    assert verdict.capacity <= true < verdict.ceiling
    assert verdict.ceiling - verdict.capacity <= 0.05 * verdict.capacity + 1e-9
    assert len(loads) == len(set(loads))  # never measures a load twice
    assert len(loads) <= 2 + math.ceil(math.log2(512)) + math.ceil(math.log2(1 / 0.05))


@pytest.mark.parametrize("true", [1, 4, 5, 13, 64, 100])
def test_concurrency_search_finds_the_exact_level(true: int) -> None:
    space = SearchSpace(start=1, max_load=256, resolution=0.01, integer=True)
    verdict, loads = search(space, lambda load: load <= true)
    assert (verdict.status, verdict.capacity, verdict.ceiling) == ("found", true, true + 1)
    assert all(load.is_integer() for load in loads)


def test_absolute_resolution() -> None:
    space = SearchSpace(start=1.0, max_load=1000.0, resolution=2.0, relative=False)
    verdict, _ = search(space, lambda load: load <= 300)
    assert verdict.capacity is not None and verdict.ceiling is not None
    assert verdict.capacity <= 300 < verdict.ceiling <= verdict.capacity + 2


def test_passes_at_max_load() -> None:
    space = SearchSpace(start=3, max_load=20, integer=True)
    verdict, loads = search(space, lambda load: True)
    assert loads == [3, 6, 12, 20]  # doubling, the last step clamped to max_load
    assert (verdict.status, verdict.capacity, verdict.ceiling) == ("at_max_load", 20, None)


def test_fails_even_at_the_lowest_load() -> None:
    space = SearchSpace(start=2.0, max_load=64.0)
    verdict, loads = search(space, lambda load: False)
    assert loads == [2.0]
    assert (verdict.status, verdict.capacity, verdict.ceiling) == ("below_start", None, 2.0)


def test_noisy_outcomes_still_land_near_the_boundary() -> None:
    """Each probe misjudges the load by a random 3% (sd): the search may take a wrong turn
    near the boundary but ends near it, with an answer its own probes support."""
    true = 37.0

    def noisy(rng: random.Random) -> Callable[[float], bool]:
        return lambda load: load * (1 + rng.gauss(0, 0.03)) <= true

    for seed in range(30):
        space = SearchSpace(start=1.0, max_load=512.0, resolution=0.05)
        verdict, _ = search(space, noisy(random.Random(seed)))
        assert verdict.status == "found" and verdict.capacity is not None
        assert verdict.ceiling is not None and verdict.capacity < verdict.ceiling
        assert abs(verdict.capacity - true) <= 0.15 * true, (seed, verdict)


def test_a_pass_above_a_failure_is_not_followed() -> None:
    space = SearchSpace(start=1.0, max_load=64.0, resolution=0.01)
    history = [(1.0, True), (2.0, True), (4.0, False), (8.0, True)]
    assert next_load(space, history) == 3.0  # bisects [2, 4]; 8 passing was noise
    assert conclude(space, history) == conclude(space, history[:3])
    assert conclude(space, history, complete=False).status == "interrupted"


def test_space_validation() -> None:
    with pytest.raises(ValueError, match="whole numbers"):
        SearchSpace(start=1.5, max_load=8, integer=True)
    with pytest.raises(ValueError, match="below the start"):
        SearchSpace(start=8, max_load=4)
    with pytest.raises(ValueError, match="positive"):
        SearchSpace(start=0, max_load=4)


# -- one probe: estimates over repeats -----------------------------------------------------


def _run(name: str, ttfts_ms: list[float], failed: int = 0) -> PhaseRun:
    reqs = [req(seq=i, phase=name, chunks_ms=(t, t + 10, t + 20)) for i, t in enumerate(ttfts_ms)]
    reqs += [req(seq=100 + i, phase=name, outcome="error", error_type="X") for i in range(failed)]
    plan = PhasePlan(name, ClosedLoop(2), Stop(requests=len(reqs)))
    return PhaseRun(plan, 0, 1000 * MS, "requests", reqs)


def test_probe_mean_ci_verdict_and_uncertainty() -> None:
    space = SearchSpace(start=1, max_load=8, integer=True)
    spec = CapacitySpec("concurrency", {"p50_ttft_ms": 100.0, "error_rate": 0.2}, space)
    runs = [_run("c=2", [80, 80]), _run("c=2#2", [90, 90]), _run("c=2#3", [100, 100], failed=1)]
    probe = measure_probe(spec, 2, runs)
    ttft = probe.metrics["p50_ttft_ms"]
    assert ttft.values == [80, 90, 100] and ttft.mean == 90
    assert ttft.low is not None and ttft.high is not None and ttft.low < 90 < 100 < ttft.high
    assert probe.metrics["error_rate"].values == [0, 0, pytest.approx(1 / 3)]
    assert probe.passed  # means 90 <= 100 and 0.11 <= 0.2
    assert probe.uncertain  # both intervals reach past their limits
    assert probe.phases == ["c=2", "c=2#2", "c=2#3"]
    assert probe.throughput == pytest.approx(2.0)  # 2 completed in each 1 s phase
    # A repeat in which nothing completed cannot show the SLO met.
    assert not measure_probe(spec, 2, [_run("c=2", [10]), _run("c=2#2", [], failed=1)]).passed


async def test_driver_repeats_each_load_and_stops_when_interrupted() -> None:
    """The session-side driver: `repeats` phases per load, named apart; a phase cut by
    Ctrl-C ends the search as interrupted with what it had."""
    space = SearchSpace(start=1, max_load=64, integer=True, resolution=0.01)
    spec = CapacitySpec("concurrency", {"p99_ttft_ms": 100.0}, space, repeats=2)
    plans: list[PhasePlan] = []

    async def run_phase(plan: PhasePlan) -> PhaseRun | None:
        plans.append(plan)
        assert isinstance(plan.schedule, ClosedLoop)
        # TTFT grows with concurrency: 20 ms per level, so c=5 is the last under 100 ms.
        return _run(plan.name, [20.0 * plan.schedule.concurrency] * 3)

    finder = CapacitySearch(spec)
    await finder.drive(run_phase)
    cap = finder.result()
    assert (cap.status, cap.capacity, cap.ceiling) == ("found", 5, 6)
    assert [p.name for p in plans[:4]] == ["c=1", "c=1#2", "c=2", "c=2#2"]
    assert len(plans) == 2 * len(cap.probes)

    async def cut_at_8(plan: PhasePlan) -> PhaseRun | None:
        run = await run_phase(plan)
        if plan.name == "c=8":
            return None if run is None else replace(run, stop_reason="interrupted")
        return run

    finder = CapacitySearch(spec)
    await finder.drive(cut_at_8)
    cap = finder.result()
    assert (cap.status, cap.capacity, cap.ceiling) == ("interrupted", 4, None)
    assert [p.load for p in cap.probes] == [1, 2, 4]


# -- compare's gate ----------------------------------------------------------------------


def _capacity_result(capacity: float | None, status: str = "found", **kw: Any) -> Any:
    cap = CapacityResult.model_validate(
        {
            "search": "rate",
            "slo": {"p99_ttft_ms": 500.0},
            "repeats": 3,
            "confidence": 0.95,
            "start": 1.0,
            "max_load": 256.0,
            "resolution": "5%",
            "status": status,
            "capacity": capacity,
            **kw,
        }
    )
    return make_result().model_copy(update={"capacity": cap})


def _capacity_delta(a: Any, b: Any, threshold: float = 10) -> tuple[Any, list[str]]:
    deltas, notes = compare(a, b, threshold_pct=threshold)
    found = [d for d in deltas if d.metric == "capacity"]
    return (found[0] if found else None), notes


def test_compare_gates_on_capacity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d, _ = _capacity_delta(_capacity_result(40.0), _capacity_result(34.0))
    assert d.change_pct == pytest.approx(-15) and d.regression
    d, _ = _capacity_delta(_capacity_result(40.0), _capacity_result(38.0))
    assert not d.regression  # 5% lower: within 10%
    d, _ = _capacity_delta(_capacity_result(40.0), _capacity_result(80.0))
    assert not d.regression  # higher is better
    d, _ = _capacity_delta(_capacity_result(40.0), _capacity_result(None, "below_start"))
    assert d.b == 0 and d.regression  # nothing meets the SLO any more
    d, notes = _capacity_delta(_capacity_result(256.0, "at_max_load"), _capacity_result(200.0))
    assert d.regression and "A's capacity is at least 256" in notes[0]
    other_slo = _capacity_result(40.0, slo={"p99_ttft_ms": 200.0})
    d, notes = _capacity_delta(_capacity_result(40.0), other_slo)
    assert d is None and "differ" in notes[0]
    d, notes = _capacity_delta(_capacity_result(40.0), make_result())
    assert d is None and notes == ["only A has a capacity search"]
    d, notes = _capacity_delta(make_result(), make_result())
    assert d is None and notes == []  # ordinary runs: no capacity row at all
    a = write_json(_capacity_result(40.0), tmp_path / "a.json")
    b = write_json(_capacity_result(30.0), tmp_path / "b.json")
    argv = ["compare", str(a), str(b), "--metrics", "capacity"]
    assert main([*argv, "--fail-above", "10%"]) == 1
    assert "all/capacity" in capsys.readouterr().out
    assert main([*argv, "--fail-above", "30%"]) == 0


def test_result_files_with_and_without_capacity_load(tmp_path: Path) -> None:
    path = write_json(_capacity_result(12.5), tmp_path / "cap.json")
    again = load_result(path)
    assert again.capacity is not None and again.capacity.capacity == 12.5
    data = json.loads(path.read_text(encoding="utf-8"))
    del data["capacity"]  # a result written before capacity searches existed
    path.write_text(json.dumps(data), encoding="utf-8")
    assert load_result(path).capacity is None


def test_the_html_and_pdf_reports_show_the_search(tmp_path: Path) -> None:
    import matplotlib

    from shared_ollama.bench.html_report import render_html
    from shared_ollama.bench.pdf_report import write_pdf

    from .test_report_layout import _pdf_text

    def ttft(ms: float) -> dict[str, Any]:
        return {"p99_ttft_ms": {"values": [ms], "mean": ms}}

    probes = [
        {"load": 8.0, "phases": ["8 req/s"], "passed": True, "throughput": 7.9,
         "achieved_rate": 8.0, "metrics": ttft(310.0)},
        {"load": 16.0, "phases": ["16 req/s"], "passed": False, "uncertain": True,
         "throughput": 12.1, "achieved_rate": 15.8, "metrics": ttft(640.0)},
    ]  # fmt: skip
    result = _capacity_result(8.0, ceiling=16.0, probes=probes)
    html = render_html(result)
    assert "Capacity search (rate; mean of 3" in html
    assert "<td>8 req/s</td><td>7.9</td><td>8</td><td>310</td><td>pass</td>" in html
    assert "<td>16 req/s</td><td>12.1</td><td>15.8</td><td>640</td><td>FAIL?</td>" in html
    assert "capacity: 8 req/s meets p99_ttft_ms&lt;=500 (16 req/s does not" in html
    assert "straddles a limit" in html
    assert "Capacity search" not in render_html(make_result())  # a run has none
    with matplotlib.rc_context({"pdf.compression": 0}):
        pdf = _pdf_text(write_pdf(result, tmp_path / "report.pdf").read_bytes())
    assert "Capacity search (rate; mean of 3" in pdf and "FAIL?" in pdf
    assert "capacity: 8 req/s meets p99_ttft_ms<=500" in pdf


# -- against FakeEngines with a known saturation point -----------------------------------

SLOTS = 4
OUTPUT_TOKENS = 8
# No per-prompt or per-active cost: every generation holds its slot for exactly SERVICE_S.
TIMING = TimingModel(ttft_base_s=0.03, ttft_per_prompt_token_s=0.0, itl_s=0.01)
SERVICE_S = TIMING.ttft_base_s + (OUTPUT_TOKENS - 1) * TIMING.itl_s
# Below saturation TTFT is the prefill; once a request queues it waits for a slot, up to a
# whole SERVICE_S. The limit sits halfway. On p90, not p99: one stall of a loaded CI machine
# touches a few requests, and must not decide a probe.
TTFT_LIMIT_MS = (TIMING.ttft_base_s + SERVICE_S / 2) * 1000
SLO = {"p90_ttft_ms": TTFT_LIMIT_MS}


@pytest.fixture(scope="module")
def saturating_engine() -> Iterator[str]:
    """The engine in its own process, so its slots keep time whatever the bench's process
    does; its URL."""
    with engine_process("openai", timing=TIMING, models=[MODEL], slots=SLOTS) as engine:
        yield engine.url


def test_cli_concurrency_capacity_is_the_slot_count(
    saturating_engine: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Closed loop: up to SLOTS concurrent requests never queue; with one more, one request
    in every round waits a whole SERVICE_S for a slot, so the TTFT SLO fails at SLOTS + 1."""
    out = tmp_path / "cap"
    code = main(["capacity", "--endpoint", f"{saturating_engine},openai", "--model", MODEL,
                 "--slo", f"p90_ttft_ms<={TTFT_LIMIT_MS:g},error_rate<=0",
                 "--search", "concurrency", "--start", "3", "--max-load", "32",
                 "--repeats", "2", "--requests", "16", "--warmup", "2",
                 "--prompt-tokens", "8", "--max-tokens", str(OUTPUT_TOKENS),
                 "--no-samplers", "--no-html", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    cap = load_result(out / "result.json").capacity
    assert cap is not None and cap.status == "found", printed
    assert cap.capacity is not None and abs(cap.capacity - SLOTS) <= 0.1 * SLOTS, printed
    assert cap.ceiling == SLOTS + 1
    by_load = {p.load: p for p in cap.probes}
    assert list(by_load) == [3, 6, 4, 5]  # doubled from 3 to a failure, then bisected
    assert all(len(p.phases) == 2 and p.metrics["p90_ttft_ms"].low is not None for p in cap.probes)
    assert "Capacity search" in printed and f"capacity: c={SLOTS} meets" in printed
    assert main(["report", str(out / "result.json"), "--no-html"]) == 0
    assert f"capacity: c={SLOTS} meets" in capsys.readouterr().out


async def test_rate_capacity_is_slots_over_service_time(saturating_engine: str) -> None:
    """Open loop, constant arrivals: the engine completes at most SLOTS / SERVICE_S
    requests per second; past that the queue grows with every arrival and the TTFT SLO
    fails. The search finds that rate within 10%."""
    saturation = SLOTS / SERVICE_S
    scenario = validate_scenario(
        {
            "model": MODEL,
            "pool": {
                "endpoints": [{"url": saturating_engine, "kind": "openai"}],
                "health": {"enabled": False},
            },
            "workloads": [{"prompt_tokens": 8, "max_tokens": OUTPUT_TOKENS}],
            "warmup": {"requests": 2},
            "samplers": {"enabled": False},
        }
    )
    spec = CapacitySpec(
        "rate",
        SLO,
        SearchSpace(start=0.75 * saturation, max_load=4 * saturation, resolution=0.05),
        repeats=1,
        stop=Stop(requests=40),
        arrival="constant",
    )
    result = await run_capacity(scenario, spec)
    cap = result.capacity
    assert cap is not None and cap.status == "found", cap
    assert cap.capacity is not None and abs(cap.capacity - saturation) <= 0.1 * saturation, cap
    assert [p.name for p in result.phases] == [p.phases[0] for p in cap.probes]
    # Past saturation the engine still completes no more than SLOTS / SERVICE_S per second.
    top = max(cap.probes, key=lambda p: p.load)
    assert top.load >= 1.5 * saturation
    assert top.throughput is not None and top.throughput <= 1.1 * saturation, cap


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--slo", "p99_ttft<=5"], "unknown metric"),
        (["--slo", "p99_ttft_ms<=5", "--start", "1.5"], "whole numbers"),
        (["--slo", "p99_ttft_ms<=5", "--repeats", "0"], "--repeats must be at least 1"),
        (["--slo", "p99_ttft_ms<=5", "--resolution", "x"], "bad resolution"),
        (["--slo", "p99_ttft_ms<=5", "--no-stream"], "needs streamed requests"),
        (["--slo", "p99_ttft_ms<=5", "--max-load", "0.5", "--search", "rate"], "below the start"),
    ],
)
def test_capacity_bad_input_exits_2_with_one_line(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["capacity", "--endpoint", "http://127.0.0.1:9", "--model", "m", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
