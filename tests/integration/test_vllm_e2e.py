"""The ``openai`` kind against a REAL vLLM on CPU, and a mixed real/fake pool.

vLLM is installed into its own cached venv and started by the session (tests/realservers);
deselect locally with ``-m "not vllm"``. CI runs these and fails if vLLM cannot start.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from shared_ollama import (
    BreakerPolicy,
    Endpoint,
    InvalidRequest,
    ModelNotFound,
    SharedClient,
    SharedOllamaError,
)
from shared_ollama.records import CallRecord
from shared_ollama.testing import FakeEngine, TimingModel
from tests.conftest import client_kwargs
from tests.realservers.fixtures import DROP_TRIES, report_line

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "write about batching"}]
EXACT = {"num_predict": 10, "ignore_eos": True, "temperature": 0}


def ep(server: Any, **kw: Any) -> Endpoint:
    return Endpoint(server.url, kind="openai", **kw)


async def test_chat_generate_and_exact_counts(vllm_server: Any, make_driver: Any) -> None:
    records: list[CallRecord] = []
    async with make_driver([ep(vllm_server)], listeners=[records.append]) as d:
        r = await d.call("chat", model=MODEL, messages=MESSAGES, options=EXACT)
        g = await d.call("generate", model=MODEL, prompt="The pool", options=EXACT)
        chunks = await d.stream("chat", model=MODEL, messages=MESSAGES, options=EXACT)
        gchunks = await d.stream("generate", model=MODEL, prompt="The pool", options=EXACT)
    assert r.usage.output_tokens == 10 and r.usage.input_tokens
    assert r.done_reason == "length" and r.served_model == MODEL
    assert g.usage.output_tokens == 10
    assert chunks[-1].done and chunks[-1].usage.output_tokens == 10
    assert chunks[-1].usage.input_tokens == r.usage.input_tokens
    assert "".join(c.message.content for c in chunks) == r.message.content  # temperature 0
    assert gchunks[-1].usage.output_tokens == 10
    # vLLM's continuous usage stats give each chunk's own token count.
    stream_rec = records[2]
    known = [t for t in stream_rec.chunk_tokens if t is not None]
    assert sum(known) == 10


async def test_usage_equals_vllm_report(vllm_server: Any, make_driver: Any) -> None:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 7,
        "ignore_eos": True,
        "temperature": 0,
    }
    raw = httpx.post(f"{vllm_server.url}/v1/chat/completions", json=body, timeout=60).json()
    async with make_driver([ep(vllm_server)]) as d:
        r = await d.call(
            "chat",
            model=MODEL,
            messages=MESSAGES,
            options={"num_predict": 7, "ignore_eos": True, "temperature": 0},
        )
    assert r.usage.input_tokens == raw["usage"]["prompt_tokens"]
    assert r.usage.output_tokens == raw["usage"]["completion_tokens"] == 7


async def test_errors(vllm_server: Any, make_driver: Any) -> None:
    ghost = ep(vllm_server, models={"ghost": "not-served-here"})
    async with make_driver([ghost]) as d:
        with pytest.raises(ModelNotFound) as nf:
            await d.call("chat", model="ghost", messages=MESSAGES)
        assert nf.value.status_code == 404 and nf.value.server_message
        with pytest.raises(InvalidRequest) as bad:
            await d.call("chat", model=MODEL, messages=MESSAGES, options={"num_predict": 100_000})
    assert bad.value.status_code == 400 and bad.value.attempts == 1


def metric(url: str, name: str, label: str = "") -> float:
    """A vLLM metric summed over its label sets (optionally only those containing ``label``)."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and label in line
    )


async def until(pred: Any, timeout: float, what: str) -> None:
    """Poll the server's own gauges, bounded by a deadline."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_dropped_stream_aborts_server_side(vllm_server: Any) -> None:
    url = vllm_server.url
    finished = 'finished_reason="length"'

    def running() -> float:
        return metric(url, "vllm:num_requests_running")

    async with SharedClient(endpoints=[ep(vllm_server)], **client_kwargs()) as client:
        chunks = 0

        async def consume() -> None:
            nonlocal chunks
            stream = await client.generate(
                model=MODEL, prompt="Go on", stream=True, options={"num_predict": 2000}
            )
            async for _chunk in stream:
                chunks += 1

        # The drop is timed by the server's own gauges, not by the chunks that reached us (vLLM
        # has been seen holding a whole stream back until generation ended, docs/engines.md):
        # the caller gives up (cancels its task) once the server reports the request running
        # and less than half generated, whatever had arrived by then. A try that missed that
        # window is made again.
        for attempt in range(1, DROP_TRIES + 1):
            await until(lambda: running() == 0, 30, "running == 0")
            completed_before = metric(url, "vllm:request_success_total", finished)
            tokens_before = metric(url, "vllm:generation_tokens_total")
            chunks = 0
            task = asyncio.create_task(consume())
            await until(lambda t=task: running() == 1 or t.done(), 30, "the request to run")
            progress = metric(url, "vllm:generation_tokens_total") - tokens_before
            in_flight = running() == 1 and progress < 1000 and not task.done()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if in_flight:
                report_line(
                    f"vLLM SharedClient drop: try {attempt}, dropped at {progress:.0f} of 2000 "
                    f"tokens, {chunks} chunks had arrived"
                )
                break
        else:
            pytest.fail(f"no try of {DROP_TRIES} caught the request mid-generation")
        await until(lambda: running() == 0, 30, "running == 0")
    # Aborted: it never ran to its 2000 tokens (vLLM does not count client aborts).
    assert metric(url, "vllm:request_success_total", finished) == completed_before
    assert metric(url, "vllm:generation_tokens_total") - tokens_before < 2000


async def test_mixed_real_and_fake_pool_with_failover(
    vllm_server_factory: Callable[..., Any], llama_server: Any
) -> None:
    vllm = vllm_server_factory(omp_threads_bind="0")
    fast = TimingModel(ttft_base_s=0.001, itl_s=0.0005)
    with FakeEngine(kind="ollama", models=("fake-llama:latest",), timing=fast) as fake:
        eps = [
            Endpoint(vllm.url, kind="openai", models={"tiny": MODEL}),
            Endpoint(llama_server.url, kind="openai", models={"tiny": "tiny-llama"}),
            Endpoint(fake.url, kind="ollama", models={"tiny": "fake-llama:latest"}),
        ]
        records: list[CallRecord] = []
        kw = client_kwargs(
            strategy="round_robin", breaker=BreakerPolicy(failure_threshold=2, reset_timeout_s=60)
        )
        async with SharedClient(endpoints=eps, listeners=[records.append], **kw) as client:
            for i in range(9):
                r = await client.chat(
                    model="tiny",
                    messages=MESSAGES,
                    options={"num_predict": 4},
                    stream=False,
                    tags={"i": str(i)},
                )
                assert r.endpoint in {e.url for e in eps} and r.model == "tiny"
            served = Counter(r.endpoint for r in records)
            assert set(served) == {e.url for e in eps}  # every backend answered
            assert {r.served_model for r in records} == {MODEL, "tiny-llama", "fake-llama:latest"}
            vllm.kill()
            outcomes: Counter[str] = Counter()
            for _ in range(12):
                try:
                    await client.chat(model="tiny", messages=MESSAGES, options={"num_predict": 4})
                    outcomes["ok"] += 1
                except SharedOllamaError as exc:
                    outcomes[type(exc).__name__] += 1
            assert outcomes == {"ok": 12}  # failover hid the dead vLLM
            state = next(s for s in client.pool_status() if s.url == vllm.url)
            assert state.breaker == "open"
