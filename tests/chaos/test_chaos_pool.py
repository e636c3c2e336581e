"""Chaos: thousands of mixed calls through a faulty pool, over real HTTP.

Faults are injected at call-count milestones (never by sleeping): 5xx bursts, 429 with
Retry-After, Ollama's 503 overload, resets, slow first bytes, truncated streams, and an
endpoint killed and restarted mid-run; plus a real llama-server killed and restarted.
Invariants: every call succeeds or raises exactly one typed error, no stream token is
delivered twice, breakers open within their threshold and close after recovery, retries
stay within the budget, and the load spreads by strategy.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

from shared_ollama import (
    BreakerPolicy,
    Endpoint,
    HealthPolicy,
    RetryPolicy,
    SharedClient,
    SharedOllamaError,
    StreamInterrupted,
    SyncSharedClient,
    Timeouts,
    UsageConfig,
)
from shared_ollama.records import CallRecord
from shared_ollama.testing import FakeEngine, TimingModel

pytestmark = pytest.mark.slow

MODEL = "chaos-llama"
TIMING = TimingModel(
    ttft_base_s=0.0005, ttft_per_prompt_token_s=0.0, itl_s=0.0002, default_max_tokens=6
)
THRESHOLD = 4
BUDGET = RetryPolicy(
    max_attempts=3,
    backoff_initial_s=0.001,
    backoff_max_s=0.01,
    retry_after_cap_s=0.05,
    budget_ratio=0.5,
    budget_min=50,
    budget_window_s=3600,
)


@dataclass
class Tally:
    """What the callers saw, checked against the CallRecords."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    untyped: list[BaseException] = field(default_factory=list)
    duplicated_text: list[str] = field(default_factory=list)

    def calls(self) -> int:
        return self.ok + sum(self.errors.values())


def prompt_for(i: int) -> str:
    return f"chaos call number {i % 17} about pools"


def kw(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "project": "chaos",
        "health": HealthPolicy(enabled=False),
        "usage": UsageConfig(enabled=False),
        "retry": BUDGET,
        "breaker": BreakerPolicy(failure_threshold=THRESHOLD, reset_timeout_s=0.2),
        "timeouts": Timeouts(connect_s=1, first_chunk_s=0.5, between_chunks_s=1, total_s=5),
    }
    base.update(extra)
    return base


@pytest.fixture
def engines() -> Iterator[list[FakeEngine]]:
    kinds = ("ollama", "openai", "tgi", "ollama")
    started = [FakeEngine(kind=k, models=(MODEL,), timing=TIMING, slots=16) for k in kinds]  # type: ignore[arg-type]
    for eng in started:
        eng.start()
    yield started
    for eng in started:
        eng.stop()


def endpoints(engs: list[FakeEngine]) -> list[Endpoint]:
    return [Endpoint(e.url, kind=e.kind) for e in engs]  # type: ignore[arg-type]


def reference_texts(engs: list[FakeEngine]) -> dict[str, str]:
    """The deterministic reply per prompt (identical on every engine)."""
    with SyncSharedClient(endpoints=endpoints(engs[:1]), **kw()) as client:
        return {
            prompt_for(i): client.generate(model=MODEL, prompt=prompt_for(i)).response
            for i in range(17)
        }


def inject(engs: list[FakeEngine], wave: int) -> None:
    """The fault schedule: a different mix each wave."""
    ollama, openai, tgi, ollama2 = engs
    if wave == 0:
        ollama.faults.fail(500, times=15)
        openai.faults.fail(429, times=10, retry_after=0.02)
        tgi.faults.reset(times=8)
        ollama2.faults.fail(503, times=10)  # Ollama queue full: backpressure
    elif wave == 1:
        openai.faults.truncate(after_chunks=2, times=10)
        tgi.faults.delay_first_byte(1.0, times=5)  # past first_chunk_s: Timeout
        ollama.faults.malformed(times=5)
    elif wave == 2:
        ollama2.faults.truncate(after_chunks=0, times=10)  # before the first chunk: retried
        tgi.faults.fail(502, times=20)


