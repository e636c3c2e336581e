"""The bench against a REAL llama.cpp ``llama-server`` (tiny model, started by the session):
a short sweep whose token counts equal the server's own counts."""

from __future__ import annotations

from typing import Any

from shared_ollama.bench.scenario import validate_scenario
from shared_ollama.bench.session import run_scenario

PREDICTED = "llamacpp:tokens_predicted_total"


async def test_sweep_token_counts_equal_the_servers(llama_server: Any) -> None:
    scenario = validate_scenario(
        {
            "model": "tiny-llama",
            "pool": {"endpoints": [{"url": llama_server.url, "kind": "openai"}]},
            "workloads": [{"prompt_tokens": 12, "max_tokens": 8, "stream": True}],
            "schedules": [
                {
                    "kind": "sweep",
                    "points": 1,
                    "max_concurrency": 2,
                    "requests": 4,
                    "arrival": "constant",
                }
            ],
            "warmup": {"requests": 0},  # every token the server makes is in the result
            "samplers": {"interval_s": 0.2},
        }
    )
    result = await run_scenario(scenario)
    assert [p.mode for p in result.phases] == ["closed", "closed", "open"]
    s = result.summary
    assert s.completed == len(result.requests) == 12 and s.failed == 0
    for r in result.requests:
        assert r.output_tokens == 8  # the server's usage for each call
        assert r.input_tokens and r.input_tokens > 12
        assert sum(r.derived().tokens) == 8
    # The server's own Prometheus counter over the run agrees with the bench's total.
    metrics = next(x for x in result.samples if x.name.startswith("metrics@"))
    assert metrics.available, metrics.reason
    counter = [v for v in metrics.values[PREDICTED] if v is not None]
    assert counter[-1] - counter[0] == s.total_output_tokens == 96
