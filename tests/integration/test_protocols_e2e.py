"""Every protocol over real HTTP against FakeEngines, with both clients.

Token counts are the FakeEngine's documented accounting: output = the requested limit,
prompt = whitespace words (+3 per chat message).
"""

from __future__ import annotations

from typing import Any

import pytest

from shared_ollama import (
    AuthError,
    ChatResponse,
    ConnectError,
    Endpoint,
    GenerateResponse,
    InvalidRequest,
    ModelNotFound,
    ProtocolError,
    RetryPolicy,
    ServerError,
    StreamInterrupted,
    Timeout,
    Timeouts,
)
from shared_ollama.records import CallRecord
from shared_ollama.testing import FakeEngine
from tests.conftest import MODEL

MESSAGES = [{"role": "user", "content": "tell me about shared pools"}]
PROMPT_TOKENS = 5 + 3  # five words + the per-message overhead


def ep_for(engine: FakeEngine, **kw: Any) -> Endpoint:
    return Endpoint(engine.url, kind=engine.kind, **kw)  # type: ignore[arg-type]


async def test_chat(engine: FakeEngine, make_driver: Any) -> None:
    records: list[CallRecord] = []
    async with make_driver([ep_for(engine)], listeners=[records.append]) as d:
        r = await d.call("chat", model=MODEL, messages=MESSAGES, options={"num_predict": 6})
    assert isinstance(r, ChatResponse)
    assert r.message.role == "assistant" and len(r.message.content.split()) == 6
    assert r.usage.output_tokens == 6
    assert r.usage.input_tokens == PROMPT_TOKENS
    assert r.done_reason == "length" and r.finish_reason == "length"
    assert r.endpoint == engine.url and r.model == MODEL and r.served_model == MODEL
    assert r.timings.t_end_ns >= r.timings.t_start_ns and r.timings.ttft_s is not None
    assert r["message"]["content"] == r.message.content  # ollama-style access
    (rec,) = records
    assert rec.ok and rec.operation == "chat" and rec.output_tokens == 6
    assert rec.protocol == engine.kind and rec.request_id == r.request_id
    if engine.kind == "ollama":
        assert r.timings.server.eval_duration_ns and r.timings.server.prompt_eval_duration_ns
    if engine.kind == "tgi":
        assert r.timings.server.inference_time_ms is not None


async def test_chat_stream(engine: FakeEngine, make_driver: Any) -> None:
    records: list[CallRecord] = []
    async with make_driver([ep_for(engine)], listeners=[records.append]) as d:
        full = await d.call("chat", model=MODEL, messages=MESSAGES, options={"num_predict": 7})
        chunks = await d.stream("chat", model=MODEL, messages=MESSAGES, options={"num_predict": 7})
    text = "".join(c.message.content for c in chunks)
    assert text == full.message.content  # same deterministic text, no token twice
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    assert chunks[-1].usage.output_tokens == 7
    assert chunks[-1].usage.input_tokens == PROMPT_TOKENS
    rec = records[-1]
    assert rec.stream and rec.ok and rec.output_tokens == 7
    assert rec.t_first_chunk_ns is not None and len(rec.chunk_times_ns) == len(chunks)


async def test_generate(engine: FakeEngine, make_driver: Any) -> None:
    async with make_driver([ep_for(engine)]) as d:
        r = await d.call(
            "generate", model=MODEL, prompt="one two three", options={"num_predict": 4}
        )
        chunks = await d.stream(
            "generate", model=MODEL, prompt="one two three", options={"num_predict": 4}
        )
    assert isinstance(r, GenerateResponse)
    assert len(r.response.split()) == 4 and r.usage.output_tokens == 4
    assert r.usage.input_tokens == 3
    assert "".join(c.response for c in chunks) == r.response
    assert chunks[-1].done and chunks[-1].usage.output_tokens == 4


