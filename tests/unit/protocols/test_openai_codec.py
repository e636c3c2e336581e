"""OpenAI-compatible codec (vLLM, llama.cpp, SGLang): bodies, replies, SSE streams."""

from __future__ import annotations

import json
from typing import Literal

import pytest

from shared_ollama.errors import InvalidRequest, ProtocolError, ServerError
from shared_ollama.protocols import (
    ChatRequest,
    EmbedRequest,
    GenerateRequest,
    ListedModel,
    OpenAICodec,
    Piece,
    WireRequest,
    WireResponse,
)
from shared_ollama.types import Message

from . import payloads as P
from .streaming import pieces_anywhere, run

codec = OpenAICodec()
USER = Message(role="user", content="hi")
STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}


def ok(obj: object) -> WireResponse:
    return WireResponse(200, {"content-type": "application/json"}, P.body(obj))


# -- building ----------------------------------------------------------------------------


def test_chat_minimal() -> None:
    req = codec.chat(ChatRequest(model=P.VLLM_MODEL, messages=[USER]))
    assert req == WireRequest(
        "POST",
        "/v1/chat/completions",
        json={
            "model": P.VLLM_MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": False,
        },
    )


def test_chat_stream_asks_for_continuous_usage() -> None:
    req = codec.chat(ChatRequest(model="m", messages=[USER], stream=True))
    assert req.stream is True
    assert req.json == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": STREAM_OPTIONS,
    }


def test_chat_option_translation() -> None:
    options = {
        "num_predict": 128,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 42,
        "stop": ["</s>"],
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "top_k": 20,
        "min_p": 0.05,
        "min_tokens": 4,
        "ignore_eos": True,
        "repeat_penalty": 1.1,
        # allowlisted native fields
        "logit_bias": {"50256": -100},
        "logprobs": True,
        "top_logprobs": 2,
        # ignored: server settings and unknown names
        "num_ctx": 4096,
        "num_gpu": 1,
        "mirostat": 2,
        "typical_p": 0.7,
        "n": 3,
        "seed_extra": None,
    }
    req = codec.chat(ChatRequest(model="m", messages=[USER], options=options))
    assert req.json == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "max_tokens": 128,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 42,
        "stop": ["</s>"],
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "top_k": 20,
        "min_p": 0.05,
        "min_tokens": 4,
        "ignore_eos": True,
        "repetition_penalty": 1.1,
        "logit_bias": {"50256": -100},
        "logprobs": True,
        "top_logprobs": 2,
    }


@pytest.mark.parametrize("num_predict", [-1, -2])
def test_negative_num_predict_means_no_limit(num_predict: int) -> None:
    req = codec.chat(ChatRequest(model="m", messages=[USER], options={"num_predict": num_predict}))
    assert "max_tokens" not in req.json


def test_chat_messages_images_tools_and_tool_results() -> None:
    messages = [
        Message(role="user", content="what is it?", images=["iVBORw0KGgo=", "/9j/4AAQ"]),
        Message(role="user", content="", images=["https://example.com/cat.png"]),
        Message(
            role="assistant",
            content="",
            tool_calls=[
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            ],
        ),
        Message.model_validate({"role": "tool", "content": "22C", "tool_name": "get_weather"}),
        Message.model_validate({"role": "tool", "content": "ok", "tool_call_id": "call_9"}),
    ]
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    req = codec.chat(ChatRequest(model="m", messages=messages, tools=[tool]))
    assert req.json["tools"] == [tool]
    assert req.json["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is it?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
            ],
        },
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
        },
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "content": "22C", "name": "get_weather"},
        {"role": "tool", "content": "ok", "tool_call_id": "call_9"},
    ]


def test_chat_format_and_think() -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}}
    body = codec.chat(ChatRequest(model="m", messages=[USER], format=schema, think=False)).json
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": schema},
    }
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    body = codec.chat(ChatRequest(model="m", messages=[USER], format="json", think="low")).json
    assert body["response_format"] == {"type": "json_object"}
    assert body["reasoning_effort"] == "low"
    assert "chat_template_kwargs" not in body
    body = codec.chat(ChatRequest(model="m", messages=[USER], format="", keep_alive="5m")).json
    assert set(body) == {"model", "messages", "stream"}
    with pytest.raises(InvalidRequest, match="unsupported format"):
        codec.chat(ChatRequest(model="m", messages=[USER], format="yaml"))


