"""An endpoint's connections in httpx pools of 4 ("shards", see ``_transport``): under load
the calls spread over them, and every call gives its shard back however it ends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shared_ollama import (
    BreakerPolicy,
    Endpoint,
    RetryPolicy,
    SharedClient,
    SyncSharedClient,
    Timeouts,
)
from shared_ollama._transport import Connection, shard_limits
from shared_ollama.testing import FakeEngine
from tests.conftest import MODEL

MESSAGES = [{"role": "user", "content": "hi there"}]


def _abandon(client: SharedClient | SyncSharedClient) -> Any:
    """A stream whose caller stops after the first chunk."""
    if isinstance(client, SyncSharedClient):

        def stop() -> None:
            chunks = client.chat(MODEL, MESSAGES, stream=True)
            next(chunks)
            chunks.close()

        return asyncio.to_thread(stop)

    async def stop_async() -> None:
        chunks = await client.chat(MODEL, MESSAGES, stream=True)
        async for _ in chunks:
            break
        await chunks.aclose()

    return stop_async()


async def test_calls_spread_over_shards_and_every_shard_comes_back(
    engine: FakeEngine, make_driver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[int] = []
    take = Connection.take

    def spy(self: Connection) -> int:
        taken.append(take(self))
        return taken[-1]

    monkeypatch.setattr(Connection, "take", spy)
    ep = Endpoint(engine.url, kind=engine.kind, models=[MODEL], max_connections=10)
    once = RetryPolicy(max_attempts=1)
    # The faults must not open the breaker: the calls after them would wait for its probe.
    tolerant = BreakerPolicy(failure_threshold=100)
    async with make_driver([ep], retry=once, breaker=tolerant) as d:
        connection = d.client._http[ep.url]
        assert connection._room == [4, 4, 2]  # 10 connections: shards of 4, 4 and 2
        # The first six requests are held by the server a while, so more calls are in flight
        # at once than one shard holds (the sync driver runs six at a time). Failures of
        # every kind land on later calls: an error status, a reset before any byte, a reply
        # cut mid-body, a body that is not JSON.
        engine.faults.delay_first_byte(0.3, times=6)
        engine.faults.fail(500, times=3)
        engine.faults.reset(times=2)
        engine.faults.truncate(1, times=2)
        engine.faults.malformed(times=2)
        calls = [d.call("chat", MODEL, MESSAGES) for _ in range(16)]
        streams = [d.stream_collect("chat", MODEL, MESSAGES) for _ in range(8)]
        abandoned = [_abandon(d.client) for _ in range(4)]
        ends = await asyncio.gather(*calls, *streams, *abandoned, return_exceptions=True)
        failed = [e for e in ends if isinstance(e, BaseException)]
        failed += [e[1] for e in ends if isinstance(e, tuple) and e[1] is not None]
        assert failed, "no fault reached a call"
        assert connection._room == [4, 4, 2], connection._room
        # More calls were in flight than one shard holds: the later shards took some.
        assert taken.count(0) < len(taken) and max(taken) > 0, taken
        # Back to one at a time: the first shard (its connections warm) takes every call.
        del taken[:]
        for _ in range(5):
            await d.call("chat", MODEL, MESSAGES)
        assert taken == [0] * 5, taken
        assert connection._room == [4, 4, 2]


@pytest.mark.parametrize(
    ("connections", "keepalive", "expected"),
    [
        (64, None, [(4, 4)] * 16),
        (10, None, [(4, 4), (4, 4), (2, 2)]),
        (3, None, [(3, 3)]),
        (8, 2, [(4, 1), (4, 1)]),  # the allowance shared in proportion
        (8, 0, [(4, 0), (4, 0)]),
    ],
)
def test_shard_limits(connections: int, keepalive: int | None, expected: list[Any]) -> None:
    limits = shard_limits(connections, keepalive)
    assert [(lim.max_connections, lim.max_keepalive_connections) for lim in limits] == expected


def test_take_fills_the_first_shard_with_room_then_the_least_queued() -> None:
    connection = Connection(Endpoint("http://127.0.0.1:1"), Timeouts(), [None] * 3, [2, 2, 1])
    assert [connection.take() for _ in range(5)] == [0, 0, 1, 1, 2]
    assert [connection.take() for _ in range(3)] == [0, 1, 2]  # all full: spread the queue
    connection.give(1)
    connection.give(1)
    assert connection.take() == 1
