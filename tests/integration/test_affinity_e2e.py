"""Affinity, the routing decision, prompt-cache hits and the scraped load signal, over real
HTTP against FakeEngines, with both drivers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Literal

import httpx
import pytest

from shared_ollama import CallRecord, Endpoint, HealthPolicy, PoolConfig, ScrapePolicy
from shared_ollama.testing import FakeEngine, TimingModel
from tests.conftest import FAST

MODEL = "fake-llama"
CACHING = TimingModel(
    ttft_base_s=0.001, ttft_per_prompt_token_s=0.0, itl_s=0.0005, default_max_tokens=4,
    prefix_cache_tokens=100_000, prefix_block_tokens=4,
)  # fmt: skip
#: Holds a slot until the client goes away: load from "another client".
STUCK = TimingModel(ttft_base_s=600.0, ttft_per_prompt_token_s=0.0)


@asynccontextmanager
async def engines(n: int, timing: TimingModel, **kw: Any) -> AsyncIterator[list[FakeEngine]]:
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                FakeEngine(kind="openai", models=(MODEL,), timing=timing, **kw)
            )
            for _ in range(n)
        ]


def endpoints(engs: list[FakeEngine]) -> list[Endpoint]:
    return [Endpoint(e.url, kind="openai", name=f"e{i}") for i, e in enumerate(engs)]


async def test_sessions_stick_across_turns(make_driver: Any) -> None:
    records: list[CallRecord] = []
    async with (
        engines(4, CACHING) as engs,
        make_driver(endpoints(engs), strategy="affinity", listeners=[records.append]) as d,
    ):
        homes: dict[str, set[str]] = {}
        history: dict[str, list[dict[str, str]]] = {}
        for turn in range(4):
            for user in ("ann", "bob", "cyd", "dan", "eve", "fay"):
                msgs = history.setdefault(user, [{"role": "system", "content": "be brief"}])
                msgs.append({"role": "user", "content": f"{user} asks question {turn} " * 8})
                r = await d.call("chat", MODEL, msgs, session=f"user:{user}")
                msgs.append({"role": "assistant", "content": r.message.content})
                assert r.routing is not None
                # A new session is placed within its share of the open ones (maybe past its
                # ring's first choice: "spill"); every later turn goes home.
                assert r.routing.reason in (("affinity",) if turn else ("affinity", "spill"))
                assert set(r.routing.candidates) == {"e0", "e1", "e2", "e3"}
                assert r.endpoint == engs[int(r.routing.endpoint[1:])].url
                homes.setdefault(user, set()).add(r.routing.endpoint)
                if turn:  # the endpoint saw this conversation's prefix: its cache served it
                    assert r.usage.cached_tokens is not None and r.usage.cached_tokens > 0
        assert all(len(h) == 1 for h in homes.values()), homes
        assert len({next(iter(h)) for h in homes.values()}) > 1  # sessions spread out
        # The same session in a stream: same endpoint, the decision on the last chunk.
        chunks = await d.stream("chat", MODEL, history["ann"], session="user:ann")
        assert chunks[-1].routing.endpoint in homes["ann"]
        assert chunks[-1].routing.reason == "affinity"
        # Records carry the decision and the cache hits; only a hash of the session.
        assert len(records) == 25
        keys = {rec.routing.key for rec in records if rec.routing is not None}
        assert len(keys) == 6
        assert all("ann" not in repr(rec) for rec in records)
        assert any((rec.cached_tokens or 0) > 0 for rec in records)


async def test_prefix_key_without_session_and_generate(make_driver: Any) -> None:
    async with engines(3, CACHING) as engs, make_driver(endpoints(engs), strategy="affinity") as d:
        where = set()
        system = {"role": "system", "content": "you are a pirate"}
        for turn in range(3):
            msgs = [system, {"role": "user", "content": "first question"}]
            msgs += [{"role": "user", "content": f"follow-up {i}"} for i in range(turn)]
            r = await d.call("chat", MODEL, msgs)
            where.add(r.routing.endpoint)
        assert len(where) == 1
        first = await d.call("generate", MODEL, "a long shared document " * 40 + "question 1")
        again = await d.call("generate", MODEL, "a long shared document " * 40 + "question 2")
        assert first.routing.endpoint == again.routing.endpoint
        assert first.routing.key == again.routing.key is not None
        # Other strategies ignore keys; they still say why.
        embedded = await d.call("embed", MODEL, "x")
        assert embedded.routing.reason in {"least_loaded", "loaded_model"}


async def test_failover_is_recorded(make_driver: Any) -> None:
    async with engines(2, FAST) as engs, make_driver(endpoints(engs), strategy="affinity") as d:
        first = await d.call("chat", MODEL, [{"role": "user", "content": "hi"}], session="s")
        home = next(e for e, ep in zip(engs, endpoints(engs), strict=True)
                    if ep.display_name == first.routing.endpoint)  # fmt: skip
        home.faults.fail(500, times=1)
        r = await d.call("chat", MODEL, [{"role": "user", "content": "hi"}], session="s")
        assert r.attempts == 2
        assert r.routing.reason == "failover" and r.routing.endpoint != first.routing.endpoint


async def _hold(eng: FakeEngine, n: int) -> tuple[httpx.AsyncClient, list[asyncio.Task[Any]]]:
    """``n`` requests from another client that stay in the engine (running or queued)."""
    other = httpx.AsyncClient(base_url=eng.url, timeout=None)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    tasks = [asyncio.create_task(other.post("/v1/chat/completions", json=body)) for _ in range(n)]
    await eng.await_stats(lambda s: s.in_flight + s.queued == n)
    return other, tasks


async def test_scraped_server_load_changes_the_signal(make_driver: Any) -> None:
    scrape = PoolConfig(scrape=ScrapePolicy(interval_s=0.02, tau_s=60))
    async with (
        FakeEngine(kind="openai", models=(MODEL,), timing=STUCK, slots=2) as busy_eng,
        FakeEngine(kind="openai", models=(MODEL,), timing=FAST) as idle_eng,
    ):
        other, tasks = await _hold(busy_eng, 5)
        try:
            eps = endpoints([busy_eng, idle_eng])
            health = HealthPolicy(interval_s=60)
            async with make_driver(eps, config=scrape, health=health) as d:
                # The scrape loop is sequential: once the server sees a third scrape, the
                # second has been read into the pool.
                await busy_eng.await_stats(lambda s: s.requests.get("/metrics", 0) >= 3)
                busy, idle = d.client.pool_status()
                assert (busy.server_running, busy.server_waiting) == (2.0, 3.0)
                assert busy.server_load_source == "/metrics"
                assert busy.server_load_age_s is not None and busy.server_load_age_s < 60
                assert busy.load > 4.0 and busy.in_flight == 0
                assert idle.load == 0.0
                # least_loaded sees the other clients' load: every call goes to the idle one.
                for _ in range(6):
                    r = await d.call("chat", MODEL, [{"role": "user", "content": "q"}])
                    assert r.routing.endpoint == "e1"
                    assert r.routing.reason in {"least_loaded", "only_candidate"}
                # The other client leaves: the next scrapes say so.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await other.aclose()
                await busy_eng.await_stats(lambda s: s.in_flight + s.queued == 0)
                seen = busy_eng.stats().requests.get("/metrics", 0)
                await busy_eng.await_stats(lambda s: s.requests.get("/metrics", 0) >= seen + 2)
                busy, _ = d.client.pool_status()
                assert (busy.server_running, busy.server_waiting) == (0.0, 0.0)
                assert busy.load == 0.0
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await other.aclose()


async def test_scrape_off_by_config(make_driver: Any) -> None:
    off = PoolConfig(scrape=ScrapePolicy(enabled=False))
    health = HealthPolicy(interval_s=0.02)
    async with (
        engines(1, FAST) as engs,
        make_driver(endpoints(engs), config=off, health=health) as d,
    ):
        # Health probes run (three of them), and never a scrape.
        await engs[0].await_stats(lambda s: s.requests.get("/health", 0) >= 3)
        assert "/metrics" not in engs[0].stats().requests
        assert d.client.pool_status()[0].server_running is None


@pytest.mark.parametrize("kind", ["ollama", "tgi"])
async def test_other_kinds_scrape_their_own_routes(
    make_driver: Any, kind: Literal["ollama", "tgi"]
) -> None:
    scrape = PoolConfig(scrape=ScrapePolicy(interval_s=0.02))
    async with FakeEngine(kind=kind, models=(MODEL,), timing=FAST) as eng:
        ep = Endpoint(eng.url, kind=kind, name="only")
        async with make_driver([ep], config=scrape, health=HealthPolicy(interval_s=60)) as d:
            route = "/api/ps" if kind == "ollama" else "/metrics"
            await eng.await_stats(lambda s: s.requests.get(route, 0) >= 4)
            status = d.client.pool_status()[0]
            if kind == "tgi":
                assert (status.server_running, status.server_waiting) == (0.0, 0.0)
            else:
                assert status.server_running is None  # Ollama says only what is loaded
