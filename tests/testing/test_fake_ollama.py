"""The ollama-kind FakeEngine, checked by the official `ollama` client and raw HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import ollama
import pytest

from shared_ollama.testing import FakeEngine, TimingModel

EngineFactory = Callable[..., FakeEngine]
TimingFactory = Callable[..., TimingModel]

MESSAGES = [{"role": "user", "content": "why is the sky blue"}]  # 5 words + 3


def test_chat(ollama_engine: FakeEngine) -> None:
    client = ollama.Client(host=ollama_engine.url)
    r = client.chat(model="fake-llama", messages=MESSAGES, options={"num_predict": 5})
    assert r.done and r.done_reason == "length"
    assert r.model == "fake-llama"
    assert r.message.role == "assistant"
    assert r.message.content is not None and len(r.message.content.split()) == 5
    assert r.eval_count == 5 and r.prompt_eval_count == 8
    assert r.total_duration is not None and r.load_duration is not None
    assert r.prompt_eval_duration is not None and r.eval_duration is not None
    assert r.total_duration >= r.load_duration + r.prompt_eval_duration + r.eval_duration


def test_chat_stream_matches_the_single_reply(ollama_engine: FakeEngine) -> None:
    client = ollama.Client(host=ollama_engine.url)
    options = {"num_predict": 6}
    chunks = list(client.chat(model="fake-llama", messages=MESSAGES, stream=True, options=options))
    assert [c.done for c in chunks] == [False] * 6 + [True]
    final = chunks[-1]
    assert final.message.content == "" and final.done_reason == "length" and final.eval_count == 6
    text = "".join(c.message.content or "" for c in chunks)
    single = client.chat(model="fake-llama", messages=MESSAGES, options=options)
    assert text == single.message.content


def test_generate_and_its_stream(ollama_engine: FakeEngine) -> None:
    client = ollama.Client(host=ollama_engine.url)
    r = client.generate(
        model="fake-llama", prompt="why is the sky blue", options={"num_predict": 4}
    )
    assert r.response is not None and len(r.response.split()) == 4
    assert r.context is not None and len(r.context) == 5 + 4
    assert r.prompt_eval_count == 5 and r.eval_count == 4
    parts = list(
        client.generate(
            model="fake-llama",
            prompt="why is the sky blue",
            stream=True,
            options={"num_predict": 4},
        )
    )
    assert len(parts) == 5 and parts[-1].done and parts[-1].context == r.context
    assert "".join(p.response or "" for p in parts) == r.response


def test_stream_is_the_default_on_the_wire(ollama_engine: FakeEngine) -> None:
    body = {"model": "fake-llama", "prompt": "hi", "options": {"num_predict": 3}}
    r = httpx.post(f"{ollama_engine.url}/api/generate", json=body)
    assert r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert [line["done"] for line in lines] == [False, False, False, True]
    final = lines[-1]
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration"):
        assert isinstance(final[key], int)
    assert final["eval_count"] == 3 and final["eval_duration"] > 0


def test_default_length_finishes_with_stop(
    make_engine: EngineFactory, timing: TimingFactory
) -> None:
    engine = make_engine("ollama", timing=timing(default_max_tokens=7))
    r = ollama.Client(host=engine.url).generate(model="fake-llama", prompt="hello")
    assert r.done_reason == "stop" and r.eval_count == 7


def test_embed_and_legacy_embeddings(ollama_engine: FakeEngine) -> None:
    client = ollama.Client(host=ollama_engine.url)
    r = client.embed(model="fake-llama", input=["one two", "three"])
    assert len(r.embeddings) == 2 and all(len(v) == 8 for v in r.embeddings)
    assert r.prompt_eval_count == 3
    assert sum(x * x for x in r.embeddings[0]) == pytest.approx(1.0)
    legacy = client.embeddings(model="fake-llama", prompt="one two")
    assert list(legacy.embedding) == pytest.approx(list(r.embeddings[0]))


def test_list_ps_show(ollama_engine: FakeEngine) -> None:
    client = ollama.Client(host=ollama_engine.url)
    listed = client.list().models
    assert [m.model for m in listed] == ["fake-llama:latest"]
    assert listed[0].details is not None and listed[0].details.family == "llama"
    assert client.ps().models == []  # nothing loaded yet
    client.generate(model="fake-llama", prompt="warm up", options={"num_predict": 1})
    running = client.ps().models
    assert [m.model for m in running] == ["fake-llama:latest"]
    assert running[0].size_vram and running[0].expires_at is not None
    shown = client.show("fake-llama")
    assert shown.details is not None and shown.details.quantization_level == "Q4_K_M"
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 4096


def test_load_only_and_unload(ollama_engine: FakeEngine) -> None:
    client = ollama.Client(host=ollama_engine.url)
    assert client.generate(model="fake-llama", prompt="").done_reason == "load"
    assert len(client.ps().models) == 1
    assert client.chat(model="fake-llama", messages=[], keep_alive=0).done_reason == "unload"
    assert client.ps().models == []


def test_first_request_pays_the_load(make_engine: EngineFactory, timing: TimingFactory) -> None:
    engine = make_engine("ollama", timing=timing(load_s=0.05))
    client = ollama.Client(host=engine.url)
    first = client.generate(model="fake-llama", prompt="a", options={"num_predict": 1})
    second = client.generate(model="fake-llama", prompt="a", options={"num_predict": 1})
    assert first.load_duration is not None and second.load_duration is not None
    assert first.load_duration >= 50_000_000 > second.load_duration


def test_unknown_model_is_404(ollama_engine: FakeEngine) -> None:
    client = ollama.Client(host=ollama_engine.url)
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="missing", messages=MESSAGES)
    assert info.value.status_code == 404
    assert info.value.error == 'model "missing" not found, try pulling it first'
    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.generate(model="missing", prompt="x", stream=True))
    assert streamed.value.status_code == 404


def test_tagged_and_untagged_names_match(make_engine: EngineFactory) -> None:
    engine = make_engine("ollama", models=("fake-llama", "qwen:0.5b"))
    client = ollama.Client(host=engine.url)
    assert [m.model for m in client.list().models] == ["fake-llama:latest", "qwen:0.5b"]
    r = client.generate(model="fake-llama:latest", prompt="x", options={"num_predict": 1})
    assert r.model == "fake-llama:latest"
    with pytest.raises(ollama.ResponseError):
        client.generate(model="qwen", prompt="x")  # qwen:latest is not served


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "missing request body"),
        (b"{not json", None),
        (b'{"prompt": "x"}', "model is required"),
    ],
)
def test_bad_requests_are_400(ollama_engine: FakeEngine, body: bytes, message: str | None) -> None:
    r = httpx.post(f"{ollama_engine.url}/api/generate", content=body)
    assert r.status_code == 400
    if message is not None:
        assert r.json() == {"error": message}


def test_root_version_and_unknown_route(ollama_engine: FakeEngine) -> None:
    assert httpx.get(ollama_engine.url).text == "Ollama is running"
    assert "version" in httpx.get(f"{ollama_engine.url}/api/version").json()
    missing = httpx.get(f"{ollama_engine.url}/metrics")
    assert missing.status_code == 404 and missing.text == "404 page not found"


async def test_async_client(ollama_engine: FakeEngine) -> None:
    client = ollama.AsyncClient(host=ollama_engine.url)
    r = await client.chat(model="fake-llama", messages=MESSAGES, options={"num_predict": 3})
    assert r.eval_count == 3
    stream = await client.generate(
        model="fake-llama", prompt="hi", stream=True, options={"num_predict": 2}
    )
    parts = [p async for p in stream]
    assert [p.done for p in parts] == [False, False, True]
    embedded = await client.embed(model="fake-llama", input="a b c")
    assert embedded.prompt_eval_count == 3
    with pytest.raises(ollama.ResponseError) as info:
        await client.show("missing")
    assert info.value.status_code == 404