async def test_embed(engine: FakeEngine, make_driver: Any) -> None:
    async with make_driver([ep_for(engine)]) as d:
        if engine.kind == "tgi":
            with pytest.raises(InvalidRequest, match="serves embed"):
                await d.call("embed", model=MODEL, input=["a", "b"])
            return
        r = await d.call("embed", model=MODEL, input=["hello world", "b"])
    assert len(r.embeddings) == 2 and all(len(v) == 8 for v in r.embeddings)
    assert r.embeddings[0] != r.embeddings[1]


async def test_list_ps_show(engine: FakeEngine, make_driver: Any) -> None:
    async with make_driver([ep_for(engine, models={"alias": MODEL})]) as d:
        await d.call("chat", model="alias", messages=MESSAGES)  # Ollama lists loaded models
        listing = await d.call("list")
        running = await d.call("ps")
        shown = await d.call("show", "alias")
    served = MODEL + ":latest" if engine.kind == "ollama" else MODEL  # as Ollama lists it
    assert served in {m.served_model for m in listing.models}
    assert {m.model for m in listing.models if m.served_model == served} == {"alias"}
    assert all(m.endpoint == engine.url for m in listing.models)
    assert served in {m.served_model for m in running.models}
    assert shown.model == "alias" and shown.served_model == MODEL
    if engine.kind == "ollama":
        assert any(m.size_vram for m in running.models)


# -- errors ----------------------------------------------------------------------------
async def test_model_not_found_from_server(engine: FakeEngine, make_driver: Any) -> None:
    # An alias bypasses discovery, so the request reaches the server and its 404.
    endpoint = ep_for(engine, models={"ghost": "no-such-model"})
    async with make_driver([endpoint]) as d:
        if engine.kind == "tgi":
            pytest.skip("TGI serves one model and ignores the model name on /generate")
        with pytest.raises(ModelNotFound) as err:
            await d.call("chat", model="ghost", messages=MESSAGES)
    assert err.value.status_code == 404 and err.value.endpoint == engine.url
    assert err.value.model == "ghost" and err.value.attempts == 1


async def test_model_not_found_in_pool(engine: FakeEngine, make_driver: Any) -> None:
    async with make_driver([ep_for(engine)]) as d:
        with pytest.raises(ModelNotFound, match="no endpoint serves model 'missing'"):
            await d.call("chat", model="missing", messages=MESSAGES)


async def test_validation_errors(engine: FakeEngine, make_driver: Any) -> None:
    async with make_driver([ep_for(engine)]) as d:
        with pytest.raises(InvalidRequest):  # rejected before sending
            await d.call("chat", model=MODEL, messages="not a list")
        if engine.kind == "ollama":
            engine.faults.fail(400, message="invalid options")
            with pytest.raises(InvalidRequest) as err:
                await d.call("chat", model=MODEL, messages=MESSAGES)
            assert err.value.status_code == 400
        else:
            # The engines' own validation: max tokens over the limit.
            with pytest.raises(InvalidRequest) as err:
                await d.call("generate", model=MODEL, prompt="x", options={"num_predict": 100_000})
            assert err.value.status_code in (400, 422)
            assert err.value.server_message
    assert sum(engine.stats().responses.values()) > 0


async def test_auth_error(engine: FakeEngine, make_driver: Any) -> None:
    if engine.kind == "ollama":
        engine.faults.fail(401, message="unauthorized")
        async with make_driver([ep_for(engine)]) as d:
            with pytest.raises(AuthError):
                await d.call("chat", model=MODEL, messages=MESSAGES)
        return
    with FakeEngine(kind=engine.kind, models=(MODEL,), api_key="sk-right") as locked:
        bad = Endpoint(locked.url, kind=locked.kind, api_key="sk-wrong-secret")  # type: ignore[arg-type]
        async with make_driver([bad]) as d:
            with pytest.raises(AuthError) as err:
                await d.call("chat", model=MODEL, messages=MESSAGES)
        assert "sk-wrong-secret" not in str(err.value) and "sk-wrong" not in repr(err.value)
        good = Endpoint(locked.url, kind=locked.kind, api_key="sk-right")  # type: ignore[arg-type]
        async with make_driver([good]) as d:
            r = await d.call("chat", model=MODEL, messages=MESSAGES)
        assert r.message.content


