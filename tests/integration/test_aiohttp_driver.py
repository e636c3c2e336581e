"""``AiohttpSharedClient`` (the bench's driver): the same calls, errors and bounds as the httpx
interpreter, over real HTTP against the FakeEngines (every protocol) and a hostile server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from shared_ollama import (
    BreakerPolicy,
    ClientClosed,
    ConnectError,
    Endpoint,
    Limits,
    ProtocolError,
    RetryPolicy,
    ServerError,
    StreamInterrupted,
    Timeouts,
)
from shared_ollama.aiohttp_client import AiohttpSharedClient
from shared_ollama.errors import ConfigError, Timeout
from shared_ollama.testing import FakeEngine
from tests.conftest import MODEL, client_kwargs
from tests.hostile import HostileServer, http_reply

MESSAGES = [{"role": "user", "content": "hi there"}]


@asynccontextmanager
async def aio_client(engine: FakeEngine, **kw: Any) -> AsyncIterator[AiohttpSharedClient]:
    ep = Endpoint(engine.url, kind=engine.kind, models=[MODEL])
    async with AiohttpSharedClient(endpoints=[ep], **client_kwargs(**kw)) as client:
        yield client


async def test_calls_and_streams_on_every_protocol(engine: FakeEngine) -> None:
    async with aio_client(engine) as client:
        reply = await client.chat(MODEL, MESSAGES)
        assert reply.message.content and reply.usage.output_tokens
        chunks = [c async for c in await client.chat(MODEL, MESSAGES, stream=True)]
        assert chunks[-1].done and "".join(c.message.content for c in chunks)
        text = [c async for c in await client.generate(MODEL, "hello", stream=True)]
        assert text[-1].done and text[-1].usage is not None
        if engine.kind != "tgi":  # TGI serves no embeddings
            assert (await client.embed(MODEL, "hello")).embeddings[0]


async def test_faults_are_typed_and_retried_as_with_httpx(engine: FakeEngine) -> None:
    once = RetryPolicy(max_attempts=1)
    tolerant = BreakerPolicy(failure_threshold=100)
    async with aio_client(engine, retry=once, breaker=tolerant) as client:
        engine.faults.fail(500)
        with pytest.raises(ServerError):
            await client.chat(MODEL, MESSAGES)
        engine.faults.reset()
        with pytest.raises(ConnectError):
            await client.chat(MODEL, MESSAGES)
        engine.faults.truncate(1)
        with pytest.raises(ProtocolError):
            await client.chat(MODEL, MESSAGES)
        engine.faults.truncate(2)
        with pytest.raises(StreamInterrupted):
            async for _ in await client.chat(MODEL, MESSAGES, stream=True):
                pass
        engine.faults.delay_first_byte(5)
        with pytest.raises(Timeout) as caught:
            await client.chat(MODEL, MESSAGES, timeout=0.3)
        assert caught.value.phase == "total"
    async with aio_client(engine) as client:  # the default policy retries a 500
        engine.faults.fail(500, times=2)
        assert (await client.chat(MODEL, MESSAGES)).attempts == 3


async def test_an_abandoned_stream_and_close_in_flight(engine: FakeEngine) -> None:
    async with aio_client(engine) as client:
        chunks = await client.chat(MODEL, MESSAGES, stream=True)
        async for _ in chunks:
            break
        await chunks.aclose()
        assert (await client.chat(MODEL, MESSAGES)).done  # its connection was not reused
        delayed = engine.stats().faults_fired.get("delay_first_byte", 0)
        engine.faults.delay_first_byte(30, times=4)
        calls = [asyncio.ensure_future(client.chat(MODEL, MESSAGES)) for _ in range(4)]
        # Every call is inside its send (the server holds it) when the client closes.
        await engine.await_stats(lambda s: s.faults_fired.get("delay_first_byte", 0) >= delayed + 4)
        await client.aclose()
        ends = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(e, ClientClosed) for e in ends), ends


def test_an_oversized_body_is_refused_within_the_bound() -> None:
    big = json.dumps({"model": MODEL, "message": {"content": "x" * 200_000}}).encode()

    def respond(method: str, path: str) -> Any:
        if path == "/api/version":
            return http_reply(200, b'{"version": "0.9.0"}')
        return [http_reply(200, big)[:-1], big[-1:]]  # an undeclared-size body would do too

    async def run() -> BaseException:
        with HostileServer(respond) as server:
            ep = Endpoint(server.url, kind="ollama", models=[MODEL])
            limits = Limits(max_response_bytes=100_000)
            kw = client_kwargs(limits=limits, retry=RetryPolicy(max_attempts=1))
            async with AiohttpSharedClient(endpoints=[ep], **kw) as client:
                try:
                    await client.chat(MODEL, MESSAGES)
                except ProtocolError as exc:
                    return exc
        raise AssertionError("no error")

    error = asyncio.run(run())
    assert "larger than 100000 bytes" in str(error)


def test_a_trickled_stream_ends_at_its_deadline() -> None:
    """Bytes that never make a chunk do not keep a stream alive: the reads that find bytes
    already buffered (taken without a timer) still end at the phase's deadline."""
    line = b'data: {"model": "m", "choices": [{"index": 0, "text": "hi"}]}\n\n'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"

    def trickled() -> Iterator[bytes]:
        yield head
        for byte in line * 50:
            time.sleep(0.02)  # the hostile server's pacing: a line takes over a second
            yield bytes([byte])

    def respond(method: str, path: str) -> Any:
        if method == "GET":
            return http_reply(200, b'{"object": "list", "data": []}')
        return trickled()

    async def run() -> tuple[BaseException | None, int]:
        with HostileServer(respond) as server:
            ep = Endpoint(server.url, kind="openai", models=[MODEL])
            kw = client_kwargs(
                timeouts=Timeouts(first_chunk_s=0.5, between_chunks_s=0.5),
                retry=RetryPolicy(max_attempts=1),
            )
            chunks = 0
            async with AiohttpSharedClient(endpoints=[ep], **kw) as client:
                try:
                    async for _ in await client.generate(MODEL, "hi", stream=True):
                        chunks += 1
                except Timeout as exc:
                    return exc, chunks
        return None, chunks

    error, chunks = asyncio.run(run())
    assert isinstance(error, Timeout) and error.phase == "first_chunk"
    assert chunks == 0


def test_socks_proxies_and_httpx_transports_are_refused_with_a_config_error() -> None:
    with pytest.raises(ConfigError):
        AiohttpSharedClient(endpoints=[Endpoint("http://127.0.0.1:1")], transport=object())

    async def run() -> None:
        ep = Endpoint("http://127.0.0.1:1", kind="ollama", proxy="socks5://127.0.0.1:2")
        timeouts = Timeouts(no_endpoint_s=0.1)
        async with AiohttpSharedClient(endpoints=[ep], **client_kwargs(timeouts=timeouts)) as c:
            await c.chat(MODEL, MESSAGES)

    with pytest.raises(ConfigError):
        asyncio.run(run())
