"""The FakeEngine's prefix cache: blocks, LRU eviction, TTFT of uncached tokens, counters, and
the cache hits each protocol reports (openai: usage and llama-server timings; others: none)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from shared_ollama.testing import FakeEngine, TimingModel
from shared_ollama.testing._prefix_cache import PrefixCache
from shared_ollama.testing._tokens import chat_ids

from .conftest import EngineFactory, fast_timing

BLOCK = 16


def words(n: int, tag: str) -> str:
    """``n`` distinct words; ``tag`` keeps two texts from sharing any word."""
    return " ".join(f"{tag}{i}" for i in range(n))


def client_for(engine: FakeEngine) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{engine.url}/v1", api_key="unused", max_retries=0)


def cached_timing(capacity: int = 100_000, **changes: float) -> TimingModel:
    return fast_timing(prefix_cache_tokens=capacity, prefix_block_tokens=BLOCK, **changes)


# -- the cache alone ---------------------------------------------------------------------------


def test_hits_count_whole_shared_blocks_only() -> None:
    cache = PrefixCache()
    first = list(range(100))
    assert cache.lookup("m", first, 10_000, BLOCK).cached == 0
    # Shares 40 tokens: two whole blocks (32 tokens); the third block differs at token 40.
    second = first[:40] + [-1] * 60
    assert cache.lookup("m", second, 10_000, BLOCK).cached == 32
    # The same prompt again: every whole block but the one ending on the last token.
    assert cache.lookup("m", first, 10_000, BLOCK).cached == 96
    assert cache.lookup("m", first[:64], 10_000, BLOCK).cached == 48
    # Another model shares nothing.
    assert cache.lookup("other", first, 10_000, BLOCK).cached == 0


def test_a_block_hits_only_after_the_same_prefix() -> None:
    cache = PrefixCache()
    cache.lookup("m", list(range(64)), 10_000, BLOCK)
    moved = [-1] * BLOCK + list(range(BLOCK, 64))  # same later blocks, another first block
    assert cache.lookup("m", moved, 10_000, BLOCK).cached == 0


def test_least_recently_used_prompts_are_evicted_first() -> None:
    cache = PrefixCache()
    capacity = 4 * BLOCK  # room for two prompts of two blocks
    a, b, c = ([k] * 2 * BLOCK + [0] for k in (1, 2, 3))
    cache.lookup("m", a, capacity, BLOCK)
    cache.lookup("m", b, capacity, BLOCK)
    assert cache.lookup("m", a, capacity, BLOCK).cached == 2 * BLOCK  # a is now the newest
    hit = cache.lookup("m", c, capacity, BLOCK)  # evicts b, the least recently used
    assert hit == type(hit)(cached=0, evicted=2 * BLOCK)
    assert len(cache) == 4
    assert cache.lookup("m", a, capacity, BLOCK).cached == 2 * BLOCK
    assert cache.lookup("m", b, capacity, BLOCK).cached == 0


def test_eviction_trims_a_prompt_from_its_tail() -> None:
    cache = PrefixCache()
    long = list(range(5 * BLOCK + 1))
    # Room for three blocks: the prompt's first three stay, so its prefix still hits.
    assert cache.lookup("m", long, 3 * BLOCK, BLOCK).evicted == 2 * BLOCK
    assert cache.lookup("m", long, 3 * BLOCK, BLOCK).cached == 3 * BLOCK


def test_no_capacity_means_no_cache() -> None:
    cache = PrefixCache()
    ids = list(range(80))
    cache.lookup("m", ids, 1000, BLOCK)
    assert cache.lookup("m", ids, 0, BLOCK).cached == 0
    assert len(cache) == 0


def test_chat_ids_match_the_chat_token_count() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a b c"}]
    assert len(chat_ids(messages)) == (2 + 3) + (3 + 3)
    swapped = [{"role": "user", "content": "be brief"}, messages[1]]
    assert chat_ids(swapped)[:3] != chat_ids(messages)[:3]  # the role is part of the prompt


# -- the engine --------------------------------------------------------------------------------


def test_openai_reports_cache_hits_as_vllm_and_llama_server(make_engine: EngineFactory) -> None:
    engine = make_engine("openai", timing=cached_timing())
    client = client_for(engine)
    system = {"role": "system", "content": words(100, "s")}

    def ask(question: str) -> openai.types.chat.ChatCompletion:
        messages = [system, {"role": "user", "content": question}]
        return client.chat.completions.create(model="fake-llama", messages=messages)  # type: ignore[arg-type]

    first, second = ask(words(20, "q")), ask(words(20, "r"))
    prompt = 103 + 23
    for reply in (first, second):
        assert reply.usage is not None and reply.usage.prompt_tokens == prompt
    assert first.usage and first.usage.prompt_tokens_details
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # The system message (103 tokens) and the user marker tokens: 6 whole blocks (96).
    assert second.usage and second.usage.prompt_tokens_details
    assert second.usage.prompt_tokens_details.cached_tokens == 96
    timings = (second.model_extra or {})["timings"]
    assert (timings["cache_n"], timings["prompt_n"]) == (96, prompt - 96)
    stats = engine.stats
    assert (stats.cached_tokens, stats.prompt_tokens) == (96, 2 * prompt)


def test_openai_stream_usage_chunk_carries_the_hits(make_engine: EngineFactory) -> None:
    engine = make_engine("openai", timing=cached_timing())
    client = client_for(engine)
    prompt = words(70, "p")
    client.completions.create(model="fake-llama", prompt=prompt, max_tokens=2)
    chunks = list(
        client.completions.create(
            model="fake-llama",
            prompt=prompt,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 64
    assert (chunks[-1].model_extra or {})["timings"]["cache_n"] == 64
    # Without include_usage, llama-server's timings ride on the finishing chunk.
    plain = list(client.completions.create(model="fake-llama", prompt=prompt, stream=True))
    assert (plain[-1].model_extra or {})["timings"]["cache_n"] == 64
    assert engine.stats.cached_tokens == 128


def test_no_cache_by_default_and_no_cache_fields(make_engine: EngineFactory) -> None:
    engine = make_engine("openai")
    client = client_for(engine)
    prompt = words(70, "p")
    for _ in range(2):
        reply = client.completions.create(model="fake-llama", prompt=prompt, max_tokens=2)
        assert reply.usage is not None and reply.usage.prompt_tokens_details is None
        assert "timings" not in (reply.model_extra or {})
    assert engine.stats.cached_tokens == 0


@pytest.mark.parametrize("kind", ["ollama", "tgi"])
def test_ollama_and_tgi_cache_but_report_nothing(make_engine: EngineFactory, kind: str) -> None:
    engine = make_engine(kind, timing=cached_timing())
    prompt = words(50, "w")
    path, body = {
        "ollama": ("/api/generate", {"model": "fake-llama", "prompt": prompt, "stream": False}),
        "tgi": ("/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 2}}),
    }[kind]
    replies = [httpx.post(engine.url + path, json=body, timeout=10).json() for _ in range(2)]
    assert not any("cache" in str(key) for r in replies for key in r)
    assert engine.stats.cached_tokens == 48


def test_ttft_grows_with_uncached_tokens(make_engine: EngineFactory) -> None:
    per_token = 0.0005
    engine = make_engine("openai", timing=cached_timing(ttft_per_prompt_token_s=per_token))
    client = client_for(engine)

    def ttft(prompt: str) -> float:
        start = time.perf_counter()
        stream = client.completions.create(
            model="fake-llama", prompt=prompt, max_tokens=1, stream=True
        )
        next(iter(stream))
        elapsed = time.perf_counter() - start
        stream.close()
        return elapsed

    prompt = words(400, "t")
    cold = ttft(prompt)  # 400 tokens to compute
    warm = ttft(prompt)  # 16: everything but the block ending on the last token hits
    half = ttft(words(200, "t") + " " + words(200, "u"))  # 208 to compute
    # The timing model says 0.2 s, 0.008 s and 0.104 s of prefill; leave room for the
    # HTTP round trips, which are the same in all three.
    assert warm < cold / 3
    assert warm < half < cold
    assert engine.stats.cached_tokens == 384 + 192


def test_capacity_and_block_are_live_timing_fields(make_engine: EngineFactory) -> None:
    engine = make_engine("openai", timing=cached_timing(capacity=2 * BLOCK))
    client = client_for(engine)
    a, b = words(40, "a"), words(40, "b")
    for prompt in (a, b, a):  # each prompt's two blocks push the other's out
        client.completions.create(model="fake-llama", prompt=prompt, max_tokens=1)
    assert engine.stats.cached_tokens == 0
    assert engine.stats.cache_evicted_tokens == 4 * BLOCK
    # Over the admin route, as for an engine in another process.
    reply = httpx.post(f"{engine.url}/_fake/timing", json={"prefix_cache_tokens": 1000})
    assert reply.json()["prefix_cache_tokens"] == 1000
    client.completions.create(model="fake-llama", prompt=a, max_tokens=1)
    assert engine.stats.cached_tokens == 2 * BLOCK
    bad = httpx.post(f"{engine.url}/_fake/timing", json={"prefix_block_tokens": 0})
    assert bad.status_code == 400


def test_the_cli_takes_the_cache_fields() -> None:
    from shared_ollama.testing.__main__ import _parser

    args = _parser().parse_args(["--prefix-cache-tokens", "4096", "--prefix-block-tokens", "32"])
    assert (args.prefix_cache_tokens, args.prefix_block_tokens) == (4096, 32)


async def test_the_clients_cached_tokens_match_the_engines(make_engine: EngineFactory) -> None:
    from shared_ollama import Endpoint, SharedClient
    from shared_ollama.records import CallRecord

    from ..conftest import client_kwargs

    engine = make_engine("openai", timing=cached_timing())
    records: list[CallRecord] = []
    client = SharedClient(
        endpoints=[Endpoint(engine.url, kind="openai")],
        listeners=[records.append],
        **client_kwargs(),
    )
    system = {"role": "system", "content": words(60, "s")}
    async with client:
        for i in range(3):
            messages = [system, {"role": "user", "content": words(10, f"u{i}")}]
            await client.chat("fake-llama", messages, options={"num_predict": 2})
            stream = await client.chat("fake-llama", messages, stream=True)
            async for _ in stream:
                pass
    assert len(records) == 6
    cached = [r.cached_tokens for r in records]
    assert cached[0] == 0 and all(c is not None and c > 0 for c in cached[1:])
    assert sum(c or 0 for c in cached) == engine.stats.cached_tokens
    assert sum(r.input_tokens or 0 for r in records) == engine.stats.prompt_tokens