async def test_server_error_retried_then_typed(engine: FakeEngine, make_driver: Any) -> None:
    async with make_driver([ep_for(engine)]) as d:
        engine.faults.fail(500, times=2, message="kaboom")
        r = await d.call("chat", model=MODEL, messages=MESSAGES)
        assert r.attempts == 3
        engine.faults.fail(502, times=5)
        with pytest.raises(ServerError) as err:
            await d.call("chat", model=MODEL, messages=MESSAGES)
    assert err.value.status_code == 502 and err.value.attempts == 3


async def test_malformed_body(engine: FakeEngine, make_driver: Any) -> None:
    one_try = RetryPolicy(max_attempts=1)
    async with make_driver([ep_for(engine)], retry=one_try) as d:
        engine.faults.malformed()
        with pytest.raises(ProtocolError):
            await d.call("chat", model=MODEL, messages=MESSAGES)
        engine.faults.malformed()
        chunks, err = await d.stream_collect("chat", model=MODEL, messages=MESSAGES)
    # A bad line before any chunk is a ProtocolError; after one, the stream is interrupted
    # and the cause says why.
    if chunks:
        assert isinstance(err, StreamInterrupted)
        assert isinstance(err.__cause__, ProtocolError)
    else:
        assert isinstance(err, ProtocolError)


async def test_truncated_stream(engine: FakeEngine, make_driver: Any) -> None:
    async with make_driver([ep_for(engine)]) as d:
        engine.faults.truncate(after_chunks=3)
        chunks, err = await d.stream_collect(
            "chat", model=MODEL, messages=MESSAGES, options={"num_predict": 10}
        )
    assert isinstance(err, StreamInterrupted)
    assert err.chunks == len(chunks) >= 1
    assert err.partial_text == "".join(c.message.content for c in chunks)
    assert err.attempts == 1  # never retried after delivery


async def test_truncated_before_first_chunk_is_retried(
    engine: FakeEngine, make_driver: Any
) -> None:
    async with make_driver([ep_for(engine)]) as d:
        engine.faults.truncate(after_chunks=0)
        chunks = await d.stream("chat", model=MODEL, messages=MESSAGES)
    assert chunks[-1].done


async def test_connection_reset_is_retried(engine: FakeEngine, make_driver: Any) -> None:
    async with make_driver([ep_for(engine)]) as d:
        engine.faults.reset(times=1)
        r = await d.call("chat", model=MODEL, messages=MESSAGES)
    assert r.attempts == 2


async def test_refused_connection(engine: FakeEngine, make_driver: Any) -> None:
    dead = Endpoint("http://127.0.0.1:9", kind=engine.kind)  # type: ignore[arg-type]
    async with make_driver([dead], retry=RetryPolicy(max_attempts=2, backoff_max_s=0.01)) as d:
        with pytest.raises(ConnectError) as err:
            await d.call("chat", model=MODEL, messages=MESSAGES)
    assert err.value.endpoint == "http://127.0.0.1:9" and err.value.attempts == 2


async def test_first_chunk_timeout(engine: FakeEngine, make_driver: Any) -> None:
    quick = Timeouts(connect_s=2, first_chunk_s=0.2, between_chunks_s=1, total_s=5)
    async with make_driver(
        [ep_for(engine)], timeouts=quick, retry=RetryPolicy(max_attempts=1)
    ) as d:
        engine.faults.delay_first_byte(2.0)
        with pytest.raises(Timeout) as err:
            await d.call("chat", model=MODEL, messages=MESSAGES)
    assert err.value.phase in ("first_chunk", "total")


async def test_total_deadline_bounds_retries(engine: FakeEngine, make_driver: Any) -> None:
    async with make_driver([ep_for(engine)]) as d:
        engine.faults.delay_first_byte(2.0, times=10)
        with pytest.raises(Timeout) as err:
            await d.call("chat", model=MODEL, messages=MESSAGES, timeout=0.3)
    assert err.value.phase == "total"
