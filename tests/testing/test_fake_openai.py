"""The openai-kind (vLLM-like) FakeEngine, checked by the official `openai` client and raw SSE."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from shared_ollama.testing import FakeEngine, TimingModel

EngineFactory = Callable[..., FakeEngine]
TimingFactory = Callable[..., TimingModel]
MESSAGES: list[Any] = [{"role": "user", "content": "why is the sky blue"}]  # 5 words + 3


def client_for(engine: FakeEngine, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{engine.url}/v1", api_key=api_key, max_retries=0)


def sse_events(text: str) -> list[Any]:
    """The data of each SSE event; "[DONE]" stays a string."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_chat(openai_engine: FakeEngine) -> None:
    r = client_for(openai_engine).chat.completions.create(
        model="fake-llama", messages=MESSAGES, max_tokens=5
    )
    assert r.object == "chat.completion" and r.model == "fake-llama"
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert choice.message.content is not None and len(choice.message.content.split()) == 5
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (8, 5, 13)


def test_chat_stream_with_usage(openai_engine: FakeEngine) -> None:
    client = client_for(openai_engine)
    chunks = list(
        client.chat.completions.create(
            model="fake-llama",
            messages=MESSAGES,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    content = chunks[1:-1]
    assert [c.choices[0].finish_reason for c in content] == [None, None, None, "length"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 4 and usage_chunk.usage.prompt_tokens == 8
    text = "".join(c.choices[0].delta.content or "" for c in content)
    single = client.chat.completions.create(model="fake-llama", messages=MESSAGES, max_tokens=4)
    assert text == single.choices[0].message.content


def test_stream_without_include_usage_has_no_usage(openai_engine: FakeEngine) -> None:
    body = {"model": "fake-llama", "messages": MESSAGES, "max_tokens": 2, "stream": True}
    r = httpx.post(f"{openai_engine.url}/v1/chat/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert len(events) == 1 + 2 + 1  # role chunk, two tokens, [DONE]


def test_continuous_usage_is_cumulative(openai_engine: FakeEngine) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {"model": "fake-llama", "prompt": "a b c", "max_tokens": 3, "stream": True}
    r = httpx.post(f"{openai_engine.url}/v1/completions", json={**body, "stream_options": options})
    events = sse_events(r.text)[:-1]
    assert [e["usage"]["completion_tokens"] for e in events] == [1, 2, 3, 3]
    assert all(e["usage"]["prompt_tokens"] == 3 for e in events)
    assert events[-1]["choices"] == []


def test_several_tokens_per_chunk(make_engine: EngineFactory, timing: TimingFactory) -> None:
    engine = make_engine("openai", timing=timing(tokens_per_chunk=3))
    stream = client_for(engine).chat.completions.create(
        model="fake-llama", messages=MESSAGES, max_tokens=7, stream=True
    )
    pieces = [c.choices[0].delta.content for c in stream][1:]
    assert [len((p or "").split()) for p in pieces] == [3, 3, 1]


def test_completions(openai_engine: FakeEngine) -> None:
    client = client_for(openai_engine)
    r = client.completions.create(model="fake-llama", prompt="the sky is", max_tokens=3)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert len(r.choices[0].text.split()) == 3
    assert r.usage is not None and r.usage.prompt_tokens == 3
    parts = list(
        client.completions.create(
            model="fake-llama", prompt="the sky is", max_tokens=3, stream=True
        )
    )
    assert "".join(p.choices[0].text for p in parts) == r.choices[0].text
    assert parts[-1].choices[0].finish_reason == "length"


def test_stop_string_ends_early(openai_engine: FakeEngine) -> None:
    client = client_for(openai_engine)
    full = client.completions.create(model="fake-llama", prompt="p", max_tokens=12)
    words = full.choices[0].text.split()
    stop = next(w for w in words[1:] if w != words[0])
    cut = client.completions.create(model="fake-llama", prompt="p", max_tokens=12, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == " ".join(words[: words.index(stop, 1)])


def test_embeddings_float_and_base64(openai_engine: FakeEngine) -> None:
    client = client_for(openai_engine)
    default = client.embeddings.create(model="fake-llama", input=["one two", "three"])
    floats = client.embeddings.create(
        model="fake-llama", input=["one two", "three"], encoding_format="float"
    )
    assert [d.index for d in default.data] == [0, 1]
    assert len(default.data[0].embedding) == 8
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, rel=1e-6)
    assert default.usage.prompt_tokens == 3


def test_models_list(make_engine: EngineFactory) -> None:
    engine = make_engine("openai", models=("a", "b"))
    assert [m.id for m in client_for(engine).models.list()] == ["a", "b"]


def test_errors_in_vllm_shape(openai_engine: FakeEngine) -> None:
    client = client_for(openai_engine)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="missing", messages=MESSAGES)
    assert missing.value.body == {
        "object": "error",
        "message": "The model `missing` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="fake-llama", messages=MESSAGES, max_tokens=5000)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="fake-llama", messages=MESSAGES, stream_options={"include_usage": True}
        )
    bad = httpx.post(f"{openai_engine.url}/v1/chat/completions", content=b"{nope")
    assert bad.status_code == 400 and bad.json()["type"] == "BadRequestError"
    unknown = httpx.get(f"{openai_engine.url}/v2/nothing")
    assert unknown.status_code == 404 and unknown.json() == {"detail": "Not Found"}


def test_api_key(make_engine: EngineFactory) -> None:
    engine = make_engine("openai", api_key="sekret")
    with pytest.raises(openai.AuthenticationError):
        client_for(engine, api_key="wrong").models.list()
    r = client_for(engine, api_key="sekret").chat.completions.create(
        model="fake-llama", messages=MESSAGES, max_tokens=1
    )
    assert r.choices[0].finish_reason == "length"
    assert httpx.get(f"{engine.url}/health").status_code == 200  # health stays public
    denied = httpx.post(f"{engine.url}/v1/completions", json={"prompt": "x"})
    assert denied.status_code == 401 and denied.json() == {"error": "Unauthorized"}


def test_health_and_metrics(openai_engine: FakeEngine) -> None:
    assert httpx.get(f"{openai_engine.url}/health").status_code == 200
    client_for(openai_engine).completions.create(model="fake-llama", prompt="a b", max_tokens=2)
    text = httpx.get(f"{openai_engine.url}/metrics").text
    metrics = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:")
    }
    assert metrics["vllm:num_requests_running"] == 0
    assert metrics["vllm:num_requests_waiting"] == 0
    assert metrics["vllm:prompt_tokens_total"] == 2
    assert metrics["vllm:generation_tokens_total"] == 2
    assert "vllm:gpu_cache_usage_perc" in metrics


async def test_async_client(openai_engine: FakeEngine) -> None:
    client = openai.AsyncOpenAI(base_url=f"{openai_engine.url}/v1", api_key="x", max_retries=0)
    r = await client.chat.completions.create(model="fake-llama", messages=MESSAGES, max_tokens=2)
    assert r.usage is not None and r.usage.completion_tokens == 2
    stream = await client.chat.completions.create(
        model="fake-llama", messages=MESSAGES, max_tokens=2, stream=True
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):
        await client.embeddings.create(model="missing", input="x")
    await client.close()
