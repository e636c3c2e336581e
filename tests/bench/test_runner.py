"""The runner against real FakeEngines: counts, token accounting, open loop, stop, sweep."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared_ollama import Endpoint, SharedClient
from shared_ollama.bench.collector import SEQ_TAG, Collector
from shared_ollama.bench.runner import Runner
from shared_ollama.bench.scenario import validate_scenario
from shared_ollama.bench.scheduler import ClosedLoop, OpenLoop, PhasePlan, Stop
from shared_ollama.bench.session import run_scenario
from shared_ollama.bench.workload import Workload, WorkloadMix
from shared_ollama.records import CallRecord
from shared_ollama.testing import FakeEngine

from ..conftest import MODEL, client_kwargs

CHAT_TOKENS_PER_MESSAGE = 3  # the FakeEngine's chat accounting: words + 3 per message


def _mix(**kw: Any) -> WorkloadMix:
    return WorkloadMix([Workload(**{"prompt_tokens": 12, "max_tokens": 6, **kw})], MODEL, 0)


async def _runner(engine: FakeEngine, mix: WorkloadMix) -> tuple[Runner, SharedClient]:
    collector = Collector()
    client = SharedClient(
        endpoints=[Endpoint(engine.url, kind=engine.kind)], listeners=[collector], **client_kwargs()
    )
    await client.start()
    return Runner(client, mix, collector), client


@pytest.fixture
async def runner(engine: FakeEngine) -> AsyncIterator[Runner]:
    r, client = await _runner(engine, _mix())
    try:
        yield r
    finally:
        await client.aclose()


async def test_closed_loop_count_and_server_token_counts(
    runner: Runner, engine: FakeEngine
) -> None:
    await runner.warmup(3, concurrency=2)
    run = await runner.run(PhasePlan("c=4", ClosedLoop(4), Stop(requests=12)))
    assert run.stop_reason == "requests"
    assert len(run.requests) == 12 and run.unrecorded == 0
    assert {r.phase for r in run.requests} == {"c=4"}  # the warm-up is not in the phase
    assert all(r.ok for r in run.requests), [r.error_type for r in run.requests]
    for r in run.requests:
        assert r.output_tokens == 6  # the server's own count: exactly num_predict
        assert r.input_tokens == 12 + CHAT_TOKENS_PER_MESSAGE
        assert sum(r.derived().tokens) == 6  # apportioned chunk tokens add up
        assert r.ttft_ms is not None and r.tpot_ms is not None
        assert r.endpoint == engine.url


@pytest.mark.parametrize("stream", [True, False])
async def test_generate_and_non_stream(engine: FakeEngine, stream: bool) -> None:
    runner, client = await _runner(engine, _mix(operation="generate", stream=stream))
    async with client:
        run = await runner.run(PhasePlan("g", ClosedLoop(2), Stop(requests=4)))
    assert [r.operation for r in run.requests] == ["generate"] * 4
    assert all(r.ok and r.output_tokens == 6 for r in run.requests)
    assert all(r.input_tokens == 12 for r in run.requests)
    assert all((r.ttft_ms is not None) == stream for r in run.requests)


async def test_duration_stop(runner: Runner) -> None:
    run = await runner.run(PhasePlan("d", ClosedLoop(2), Stop(duration_s=0.2)))
    assert run.stop_reason == "duration"
    assert run.requests and all(r.ok for r in run.requests)


async def test_open_loop_plans_send_times(runner: Runner) -> None:
    run = await runner.run(PhasePlan("r", OpenLoop(50.0, "constant"), Stop(requests=6)))
    planned = sorted(r.t_scheduled_ns for r in run.requests if r.t_scheduled_ns is not None)
    assert len(planned) == 6
    assert [b - a for a, b in itertools.pairwise(planned)] == [20_000_000] * 5
    assert all(r.t_start_ns >= (r.t_scheduled_ns or 0) for r in run.requests)  # never early
    assert all(r.send_lag_ms is not None for r in run.requests)


class _GatedClient:
    """A client whose calls all wait on one gate: proves the open loop never waits for them."""

    def __init__(self, collector: Collector, expected: int) -> None:
        self.collector = collector
        self.gate = asyncio.Event()
        self.started = 0
        self.all_started = asyncio.Event()
        self.expected = expected

    async def chat(self, model: str, messages: Any, **kw: Any) -> Any:
        self.started += 1
        if self.started == self.expected:
            self.all_started.set()
        rec = CallRecord(
            request_id="x",
            project="p",
            operation="chat",
            model=model,
            stream=False,
            t_start_ns=1,
            tags=dict(kw["tags"]),
        )
        await self.gate.wait()
        rec.t_end_ns = 2
        self.collector(rec)


async def test_open_loop_sends_on_time_without_waiting_for_replies() -> None:
    collector = Collector()
    client = _GatedClient(collector, expected=5)
    runner = Runner(client, _mix(stream=False), collector)  # type: ignore[arg-type]
    phase = asyncio.ensure_future(
        runner.run(PhasePlan("r", OpenLoop(1000.0, "constant"), Stop(requests=5)))
    )
    # Every send happens while no reply has come: a closed loop would stall at one.
    await asyncio.wait_for(client.all_started.wait(), timeout=30)
    client.gate.set()
    run = await phase
    assert len(run.requests) == 5


async def test_stop_keeps_what_was_measured(engine: FakeEngine) -> None:
    scenario = validate_scenario(
        {
            "model": MODEL,
            "pool": {
                "endpoints": [{"url": engine.url, "kind": engine.kind}],
                "health": {"enabled": False},
            },
            "workloads": [{"prompt_tokens": 8, "max_tokens": 6}],
            "schedules": [{"kind": "concurrency", "levels": [4], "duration_s": 600}],
            "warmup": {"requests": 0},
            "samplers": {"enabled": False},
        }
    )
    holder: list[Runner] = []
    ok = [0]

    def on_record(rec: CallRecord) -> None:
        ok[0] += rec.outcome == "ok"
        if ok[0] == 5:
            holder[0].stop()

    result = await run_scenario(scenario, on_record=on_record, on_runner=holder.append)
    assert result.metadata.interrupted
    assert result.phases[0].stop_reason == "interrupted"
    s = result.summary
    assert s.completed >= 5
    assert s.cancelled == s.requests - s.completed - s.failed  # in-flight calls were cut
    assert s.ttft_ms is not None and s.ttft_ms.count == s.completed


async def test_sweep_runs_both_ends_then_rates_between(engine: FakeEngine) -> None:
    scenario = validate_scenario(
        {
            "model": MODEL,
            "pool": {
                "endpoints": [{"url": engine.url, "kind": engine.kind}],
                "health": {"enabled": False},
            },
            "workloads": [{"prompt_tokens": 8, "max_tokens": 4}],
            "schedules": [
                {
                    "kind": "sweep",
                    "points": 2,
                    "max_concurrency": 4,
                    "requests": 6,
                    "arrival": "constant",
                }
            ],
            "warmup": {"requests": 1},
            "samplers": {"enabled": False},
        }
    )
    result = await run_scenario(scenario)
    names = [p.name for p in result.phases]
    assert names[:2] == ["sweep-sync", "sweep-max(c=4)"]
    assert len(names) == 4
    lo = result.phases[0].summary.request_throughput
    hi = result.phases[1].summary.request_throughput
    rates = [p.requested_rate for p in result.phases[2:]]
    assert all(r is not None and min(lo, hi) < r < max(lo, hi) for r in rates)
    assert all(p.mode == "open" and p.summary.completed == 6 for p in result.phases[2:])
    assert len(result.requests) == 24  # the warm-up request is not among them


async def test_samplers_run_beside_the_bench(engine: FakeEngine) -> None:
    scenario = validate_scenario(
        {
            "model": MODEL,
            "pool": {
                "endpoints": [{"url": engine.url, "kind": engine.kind}],
                "health": {"enabled": False},
            },
            "workloads": [{"prompt_tokens": 8, "max_tokens": 4}],
            "schedules": [{"kind": "concurrency", "levels": [2], "requests": 4}],
            "samplers": {"interval_s": 0.05},
        }
    )
    result = await run_scenario(scenario)
    by_name = {s.name: s for s in result.samples}
    host = by_name["host"]
    assert host.available and len(host.times_ns) >= 2  # a reading at each end at least
    start, end = result.phases[0].t_start_ns, result.phases[0].t_end_ns
    assert host.times_ns[0] <= start and host.times_ns[-1] >= end  # same clock, bracketing
    nvml = by_name["nvml"]
    assert nvml.available or (nvml.reason or "").startswith("unavailable:")
    server = [s for n, s in by_name.items() if n.startswith(("metrics@", "ollama-ps@"))]
    assert len(server) == 1 and server[0].available
    assert "host" in result.sample_summary
    assert all(SEQ_TAG not in n for n in by_name)


async def test_a_counted_closed_loop_draws_its_requests_before_its_clock(
    engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As vLLM's client: a phase of a known count draws every request before it starts
    (sending costs no workload generation); past the bound on the prompt text held, the
    rest are drawn as they go."""
    import shared_ollama.bench.runner as runner_module

    mix = _mix()
    runner, client = await _runner(engine, mix)
    draws: list[int] = []  # draws made by the time each request is sent
    drawn = 0
    draw = mix.next

    def counted() -> Any:
        nonlocal drawn
        drawn += 1
        return draw()

    send = runner._send

    async def watched(*args: Any) -> None:
        draws.append(drawn)
        await send(*args)

    monkeypatch.setattr(mix, "next", counted)
    monkeypatch.setattr(runner, "_send", watched)
    async with client:
        run = await runner.run(PhasePlan("c", ClosedLoop(3), Stop(requests=9)))
        assert draws == [9] * 9 and len(run.requests) == 9
        draws.clear()
        drawn = 0
        monkeypatch.setattr(runner_module, "_PREDRAWN_CHARS", 1)  # one prompt's worth: the
        await runner.run(PhasePlan("c2", ClosedLoop(1), Stop(requests=4)))  # rest as they go
        assert draws == [1, 2, 3, 4]