async def one_call(
    client: SharedClient, i: int, texts: dict[str, str], tally: Tally, rng: random.Random
) -> None:
    prompt = prompt_for(i)
    stream = rng.random() < 0.5
    try:
        if stream:
            got = ""
            try:
                async for chunk in await client.generate(model=MODEL, prompt=prompt, stream=True):
                    got += chunk.response
            except StreamInterrupted as exc:
                if not texts[prompt].startswith(exc.partial_text) or exc.partial_text != got:
                    tally.duplicated_text.append(got)
                raise
            if got != texts[prompt]:
                tally.duplicated_text.append(got)
        else:
            r = await client.generate(model=MODEL, prompt=prompt)
            if r.response != texts[prompt]:
                tally.duplicated_text.append(r.response)
        tally.ok += 1
    except SharedOllamaError as exc:
        tally.errors[type(exc).__name__] += 1
    except BaseException as exc:  # anything else is a bug
        tally.untyped.append(exc)


async def run_wave(
    client: SharedClient,
    start: int,
    n: int,
    texts: dict[str, str],
    tally: Tally,
    concurrency: int = 24,
) -> None:
    rng = random.Random(start)
    sem = asyncio.Semaphore(concurrency)

    async def guarded(i: int) -> None:
        async with sem:
            await one_call(client, i, texts, tally, rng)

    await asyncio.gather(*(guarded(i) for i in range(start, start + n)))


def check_invariants(tally: Tally, records: list[CallRecord], calls: int) -> None:
    assert tally.untyped == []
    assert tally.duplicated_text == []
    assert tally.calls() == calls
    assert len(records) == calls  # one record per call, none lost or doubled
    assert len({r.request_id for r in records}) == calls
    by_outcome = Counter(r.error_type or "ok" for r in records)
    assert by_outcome["ok"] == tally.ok
    assert {k: v for k, v in by_outcome.items() if k != "ok"} == dict(tally.errors)


async def test_async_chaos_pool(engines: list[FakeEngine]) -> None:
    texts = reference_texts(engines)
    records: list[CallRecord] = []
    tally = Tally()
    victim = engines[0]
    async with SharedClient(
        endpoints=endpoints(engines), listeners=[records.append], **kw()
    ) as client:
        calls = 0
        for wave in range(3):
            inject(engines, wave)
            await run_wave(client, calls, 700, texts, tally)
            calls += 700

        # Kill one endpoint mid-run: its breaker opens within the threshold.
        victim.stop()
        opened_before = len(records)
        await run_wave(client, calls, 300, texts, tally)
        calls += 300
        state = next(s for s in client.pool_status() if s.url == victim.url)
        assert state.breaker == "open"
        victim_attempts = [
            a for r in records[opened_before:] for a in r.attempts if a.endpoint == victim.url
        ]
        # Failures reach the threshold, then the open breaker keeps calls away: beyond it
        # only calls already in flight when it opened (at most the 24 concurrent ones) and
        # one probe per half-open period.
        half_opens = sum(
            1
            for r in records[opened_before:]
            for e in r.events
            if e.endpoint == victim.url and e.new == "half_open"
        )
        assert THRESHOLD <= len(victim_attempts) <= THRESHOLD + 24 + half_opens
        opens = [
            e for r in records for e in r.events if e.endpoint == victim.url and e.new == "open"
        ]
        assert opens

        # Restart it: keep calling until a half-open probe closes the breaker (bounded).
        victim.restart()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            await run_wave(client, calls, 50, texts, tally)
            calls += 50
            state = next(s for s in client.pool_status() if s.url == victim.url)
            if state.breaker == "closed":
                break
        assert state.breaker == "closed"
        closes = [
            e for r in records for e in r.events if e.endpoint == victim.url and e.new == "closed"
        ]
        assert closes

    check_invariants(tally, records, calls)
    assert tally.ok > calls * 0.9
    # The retry budget caps the extra load: retries <= ratio x calls + minimum.
    retries = sum(r.retries for r in records)
    assert retries <= BUDGET.budget_ratio * calls + BUDGET.budget_min
    # Every fault kind really fired and was absorbed or typed.
    fired = sum(sum(e.stats().faults_fired.values()) for e in engines)
    assert fired >= 80