def test_generate() -> None:
    req = codec.generate(GenerateRequest(model="m", prompt="The capital of France is"))
    assert req == WireRequest(
        "POST",
        "/v1/completions",
        json={"model": "m", "prompt": "The capital of France is", "stream": False},
    )
    req = codec.generate(
        GenerateRequest(
            model="m",
            prompt="def f(",
            stream=True,
            suffix="    return x",
            system="You write Python.",
            template="ignored",
            context=[1, 2],
            images=["aGk="],
            raw=True,
            options={"num_predict": 16, "temperature": 0, "num_ctx": 2048},
            format="json",
            think=True,
            keep_alive=0,
        )
    )
    assert req.stream is True
    assert req.json == {
        "model": "m",
        "prompt": "You write Python.\n\ndef f(",
        "stream": True,
        "suffix": "    return x",
        "max_tokens": 16,
        "temperature": 0,
        "response_format": {"type": "json_object"},
        "stream_options": STREAM_OPTIONS,
    }


def test_embed_and_routes() -> None:
    req = codec.embed(EmbedRequest(model="e5", input=["a", "b"], truncate=True, keep_alive=1))
    assert req == WireRequest("POST", "/v1/embeddings", json={"model": "e5", "input": ["a", "b"]})
    req = codec.embed(EmbedRequest(model="e5", input=["a"], dimensions=64))
    assert req.json == {"model": "e5", "input": ["a"], "dimensions": 64}
    assert codec.list_models() == WireRequest("GET", "/v1/models")
    assert codec.ps() is None
    assert codec.show("m") is None
    assert codec.health() == WireRequest("GET", "/health")
    assert codec.kind == "openai"
    assert codec.operations == {"chat", "generate", "embed", "list", "ps"}


# -- parsing -----------------------------------------------------------------------------


def test_parse_vllm_chat() -> None:
    p = codec.parse_chat(ok(P.VLLM_CHAT))
    assert p.text == "Hello! How can I help you today?"
    assert p.role == "assistant"
    assert p.thinking is None
    assert p.tool_calls == []
    assert p.done_reason == "stop"
    assert (p.input_tokens, p.output_tokens) == (12, 9)
    assert p.served_model == P.VLLM_MODEL
    assert p.server_timings == {}
    assert p.context is None
    assert p.embeddings is None


def test_parse_tool_call_arguments_decoded() -> None:
    p = codec.parse_chat(ok(P.OPENAI_CHAT_TOOL_CALL))
    assert p.text == ""
    assert p.done_reason == "tool_calls"
    assert p.tool_calls == [
        {
            "id": "call_abc123",
            "type": "function",
            "function": {"name": "get_current_weather", "arguments": {"location": "Boston, MA"}},
        }
    ]
    assert (p.input_tokens, p.output_tokens) == (82, 17)
    broken = json.loads(json.dumps(P.OPENAI_CHAT_TOOL_CALL))
    broken["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = '{"loc'
    p = codec.parse_chat(ok(broken))
    assert p.tool_calls is not None
    assert p.tool_calls[0]["function"]["arguments"] == '{"loc'


def test_parse_reasoning_and_llamacpp_timings() -> None:
    p = codec.parse_chat(ok(P.VLLM_CHAT_REASONING))
    assert (p.text, p.thinking) == ("4", "2+2=4")
    p = codec.parse_chat(ok(P.LLAMACPP_CHAT))
    assert p.text == "Once upon a time"
    assert p.done_reason == "length"
    assert (p.input_tokens, p.output_tokens) == (10, 4)
    assert p.served_model == "tiny-llama"
    assert p.server_timings == {
        "prompt_eval_duration_ns": 12_500_000.0,
        "eval_duration_ns": 40_123_457.0,
    }


def test_parse_completion() -> None:
    p = codec.parse_generate(ok(P.VLLM_COMPLETION))
    assert p.text == " Paris, the city of light."
    assert p.done_reason == "length"
    assert (p.input_tokens, p.output_tokens) == (5, 7)
    assert p.served_model == P.VLLM_MODEL


def test_parse_embeddings_in_input_order() -> None:
    p = codec.parse_embed(ok(P.OPENAI_EMBEDDINGS))
    assert p.embeddings == [[0.0023064255, -0.009327292, 0.015797347], [0.5, -0.25, 1.0]]
    assert p.input_tokens == 8
    assert p.output_tokens is None
    assert p.served_model == "intfloat/e5-small-v2"


def test_parse_models() -> None:
    models = codec.parse_list(ok(P.VLLM_MODELS))
    assert models == [
        ListedModel(
            name=P.VLLM_MODEL,
            details={
                "created": 1718000000,
                "owned_by": "vllm",
                "root": P.VLLM_MODEL,
                "parent": None,
                "max_model_len": 131072,
            },
        )
    ]
    assert codec.parse_ps(ok(P.VLLM_MODELS)) == models
    assert codec.parse_show(ok(P.VLLM_MODELS["data"][0]))["details"]["owned_by"] == "vllm"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (P.body(P.OPENAI_ERROR), "Incorrect API key provided: sk-abc."),
        (P.body(P.VLLM_ERROR), "The model `llama3` does not exist."),
        (
            P.body(P.FASTAPI_422),
            "body.messages: Field required; body.temperature: Input should be a number",
        ),
        (b"Internal Server Error", "Internal Server Error"),
        (b"", None),
    ],
)
def test_error_message(raw: bytes, message: str | None) -> None:
    assert codec.error_message(WireResponse(400, {}, raw)) == message


