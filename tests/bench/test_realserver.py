"""The bench against a REAL llama.cpp ``llama-server`` (tiny model, started by the session):
a short sweep whose token counts equal the server's own counts."""

from __future__ import annotations

from typing import Any

from shared_ollama.bench.scenario import validate_scenario
from shared_ollama.bench.session import run_scenario
from tests.realservers.fixtures import report_line

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
    # Not one retry either: llama-server closes a connection after each stream, and the
    # driver sends such a request again on a new connection instead (no attempt lost).
    assert s.retries == 0
    for r in result.requests:
        assert r.output_tokens == 8  # the server's usage for each call
        assert r.input_tokens and r.input_tokens > 12
        assert sum(r.derived().tokens) == 8
    # The server's own Prometheus counter over the run agrees with the bench's total.
    metrics = next(x for x in result.samples if x.name.startswith("metrics@"))
    assert metrics.available, metrics.reason
    counter = [v for v in metrics.values[PREDICTED] if v is not None]
    assert counter[-1] - counter[0] == s.total_output_tokens == 96


async def test_strategy_runs_do_not_share_the_servers_prompt_caches(
    llama_server_factory: Any,
) -> None:
    """The strategy A/B against a real server: each strategy's prompts start with a salt of
    their own, so the second strategy's first turns are not served from what the first one
    left in llama.cpp's prompt cache. Unsalted (the same prompts), they are: the check can
    fail. Token counts from the server, no timing."""
    from shared_ollama.bench.ab import strategy_scenarios

    server = llama_server_factory(test_flags=False, parallel=2, ctx_size=4096)
    base = validate_scenario(
        {
            "model": "tiny-llama",
            "pool": {"endpoints": [{"url": server.url, "kind": "openai"}]},
            "workloads": [
                {
                    "prompt_tokens": 40,
                    "max_tokens": 4,
                    "sessions": {"count": 4, "turns": 2, "system_tokens": 30, "systems": 4},
                }
            ],
            "schedules": [{"kind": "concurrency", "levels": [1]}],
            "warmup": {"requests": 0},
            "samplers": {"enabled": False},
            "calibrate": "off",
            "html": False,
        }
    )

    async def first_turns_cached(salted: bool) -> float:
        """The share of the second strategy's first-turn prompt tokens the server had cached."""
        scenarios = strategy_scenarios(base, ["least_loaded", "round_robin"])
        if not salted:
            scenarios = [s.model_copy(update={"prompt_salt": ""}) for s in scenarios]
        results = [await run_scenario(s) for s in scenarios]
        seen: set[str | None] = set()
        cached = prompt = 0
        for r in sorted(results[1].requests, key=lambda r: r.seq):
            if r.session in seen:
                continue
            seen.add(r.session)
            assert r.ok and r.cached_tokens is not None and r.input_tokens
            cached, prompt = cached + r.cached_tokens, prompt + r.input_tokens
        assert len(seen) == 4
        return cached / prompt

    salted = await first_turns_cached(True)  # first: its salts are new to the server
    unsalted = await first_turns_cached(False)
    report_line(
        "strategy A/B on llama-server, second strategy's first turns from the cache: "
        f"{salted:.2f} with a salt per strategy, {unsalted:.2f} without"
    )
    assert salted < 0.2 and unsalted > 0.8, (salted, unsalted)