def test_sync_chaos_pool_threads(engines: list[FakeEngine]) -> None:
    texts = reference_texts(engines)
    records: list[CallRecord] = []
    tally = Tally()

    def call(client: SyncSharedClient, i: int) -> None:
        prompt = prompt_for(i)
        try:
            if i % 2:
                got = "".join(
                    c.response for c in client.generate(model=MODEL, prompt=prompt, stream=True)
                )
            else:
                got = client.generate(model=MODEL, prompt=prompt).response
            if got != texts[prompt]:
                tally.duplicated_text.append(got)
            tally.ok += 1
        except StreamInterrupted as exc:
            if not texts[prompt].startswith(exc.partial_text):
                tally.duplicated_text.append(exc.partial_text)
            tally.errors[type(exc).__name__] += 1
        except SharedOllamaError as exc:
            tally.errors[type(exc).__name__] += 1
        except BaseException as exc:
            tally.untyped.append(exc)

    with (
        SyncSharedClient(
            endpoints=endpoints(engines), listeners=[records.append], **kw()
        ) as client,
        ThreadPoolExecutor(8) as pool,
    ):
        calls = 0
        for wave in range(3):
            inject(engines, wave)
            list(pool.map(lambda i: call(client, i), range(calls, calls + 400)))
            calls += 400
    # Counter updates from threads: compare totals via records, which are authoritative.
    assert tally.untyped == [] and tally.duplicated_text == []
    assert len(records) == calls == len({r.request_id for r in records})
    assert sum(1 for r in records if r.ok) > calls * 0.9


@pytest.mark.parametrize(
    ("strategy", "check"),
    [
        ("round_robin", lambda c: max(c.values()) - min(c.values()) <= 1),
        ("least_loaded", lambda c: min(c.values()) >= 0.15 * sum(c.values())),
        ("weighted", lambda c: c[0] == 3 * c[1] == 3 * c[2] == 3 * c[3]),
    ],
)
async def test_load_spreads_by_strategy(
    engines: list[FakeEngine], strategy: str, check: Callable[[Counter[int]], bool]
) -> None:
    eps = endpoints(engines)
    if strategy == "weighted":
        eps = [e.model_copy(update={"weight": 3.0 if i == 0 else 1.0}) for i, e in enumerate(eps)]
    records: list[CallRecord] = []
    async with SharedClient(
        endpoints=eps, listeners=[records.append], **kw(strategy=strategy)
    ) as client:
        # 16 in flight: least-loaded then balances on in-flight counts, which the strategy
        # sees, rather than on latency samples, which depend on the machine.
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            async with sem:
                await client.generate(model=MODEL, prompt=prompt_for(i))

        await asyncio.gather(*(one(i) for i in range(600)))
    index = {e.url: i for i, e in enumerate(eps)}
    counts = Counter(index[r.endpoint] for r in records if r.endpoint)
    assert sum(counts.values()) == 600
    assert check(counts), counts


async def test_real_llama_server_killed_and_restarted(
    llama_server_factory: Callable[..., Any],
) -> None:
    real = llama_server_factory()
    with FakeEngine(kind="openai", models=("fake",), timing=TIMING) as fake:
        eps = [
            Endpoint(real.url, kind="openai", models={"tiny": "tiny-llama"}),
            Endpoint(fake.url, kind="openai", models={"tiny": "fake"}),
        ]
        records: list[CallRecord] = []
        outcomes: Counter[str] = Counter()
        async with SharedClient(
            endpoints=eps, listeners=[records.append], **kw(strategy="round_robin")
        ) as client:

            async def burst(n: int) -> None:
                for i in range(n):
                    try:
                        r = await client.chat(
                            model="tiny",
                            options={"num_predict": 4},
                            messages=[{"role": "user", "content": f"hi {i}"}],
                            stream=bool(i % 2),
                        )
                        if i % 2:
                            chunks = [c async for c in r]  # type: ignore[union-attr]
                            assert chunks[-1].done
                        outcomes["ok"] += 1
                    except SharedOllamaError as exc:
                        outcomes[type(exc).__name__] += 1

            await burst(20)
            served = Counter(r.endpoint for r in records)
            assert served[real.url] >= 8  # round robin really used the real server
            real.kill()
            await burst(30)
            state = next(s for s in client.pool_status() if s.url == real.url)
            assert state.breaker == "open"
            real.restart()
            deadline = time.monotonic() + 15
            while state.breaker != "closed" and time.monotonic() < deadline:
                await burst(5)
                state = next(s for s in client.pool_status() if s.url == real.url)
            assert state.breaker == "closed"
            before = len(records)
            await burst(10)
            assert any(r.endpoint == real.url and r.ok for r in records[before:])
    # Failover absorbed the dead server: every call succeeded (or was typed, never raw).
    assert outcomes["ok"] == sum(outcomes.values()), outcomes
