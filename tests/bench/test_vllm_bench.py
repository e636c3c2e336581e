"""The bench end to end against a REAL vLLM on CPU (started by the session, tiny model).

A concurrency sweep 1, 4, 8: the bench's output tokens equal vLLM's own counters, the
``/metrics`` sampler records vLLM's gauges on the run's timeline, and throughput per level
is reported (continuous batching), not asserted as a timing.
"""

from __future__ import annotations

from typing import Any

from shared_ollama.bench.scenario import validate_scenario
from shared_ollama.bench.session import run_scenario

GENERATED = "vllm:generation_tokens_total"
RUNNING = "vllm:num_requests_running"


def series(samples: Any, prefix: str) -> list[float]:
    """Values of the first metric whose key starts with ``prefix``."""
    key = next(k for k in samples.values if k.startswith(prefix))
    return [v for v in samples.values[key] if v is not None]


async def test_concurrency_sweep_against_vllm(vllm_server: Any) -> None:
    scenario = validate_scenario(
        {
            "model": "tiny-llama",
            "pool": {"endpoints": [{"url": vllm_server.url, "kind": "openai"}]},
            "workloads": [
                {
                    "prompt_tokens": 16,
                    "max_tokens": 24,
                    "stream": True,
                    "options": {"ignore_eos": True, "temperature": 0},
                }
            ],
            "schedules": [{"kind": "concurrency", "levels": [1, 4, 8], "requests": 16}],
            "warmup": {"requests": 0},  # every token vLLM makes is in the result
            "samplers": {"interval_s": 0.1},
        }
    )
    result = await run_scenario(scenario)
    assert [p.concurrency for p in result.phases] == [1, 4, 8]
    s = result.summary
    assert s.failed == 0 and s.completed == len(result.requests) == 48
    for r in result.requests:
        assert r.output_tokens == 24  # vLLM's usage for each call
        assert sum(r.derived().tokens) == 24  # per-chunk counts from continuous usage
    metrics = next(x for x in result.samples if x.name.startswith("metrics@"))
    assert metrics.available, metrics.reason
    generated = series(metrics, GENERATED)
    assert generated[-1] - generated[0] == s.total_output_tokens == 48 * 24
    # vLLM's gauges are on the run's timeline (their values depend on timing: not asserted).
    for gauge in (RUNNING, "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert len(series(metrics, gauge)) == len(metrics.times_ns) >= 3, gauge
    assert metrics.times_ns[0] <= result.phases[0].t_start_ns
    assert metrics.times_ns[-1] >= result.phases[-1].t_end_ns
    # Reported, not asserted: output tokens/s per concurrency level (continuous batching).
    for phase in result.phases:
        print(f"c={phase.concurrency}: {phase.summary.output_throughput:.0f} output tok/s")
