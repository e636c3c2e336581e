"""FakeEngine fault knobs, each observed by httpx on the wire; and client aborts."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from shared_ollama.testing import FakeEngine, TimingModel

EngineFactory = Callable[..., FakeEngine]
TimingFactory = Callable[..., TimingModel]
GENERATE = {"model": "fake-llama", "prompt": "why is the sky blue", "options": {"num_predict": 5}}
CHAT = {"model": "fake-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def test_fail_uses_the_engine_error_shape(make_engine: EngineFactory) -> None:
    shapes = {
        "ollama": ("/api/generate", GENERATE, {"error"}),
        "openai": ("/v1/chat/completions", CHAT, {"object", "message", "type", "param", "code"}),
        "tgi": ("/generate", {"inputs": "x"}, {"error", "error_type"}),
    }
    for kind, (path, body, keys) in shapes.items():
        engine = make_engine(kind)
        engine.faults.fail(503, times=2, retry_after=3)
        for _ in range(2):
            r = httpx.post(engine.url + path, json=body)
            assert r.status_code == 503 and r.headers["retry-after"] == "3"
            assert set(r.json()) == keys
        assert httpx.post(engine.url + path, json=body).status_code == 200
        assert engine.stats.faults_fired == {"fail": 2}


def test_fail_message_and_ollama_overload_text(ollama_engine: FakeEngine) -> None:
    url = f"{ollama_engine.url}/api/generate"
    ollama_engine.faults.fail(503)
    assert "maximum pending requests exceeded" in httpx.post(url, json=GENERATE).json()["error"]
    ollama_engine.faults.fail(500, message="boom")
    assert httpx.post(url, json=GENERATE).json() == {"error": "boom"}


def test_faults_without_path_spare_health_and_listings(ollama_engine: FakeEngine) -> None:
    ollama_engine.faults.fail(500)
    assert httpx.get(ollama_engine.url).status_code == 200
    assert httpx.get(f"{ollama_engine.url}/api/tags").status_code == 200
    assert len(ollama_engine.faults.pending()) == 1
    assert (
        httpx.post(
            f"{ollama_engine.url}/api/embed", json={"model": "fake-llama", "input": "x"}
        ).status_code
        == 500
    )


def test_path_filter_and_clear(ollama_engine: FakeEngine) -> None:
    ollama_engine.faults.fail(502, path="/api/tags")
    assert httpx.post(f"{ollama_engine.url}/api/generate", json=GENERATE).status_code == 200
    assert httpx.get(f"{ollama_engine.url}/api/tags").status_code == 502
    ollama_engine.faults.fail(502, times=5)
    ollama_engine.faults.clear()
    assert ollama_engine.faults.pending() == []
    assert httpx.post(f"{ollama_engine.url}/api/generate", json=GENERATE).status_code == 200


def test_reset_is_a_connection_reset(make_engine: EngineFactory) -> None:
    for kind, path, body in [
        ("ollama", "/api/generate", GENERATE),
        ("openai", "/v1/chat/completions", CHAT),
        ("tgi", "/generate", {"inputs": "x"}),
    ]:
        engine = make_engine(kind)
        engine.faults.reset()
        with pytest.raises(httpx.ReadError) as info:
            httpx.post(engine.url + path, json=body)
        assert isinstance(info.value.__context__, ConnectionResetError) or "reset" in str(
            info.value
        )
        assert httpx.post(engine.url + path, json=body).status_code == 200
        assert engine.stats.faults_fired == {"reset": 1}


def test_delay_first_byte(ollama_engine: FakeEngine) -> None:
    ollama_engine.faults.delay_first_byte(30)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{ollama_engine.url}/api/generate", json=GENERATE, timeout=httpx.Timeout(5, read=0.2)
        )
    # The delayed request was abandoned by its client: its handler ends, nothing is left.
    stats = ollama_engine.wait_stats(lambda s: s.requests_aborted == 1)
    assert stats.in_flight == 0 and stats.faults_fired == {"delay_first_byte": 1}


def test_malformed_reply_and_stream_line(ollama_engine: FakeEngine) -> None:
    url = f"{ollama_engine.url}/api/generate"
    ollama_engine.faults.malformed(times=2)
    r = httpx.post(url, json={**GENERATE, "stream": False})
    assert r.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        r.json()
    lines = httpx.post(url, json=GENERATE).text.splitlines()
    json.loads(lines[0])
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[1])


def test_malformed_sse_breaks_the_openai_stream(openai_engine: FakeEngine) -> None:
    openai_engine.faults.malformed()
    r = httpx.post(f"{openai_engine.url}/v1/chat/completions", json={**CHAT, "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    json.loads(events[0].removeprefix("data: "))
    with pytest.raises(json.JSONDecodeError):
        json.loads(events[1].removeprefix("data: "))


@pytest.mark.parametrize(
    ("kind", "path", "body"),
    [
        ("ollama", "/api/generate", GENERATE),
        ("openai", "/v1/chat/completions", {**CHAT, "stream": True}),
        ("tgi", "/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 5}}),
    ],
)
def test_truncate_stream(
    make_engine: EngineFactory, kind: str, path: str, body: dict[str, object]
) -> None:
    engine = make_engine(kind)
    engine.faults.truncate(2)
    received: list[str] = []

    def read() -> None:
        with httpx.stream("POST", engine.url + path, json=body) as r:
            assert r.status_code == 200
            received.extend(line for line in r.iter_lines() if line)

    with pytest.raises(httpx.RemoteProtocolError):
        read()
    assert len(received) == 2
    assert not any("[DONE]" in line or '"done":true' in line for line in received)


def test_truncate_plain_reply(ollama_engine: FakeEngine) -> None:
    ollama_engine.faults.truncate(0)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(f"{ollama_engine.url}/api/generate", json={**GENERATE, "stream": False})


def test_client_abort_frees_the_slot(make_engine: EngineFactory, timing: TimingFactory) -> None:
    engine = make_engine("openai", slots=1, timing=timing(itl_s=0.05))
    body = {**CHAT, "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", f"{engine.url}/v1/chat/completions", json=body) as r:
        next(r.iter_lines())
    stats = engine.wait_stats(lambda s: s.streams_aborted == 1 and s.in_flight == 0)
    assert stats.requests_aborted == 1 and stats.tokens_generated < 1000
    assert httpx.post(f"{engine.url}/v1/chat/completions", json=CHAT).status_code == 200


def test_faults_over_the_admin_route(ollama_engine: FakeEngine) -> None:
    admin = f"{ollama_engine.url}/_fake/faults"
    armed = httpx.post(admin, json={"action": "fail", "status": 429, "times": 2}).json()["armed"]
    assert armed[0]["action"] == "fail" and armed[0]["times"] == 2
    assert httpx.post(f"{ollama_engine.url}/api/chat", json=GENERATE).status_code == 429
    httpx.post(admin, json={"action": "clear"})
    assert httpx.get(admin).json() == {"armed": []}
    assert httpx.post(admin, json={"action": "explode"}).status_code == 400
    assert httpx.post(admin, json={"action": "fail", "status": 200}).status_code == 400
