"""The ``openai`` kind end to end against a REAL llama.cpp ``llama-server`` (tiny model).

The server is installed from PyPI and started by the test session (tests/realservers);
these tests run in CI and fail there (not skip) if it cannot start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from shared_ollama import (
    AuthError,
    ConnectError,
    Endpoint,
    NoEndpointAvailable,
    RetryPolicy,
    SharedClient,
)
from shared_ollama.aiohttp_client import AiohttpSharedClient
from shared_ollama.records import CallRecord
from tests.conftest import Driver
from tests.realservers.fixtures import LLAMA_API_KEY

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "hello there, how are you?"}]


def ep(server: Any, **kw: Any) -> Endpoint:
    return Endpoint(server.url, kind="openai", **kw)


async def test_chat_and_stream_usage(llama_server: Any, make_driver: Any) -> None:
    records: list[CallRecord] = []
    async with make_driver([ep(llama_server)], listeners=[records.append]) as d:
        r = await d.call("chat", model=MODEL, messages=MESSAGES, options={"num_predict": 12})
        chunks = await d.stream("chat", model=MODEL, messages=MESSAGES, options={"num_predict": 12})
    assert r.message.content and r.usage.output_tokens == 12
    assert r.usage.input_tokens and r.usage.input_tokens > 5
    assert r.done_reason == "length" and r.served_model
    assert r.endpoint == llama_server.url
    # Streaming usage arrives through stream_options.include_usage.
    assert chunks[-1].done and chunks[-1].usage.output_tokens == 12
    assert chunks[-1].usage.input_tokens == r.usage.input_tokens
    assert "".join(c.message.content for c in chunks)
    rec = records[-1]
    assert rec.stream and rec.ok and rec.output_tokens == 12
    assert len(rec.chunk_times_ns) == len(chunks) and rec.t_first_chunk_ns


async def test_generate_via_completions(llama_server: Any, make_driver: Any) -> None:
    async with make_driver([ep(llama_server)]) as d:
        r = await d.call(
            "generate", model=MODEL, prompt="Once upon a time", options={"num_predict": 8}
        )
        chunks = await d.stream(
            "generate", model=MODEL, prompt="Once upon a time", options={"num_predict": 8}
        )
    assert r.response and r.usage.output_tokens == 8 and r.usage.input_tokens
    assert chunks[-1].usage.output_tokens == 8


async def test_embeddings_and_listing(llama_server: Any, make_driver: Any) -> None:
    async with make_driver([ep(llama_server)]) as d:
        r = await d.call("embed", model=MODEL, input=["first text", "second text"])
        listing = await d.call("list")
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) > 8
    assert r.embeddings[0] != r.embeddings[1]
    assert MODEL in {m.served_model for m in listing.models}


async def test_usage_matches_the_servers_own_counts(llama_server: Any, make_driver: Any) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 9, "temperature": 0}
    raw = httpx.post(f"{llama_server.url}/v1/chat/completions", json=body, timeout=30).json()
    async with make_driver([ep(llama_server)]) as d:
        r = await d.call(
            "chat", model=MODEL, messages=MESSAGES, options={"num_predict": 9, "temperature": 0}
        )
    assert r.usage.input_tokens == raw["usage"]["prompt_tokens"]
    assert r.usage.output_tokens == raw["usage"]["completion_tokens"]
    assert r.message.content == raw["choices"][0]["message"]["content"]


async def test_api_key(llama_server_keyed: Any, make_driver: Any) -> None:
    wrong = ep(llama_server_keyed, api_key="sk-wrong-one")
    async with make_driver([wrong]) as d:
        with pytest.raises(AuthError) as err:
            await d.call("chat", model=MODEL, messages=MESSAGES, options={"num_predict": 2})
    assert err.value.status_code == 401
    assert "sk-wrong-one" not in str(err.value) and "sk-wrong-one" not in repr(err.value)
    assert err.value.attempts == 1  # 4xx is never retried
    right = ep(llama_server_keyed, api_key=LLAMA_API_KEY)
    assert LLAMA_API_KEY not in repr(right)
    async with make_driver([right]) as d:
        r = await d.call("chat", model=MODEL, messages=MESSAGES, options={"num_predict": 2})
    assert r.usage.output_tokens == 2


async def test_killed_server_gives_typed_error(
    llama_server_factory: Callable[..., Any], make_driver: Any
) -> None:
    server = llama_server_factory()
    async with make_driver(
        [ep(server)], retry=RetryPolicy(max_attempts=2, backoff_max_s=0.01)
    ) as d:
        r = await d.call("chat", model=MODEL, messages=MESSAGES, options={"num_predict": 2})
        assert r.usage.output_tokens == 2
        server.kill()
        with pytest.raises((ConnectError, NoEndpointAvailable)) as err:
            await d.call("chat", model=MODEL, messages=MESSAGES, options={"num_predict": 2})
    assert err.value.model == MODEL


async def _streams_then_calls(d: Driver) -> None:
    """40 streams, each followed by a plain call on the connection the stream left."""
    for _ in range(40):
        await d.stream("chat", model=MODEL, messages=MESSAGES, options={"num_predict": 2})
        await d.call("chat", model=MODEL, messages=MESSAGES, options={"num_predict": 2})


async def test_stale_keepalive_connections_cost_no_retry(
    llama_server: Any, make_driver: Any
) -> None:
    # llama-server closes the connection after each stream while advertising keep-alive;
    # the next request on that pooled connection must be re-sent silently, not retried.
    records: list[CallRecord] = []
    async with make_driver([ep(llama_server)], listeners=[records.append]) as d:
        await _streams_then_calls(d)
    assert len(records) == 80 and all(r.ok for r in records)
    assert [r.retries for r in records] == [0] * 80


async def test_stale_keepalive_connections_cost_no_retry_over_aiohttp(llama_server: Any) -> None:
    # The same over the bench's aiohttp driver, where reusing the connection the server is
    # closing mostly fails while writing the request ("Can not write request body"), not with
    # an EOF: a third of these calls failed with ConnectError before that counted as stale.
    records: list[CallRecord] = []
    endpoints = [ep(llama_server)]
    async with AiohttpSharedClient(endpoints, usage=False, listeners=[records.append]) as client:
        await _streams_then_calls(Driver(client))
    assert len(records) == 80 and all(r.ok for r in records)
    assert [r.retries for r in records] == [0] * 80


@pytest.mark.parametrize("client_class", [SharedClient, AiohttpSharedClient])
async def test_concurrent_streams_cost_no_retry(
    llama_server: Any, client_class: type[SharedClient]
) -> None:
    # Eight workers back to back (the bench's closed loop): each stream's connection is closed
    # by the server, so the pool holds several dead ones at once, and over aiohttp a request
    # sent once more through the pool took the next dead one. The second send opens a new
    # connection.
    records: list[CallRecord] = []
    endpoints = [ep(llama_server)]

    async def worker(client: SharedClient) -> None:
        for _ in range(6):
            stream = await client.chat(MODEL, MESSAGES, stream=True, options={"num_predict": 8})
            async for _ in stream:
                pass

    async with client_class(endpoints, usage=False, listeners=[records.append]) as client:
        await asyncio.gather(*(worker(client) for _ in range(8)))
    assert len(records) == 48 and all(r.ok for r in records)
    assert [r.retries for r in records] == [0] * 48