def test_overload_is_429() -> None:
    assert codec.is_overload(WireResponse(429, {}, b""))
    assert not codec.is_overload(WireResponse(503, {}, b""))


# -- streams -----------------------------------------------------------------------------


def test_vllm_chat_stream_continuous_usage_every_split() -> None:
    pieces, finished = pieces_anywhere(lambda: codec.stream_parser("chat"), P.VLLM_CHAT_STREAM)
    assert finished
    m = P.VLLM_MODEL
    assert pieces == [
        Piece(text="", tokens=0, input_tokens=12, output_tokens=0, served_model=m),
        Piece(text="Hel", tokens=1, input_tokens=12, output_tokens=1, served_model=m),
        Piece(text="lo wörld 🦙", tokens=2, input_tokens=12, output_tokens=3, served_model=m),
        Piece(
            text="!",
            tokens=1,
            done=True,
            done_reason="stop",
            input_tokens=12,
            output_tokens=4,
            served_model=m,
        ),
        Piece(input_tokens=12, output_tokens=4, served_model=m),
        Piece(final=True),
    ]
    assert sum(p.tokens or 0 for p in pieces) == 4


def test_llamacpp_chat_stream_usage_once() -> None:
    pieces, finished = pieces_anywhere(lambda: codec.stream_parser("chat"), P.LLAMACPP_CHAT_STREAM)
    assert finished
    assert [p.text for p in pieces] == ["", "Once", " upon", "", ""]
    assert all(p.tokens is None for p in pieces)  # usage on the last chunk only
    last = pieces[-2]
    assert (last.done, last.done_reason) == (True, "length")
    assert (last.input_tokens, last.output_tokens) == (10, 2)
    assert last.server_timings == {
        "prompt_eval_duration_ns": 12_500_000.0,
        "eval_duration_ns": 20_000_000.0,
    }
    assert pieces[-1] == Piece(final=True)


def test_completion_stream_every_split() -> None:
    pieces, finished = pieces_anywhere(
        lambda: codec.stream_parser("generate"), P.VLLM_COMPLETION_STREAM
    )
    assert finished
    assert [p.text for p in pieces] == [" Paris", ",", " France", "", ""]
    assert [p.tokens for p in pieces] == [1, 1, 1, None, None]
    assert pieces[2].done and pieces[2].done_reason == "length"
    assert (pieces[3].input_tokens, pieces[3].output_tokens) == (5, 3)


def test_stream_reasoning_and_tool_call_deltas() -> None:
    data = P.sse(
        {"model": "q", "choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]},
        {
            "model": "q",
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "id": "c1", "function": {"name": "f", "arguments": '{"a'}}
                        ]
                    },
                }
            ],
        },
        {"model": "q", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    )
    pieces, finished = run(codec.stream_parser("chat"), [data])
    assert finished
    assert pieces[0].thinking == "hmm"
    assert pieces[1].tool_calls == [
        {"index": 0, "id": "c1", "function": {"name": "f", "arguments": '{"a'}}
    ]
    assert pieces[2].done_reason == "tool_calls"


def test_truncated_stream_is_not_finished() -> None:
    data = P.VLLM_CHAT_STREAM
    cut = data.index(b"data: [DONE]")
    pieces, finished = run(codec.stream_parser("chat"), [data[:cut]])
    assert not finished
    assert len(pieces) == 5
    # [DONE] without the blank line that ends its event is not an end marker (SSE spec).
    pieces, finished = run(codec.stream_parser("chat"), [data.rstrip(b"\n")])
    assert not finished


