"""The tgi-kind FakeEngine, checked by the official `text_generation` client and raw HTTP."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
import text_generation
from text_generation.errors import OverloadedError, ValidationError
from text_generation.types import FinishReason

from shared_ollama.testing import FakeEngine, TimingModel

EngineFactory = Callable[..., FakeEngine]
TimingFactory = Callable[..., TimingModel]
PROMPT = "why is the sky blue"  # 5 words
# text_generation 0.7.0 still calls pydantic's deprecated .dict().
pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")


def test_generate_with_details(tgi_engine: FakeEngine) -> None:
    r = text_generation.Client(tgi_engine.url).generate(PROMPT, max_new_tokens=5)
    assert r.details.finish_reason == FinishReason.Length
    assert r.details.generated_tokens == 5
    assert "".join(t.text for t in r.details.tokens) == r.generated_text
    assert all(not t.special for t in r.details.tokens)


def test_generate_stream(tgi_engine: FakeEngine) -> None:
    client = text_generation.Client(tgi_engine.url)
    events = list(client.generate_stream(PROMPT, max_new_tokens=4))
    assert len(events) == 4
    assert [e.generated_text is None for e in events] == [True, True, True, False]
    last = events[-1]
    assert last.details is not None and last.details.generated_tokens == 4
    assert last.details.finish_reason == FinishReason.Length
    assert last.generated_text == "".join(e.token.text for e in events)
    assert last.generated_text == client.generate(PROMPT, max_new_tokens=4).generated_text


def test_finish_reasons(make_engine: EngineFactory, timing: TimingFactory) -> None:
    engine = make_engine("tgi", timing=timing(default_max_tokens=6))
    url = f"{engine.url}/generate"
    body = {"inputs": PROMPT, "parameters": {"details": True}}
    free = httpx.post(url, json=body).json()
    assert free["details"]["finish_reason"] == "eos_token"
    assert free["details"]["generated_tokens"] == 6
    words = free["generated_text"].split()
    stop = next(w for w in words[1:] if w != words[0])
    body["parameters"] = {"details": True, "stop": [stop]}
    cut = httpx.post(url, json=body).json()
    assert cut["details"]["finish_reason"] == "stop_sequence"
    assert cut["generated_text"] == " ".join(words[: words.index(stop, 1)])


def test_generate_headers_and_details_flag(tgi_engine: FakeEngine) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
    r = httpx.post(f"{tgi_engine.url}/generate", json=body)
    assert set(r.json()) == {"generated_text"}  # details only when asked for
    headers = r.headers
    assert headers["x-compute-type"] == "gpu+optimized"
    assert headers["x-prompt-tokens"] == "5" and headers["x-generated-tokens"] == "3"
    assert headers["x-compute-characters"] == str(len(PROMPT))
    assert float(headers["x-compute-time"]) >= 0
    for name in ("x-total-time", "x-validation-time", "x-queue-time", "x-inference-time"):
        assert headers[name].isdigit()
    assert headers["x-time-per-token"].isdigit()


def test_compat_route_returns_a_list(tgi_engine: FakeEngine) -> None:
    r = httpx.post(tgi_engine.url, json={"inputs": "a b", "parameters": {"max_new_tokens": 2}})
    body = r.json()
    assert isinstance(body, list) and len(body) == 1
    assert body[0]["generated_text"].startswith("a b")  # full text is the default there
    stream = httpx.post(tgi_engine.url, json={"inputs": "a b", "stream": True})
    assert stream.headers["content-type"] == "text/event-stream"
    assert stream.text.startswith("data:{")


def test_validation_errors(tgi_engine: FakeEngine) -> None:
    client = text_generation.Client(tgi_engine.url)
    with pytest.raises(ValidationError, match="max_new_tokens"):
        client.generate(PROMPT, max_new_tokens=0)
    with pytest.raises(ValidationError, match="max_new_tokens"):
        list(client.generate_stream(PROMPT, max_new_tokens=0))
    r = httpx.post(
        f"{tgi_engine.url}/generate",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5000}},
    )
    assert r.status_code == 422
    assert r.json()["error_type"] == "validation"
    rejected = httpx.post(f"{tgi_engine.url}/generate", json={"prompt": "x"})
    assert rejected.status_code == 422 and "missing field `inputs`" in rejected.text


@pytest.fixture
def busy_tgi(make_engine: EngineFactory, timing: TimingFactory) -> Iterator[FakeEngine]:
    """A tgi engine with one slot, no queue, and that slot held by a generation."""
    engine = make_engine("tgi", slots=1, max_queue=0, timing=timing(ttft_base_s=60.0))

    def hold() -> None:
        # The engine drops this connection when the test stops it.
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{engine.url}/generate", json={"inputs": "x"}, timeout=None)

    holder = threading.Thread(target=hold)
    holder.start()
    engine.wait_stats(lambda s: s.in_flight == 1)
    yield engine
    engine.stop()
    holder.join()


def test_overloaded(busy_tgi: FakeEngine) -> None:
    client = text_generation.Client(busy_tgi.url)
    with pytest.raises(OverloadedError):
        client.generate(PROMPT)
    # TGI streams report it in the stream: the headers are already out.
    with pytest.raises(OverloadedError):
        list(client.generate_stream(PROMPT))
    r = httpx.post(f"{busy_tgi.url}/generate", json={"inputs": PROMPT})
    assert r.status_code == 429
    assert r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}


def test_info_health_models_and_unknown_route(tgi_engine: FakeEngine) -> None:
    info = httpx.get(f"{tgi_engine.url}/info").json()
    assert info["model_id"] == "fake-llama" and info["max_total_tokens"] == 4096
    for key in ("model_dtype", "max_input_tokens", "max_concurrent_requests", "version"):
        assert key in info
    assert httpx.get(f"{tgi_engine.url}/health").status_code == 200
    assert httpx.get(tgi_engine.url).status_code == 200
    models = httpx.get(f"{tgi_engine.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["fake-llama"]
    missing = httpx.get(f"{tgi_engine.url}/nothing")
    assert missing.status_code == 404 and missing.content == b""


def test_metrics(tgi_engine: FakeEngine) -> None:
    text_generation.Client(tgi_engine.url).generate(PROMPT, max_new_tokens=2)
    text = httpx.get(f"{tgi_engine.url}/metrics").text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if not line.startswith("#")
    }
    assert values["tgi_request_count"] == 1 and values["tgi_request_success"] == 1
    assert values["tgi_queue_size"] == 0 and values["tgi_batch_current_size"] == 0


def test_api_key(make_engine: EngineFactory) -> None:
    engine = make_engine("tgi", api_key="sekret")
    denied = httpx.post(f"{engine.url}/generate", json={"inputs": "x"})
    assert denied.status_code == 401 and denied.content == b""  # TGI sends a bare 401
    client = text_generation.Client(engine.url, headers={"Authorization": "Bearer sekret"})
    assert client.generate("x", max_new_tokens=1).details.generated_tokens == 1
    assert httpx.get(f"{engine.url}/info").status_code == 200


def test_messages_api(tgi_engine: FakeEngine) -> None:
    client = openai.OpenAI(base_url=f"{tgi_engine.url}/v1", api_key="-", max_retries=0)
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": PROMPT}
    ]
    r = client.chat.completions.create(model="tgi", messages=messages, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.system_fingerprint
    assert r.usage is not None and r.usage.prompt_tokens == 8 and r.usage.completion_tokens == 3
    chunks = list(
        client.chat.completions.create(
            model="tgi",
            messages=messages,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len(chunks) == 3
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length"
    assert last.usage is not None and last.usage.completion_tokens == 3


async def test_async_client(tgi_engine: FakeEngine) -> None:
    client = text_generation.AsyncClient(tgi_engine.url)
    r = await client.generate(PROMPT, max_new_tokens=2)
    assert r.details.generated_tokens == 2
    events = [e async for e in client.generate_stream(PROMPT, max_new_tokens=2)]
    assert events[-1].generated_text == r.generated_text


def test_stream_errors_arrive_as_events(tgi_engine: FakeEngine) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000, "stream": True}
    r = httpx.post(f"{tgi_engine.url}/v1/chat/completions", json=body)
    assert r.status_code == 200  # the headers left before validation, as in TGI
    events = [e.removeprefix("data:") for e in r.text.split("\n\n") if e]
    assert json.loads(events[0])["error_type"] == "validation"
    assert events[1:] == ["[DONE]"]
