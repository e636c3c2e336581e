"""Admission and adaptive concurrency over real HTTP against FakeEngines: classes ordered,
fair share fed by finished calls, shedding, bounded waits ending in ``Overloaded``, Ollama's
503 as backpressure, and an adaptive limit following the engine's slot count."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from shared_ollama import (
    Endpoint,
    InvalidRequest,
    Overloaded,
    PoolConfig,
    SharedClient,
    SyncSharedClient,
)
from shared_ollama.config import AdaptivePolicy, AdmissionPolicy, ServiceClass
from shared_ollama.records import CallRecord
from shared_ollama.testing import FakeEngine, TimingModel
from tests.conftest import client_kwargs

MODEL = "fake-llama"
MESSAGES = [{"role": "user", "content": "hi there"}]
# Long enough that waiters pile up behind a call while the test arranges them.
SLOW = TimingModel(ttft_base_s=0.05, ttft_per_prompt_token_s=0.0, itl_s=0.01,
                   default_max_tokens=10)  # fmt: skip


def capped_client(engine: FakeEngine, *, admission: AdmissionPolicy | None = None,
                  records: list[CallRecord] | None = None, **kw: Any) -> SharedClient:  # fmt: skip
    config = PoolConfig(admission=admission or AdmissionPolicy())
    ep = Endpoint(engine.url, kind=engine.kind, models=[MODEL], max_in_flight=1)
    listeners = [records.append] if records is not None else []
    return SharedClient(endpoints=[ep], config=config, listeners=listeners,
                        **client_kwargs(**kw))  # fmt: skip


async def queued(client: SharedClient | SyncSharedClient, n: int) -> None:
    """Until ``n`` calls wait in admission (each call is started before it is counted);
    polled, with a bound so that a call that never queues fails the test, not hangs it."""
    adm = client._pool.admission
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 20.0
    while len(adm.waiting(0.0)) < n:
        assert loop.time() < give_up, f"{n} calls never waited in admission"
        await asyncio.sleep(0.005)


async def hold_the_slot(d: Any, project: str = "holder") -> Callable[[], Awaitable[None]]:
    """Open a stream and take its first chunk: the endpoint's one slot stays held (the rest
    unread) until the returned function reads the stream out."""
    kw: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "stream": True,
                          "project": project}  # fmt: skip
    if d.sync:
        it = await asyncio.to_thread(d.client.chat, **kw)
        await asyncio.to_thread(next, it)

        async def finish_sync() -> None:
            await asyncio.to_thread(list, it)

        return finish_sync
    stream = await d.client.chat(**kw)
    await stream.__anext__()

    async def finish() -> None:
        async for _ in stream:
            pass

    return finish


def chat(client: SharedClient, project: str, service_class: str | None = None
         ) -> Callable[[], Coroutine[Any, Any, Any]]:  # fmt: skip
    async def run() -> Any:
        return await client.chat(model=MODEL, messages=MESSAGES, project=project,
                                 service_class=service_class)  # fmt: skip

    return run


async def test_classes_and_fair_share_order_who_gets_the_freed_slot(make_driver: Any) -> None:
    records: list[CallRecord] = []
    with FakeEngine(kind="ollama", models=(MODEL,), timing=SLOW, slots=4) as engine:
        capped = Endpoint(engine.url, kind="ollama", models=[MODEL], max_in_flight=1)
        async with make_driver([capped], listeners=[records.append]) as d:

            async def chat_as(project: str, cls: str | None = None) -> Any:
                return await d.call("chat", model=MODEL, messages=MESSAGES, project=project,
                                    service_class=cls)  # fmt: skip

            for _ in range(3):  # the flood project has used the pool already
                await chat_as("flood")
            records.clear()
            release = await hold_the_slot(d)
            tasks = []
            for project, cls in [("flood", None), ("flood", None), ("quiet", None),
                                 ("flood", "interactive")]:  # fmt: skip
                tasks.append(asyncio.ensure_future(chat_as(project, cls)))
                await queued(d.client, len(tasks))
            await release()
            await asyncio.gather(*tasks)
    order = [(r.project, r.request_id) for r in records]
    by_task = [r.project for r in records]
    # The holder; then the class ranks: interactive, then standard with the quiet project
    # (no usage yet) before the flood's own earlier calls.
    assert by_task == ["holder", "flood", "quiet", "flood", "flood"], order
    assert all(r.outcome == "ok" for r in records)


async def test_a_bounded_wait_ends_in_overloaded_naming_why() -> None:
    classes = {"standard": ServiceClass(rank=1), "quick": ServiceClass(rank=0, max_wait_s=0.2)}
    with FakeEngine(kind="openai", models=(MODEL,), timing=SLOW, slots=4) as engine:
        engine.faults.delay_first_byte(30.0)  # the slot's holder will not give it back
        async with capped_client(engine, admission=AdmissionPolicy(classes=classes)) as client:
            holder = asyncio.create_task(chat(client, "p")())
            await engine.await_stats(lambda s: s.faults_fired.get("delay_first_byte") == 1)
            with pytest.raises(Overloaded) as refused:
                await chat(client, "p", "quick")()
            assert not holder.done()  # refused while the slot was still held
            holder.cancel()
    msg = str(refused.value)
    assert "waited 0.2s for capacity" in msg and "class quick" in msg, msg
    assert refused.value.attempts == 0  # nothing was sent


async def test_sheddable_calls_are_refused_when_others_must_wait(make_driver: Any) -> None:
    with FakeEngine(kind="tgi", models=(MODEL,), timing=SLOW, slots=4) as engine:
        capped = Endpoint(engine.url, kind="tgi", models=[MODEL], max_in_flight=1)
        async with make_driver([capped]) as d:

            async def chat_as(cls: str | None = None) -> Any:
                return await d.call("chat", model=MODEL, messages=MESSAGES, service_class=cls)

            release = await hold_the_slot(d)
            batch = asyncio.ensure_future(chat_as("batch"))
            await queued(d.client, 1)
            standard = asyncio.ensure_future(chat_as("standard"))
            # The shed call is woken and refused at once, while the slot is still held (not
            # at the next release); bounded, so a call never refused fails the test.
            await asyncio.wait([batch], timeout=20)
            assert batch.done() and not standard.done()
            await release()
            results = await asyncio.gather(batch, standard, return_exceptions=True)
            assert d.client._pool.admission.shed_count == 1
    assert isinstance(results[0], Overloaded), results[0]
    assert "shed: class batch under overload" in str(results[0])
    assert not isinstance(results[1], BaseException)


async def test_unknown_service_class_is_invalid_request() -> None:
    with FakeEngine(kind="ollama", models=(MODEL,), timing=SLOW) as engine:
        async with capped_client(engine) as client:
            with pytest.raises(InvalidRequest, match="unknown service_class 'vip'"):
                await chat(client, "p", "vip")()
            assert "/api/chat" not in engine.stats().requests  # refused before sending


async def test_ollama_503_is_backpressure_not_a_broken_endpoint() -> None:
    records: list[CallRecord] = []
    fast = TimingModel(ttft_base_s=0.001, itl_s=0.0005, default_max_tokens=4)
    with FakeEngine(kind="ollama", models=(MODEL,), timing=fast) as busy, \
            FakeEngine(kind="ollama", models=(MODEL,), timing=fast) as calm:  # fmt: skip
        busy.faults.fail(503, times=2)
        eps = [Endpoint(busy.url, kind="ollama", models=[MODEL], priority=0),
               Endpoint(calm.url, kind="ollama", models=[MODEL], priority=1)]  # fmt: skip
        async with SharedClient(endpoints=eps, strategy="priority", listeners=[records.append],
                                **client_kwargs()) as client:  # fmt: skip
            await client.chat(model=MODEL, messages=MESSAGES)  # fails over to calm
        async with SharedClient(endpoints=eps[:1], listeners=[records.append],
                                **client_kwargs()) as client:  # fmt: skip
            await client.chat(model=MODEL, messages=MESSAGES)  # alone: waits the queue out
            status = client.pool_status()
    first, second = records
    assert [a.error_type for a in first.attempts] == ["Overloaded", None]
    assert [a.endpoint for a in first.attempts] == [busy.url, calm.url]
    assert [a.error_type for a in second.attempts] == ["Overloaded", None]
    assert {a.endpoint for a in second.attempts} == {busy.url}
    assert status[0].breaker == "closed" and status[0].failures == 0, status[0]


async def test_adaptive_limit_follows_the_engine_slot_count() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from shared_ollama.telemetry import Telemetry

    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    timing = TimingModel(ttft_base_s=0.005, ttft_per_prompt_token_s=0.0, itl_s=0.01,
                         default_max_tokens=10)  # fmt: skip
    # Slack well above this machine's scheduling jitter: only a real queue counts.
    policy = AdaptivePolicy(min_limit=1, max_limit=32, initial_limit=8, slack_s=0.05)
    with FakeEngine(kind="ollama", models=(MODEL,), timing=timing, slots=1) as engine:
        ep = Endpoint(engine.url, kind="ollama", models=[MODEL], max_in_flight="adaptive")
        config = PoolConfig(adaptive=policy)
        async with SharedClient(endpoints=[ep], config=config, telemetry=Telemetry(None, meters),
                                **client_kwargs()) as client:  # fmt: skip

            async def load(calls: int) -> None:
                left = [calls]

                async def worker() -> None:
                    while left[0] > 0:
                        left[0] -= 1
                        await client.chat(model=MODEL, messages=MESSAGES, stream=False)

                await asyncio.gather(*(worker() for _ in range(16)))

            def limit() -> int:
                (status,) = client.pool_status()
                assert status.adaptive and status.max_in_flight is not None
                return status.max_in_flight

            await load(120)
            low = limit()
            engine.slots = 12  # the server was given more parallel slots mid-run
            await load(240)
            high = limit()
            data = reader.get_metrics_data()
    assert low <= 3, low  # down from 8 toward the engine's 1 slot
    assert high >= 8 and high > low + 3, (low, high)  # up toward its 12
    assert data is not None
    gauges = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics
              for m in sm.metrics}  # fmt: skip
    points: list[Any] = list(gauges["shared_ollama.endpoint.concurrency_limit"].data.data_points)
    (point,) = points
    assert point.value == high


async def test_a_flood_of_waiters_costs_each_call_a_flat_number_of_looks() -> None:
    """A release wakes the best waiter, not every sleeping call: admission decisions per
    call stay flat with 4x as many calls waiting (waking all made them grow with the queue:
    800 calls on 4 slots cost 25 ms of CPU each)."""
    fast = TimingModel(ttft_base_s=0.0, ttft_per_prompt_token_s=0.0, itl_s=0.0,
                       default_max_tokens=2)  # fmt: skip

    async def looks_per_call(n: int) -> float:
        with FakeEngine(kind="ollama", models=(MODEL,), timing=fast) as engine:
            ep = Endpoint(engine.url, kind="ollama", models=[MODEL], max_in_flight=2)
            async with SharedClient(endpoints=[ep], **client_kwargs()) as client:
                adm = client._pool.admission
                before = adm.decisions
                await asyncio.gather(*(chat(client, "p")() for _ in range(n)))
                return (adm.decisions - before) / n

    small, large = await looks_per_call(50), await looks_per_call(200)
    assert large < 1.5 * small + 1, (small, large)