def test_truncated_mid_event_drops_it() -> None:
    data = P.VLLM_CHAT_STREAM[:40]
    pieces, finished = run(codec.stream_parser("chat"), [data])
    assert (pieces, finished) == ([], False)


def test_keepalive_comments_and_other_events_are_skipped() -> None:
    data = b": ping\n\nevent: ping\ndata: {}\n\ndata:\n\n" + P.VLLM_COMPLETION_STREAM
    pieces, finished = run(codec.stream_parser("generate"), [data])
    assert finished
    assert pieces[0].text == " Paris"


def test_vllm_error_chunk_mid_stream() -> None:
    data = P.sse(
        {"model": "m", "choices": [{"index": 0, "delta": {"content": "Hi"}}]},
        P.VLLM_STREAM_ERROR,
    )
    parser = codec.stream_parser("chat")
    [piece] = parser.feed(data)
    assert piece.text == "Hi"
    with pytest.raises(ServerError) as info:
        parser.flush()
    assert info.value.server_message == "Request timed out in the engine."


def test_vllm_legacy_error_object_in_stream() -> None:
    with pytest.raises(ServerError) as info:
        codec.stream_parser("chat").feed(P.sse(P.VLLM_ERROR, done=False))
    assert info.value.server_message == "The model `llama3` does not exist."


def test_llamacpp_error_field_event() -> None:
    parser = codec.stream_parser("chat")
    with pytest.raises(ServerError) as info:
        run(parser, [P.LLAMACPP_ERROR_EVENT])
    assert info.value.server_message == "the request exceeds the available context size"
    with pytest.raises(ServerError) as info:
        codec.stream_parser("chat").feed(b"event: error\ndata: engine died\n\n")
    assert info.value.server_message == "engine died"


@pytest.mark.parametrize(
    "event",
    [
        b"data: not json\n\n",
        b"data: [1]\n\n",
        b'data: {"choices": {}}\n\n',
        b'data: {"choices": ["x"]}\n\n',
        b'data: {"choices": [{"delta": "x"}]}\n\n',
        b'data: {"choices": [{"delta": {"content": 1}}]}\n\n',
        b'data: {"choices": [{"text": null, "finish_reason": 3}]}\n\n',
        b'data: {"choices": [], "usage": {"completion_tokens": "3"}}\n\n',
        b'data: {"choices": [], "timings": {"prompt_ms": "fast"}}\n\n',
    ],
)
def test_malformed_chunks(event: bytes) -> None:
    with pytest.raises(ProtocolError):
        codec.stream_parser("chat").feed(event)


@pytest.mark.parametrize(
    ("operation", "event"),
    [
        # Checked inline on every chunk (not through the accessors): each wrong type still
        # ends in ProtocolError, in both parsers.
        *(
            (op, e)
            for op in ("chat", "generate")
            for e in (
                b'data: {"model": 5, "choices": []}\n\n',
                b'data: {"choices": "abc"}\n\n',
                b'data: {"choices": 0}\n\n',
                b'data: {"choices": [null]}\n\n',
                b'data: {"choices": [{"finish_reason": ["stop"]}]}\n\n',
                b'data: {"choices": [], "usage": []}\n\n',
                b'data: {"choices": [], "timings": 1}\n\n',
            )
        ),
        ("generate", b'data: {"choices": [{"text": 5}]}\n\n'),
        ("chat", b'data: {"choices": [{"delta": {"reasoning": 1}}]}\n\n'),
        ("chat", b'data: {"choices": [{"delta": {"tool_calls": {}}}]}\n\n'),
        ("chat", b'data: {"choices": [{"delta": {"tool_calls": [1]}}]}\n\n'),
    ],
)
def test_malformed_chunks_every_field(operation: Literal["chat", "generate"], event: bytes) -> None:
    with pytest.raises(ProtocolError):
        codec.stream_parser(operation).feed(event)


def test_chunk_with_null_fields_is_an_empty_piece() -> None:
    data = b'data: {"model": null, "choices": [{"text": null, "finish_reason": null}]}\n\n'
    [piece] = codec.stream_parser("generate").feed(data)
    assert (piece.text, piece.done, piece.served_model, piece.server_timings) == (
        "",
        False,
        None,
        {},
    )


def test_empty_tool_list_is_not_sent() -> None:
    # OpenAI's schema rejects "tools": []; no tools means no field.
    assert "tools" not in codec.chat(ChatRequest(model="m", messages=[USER], tools=[])).json
