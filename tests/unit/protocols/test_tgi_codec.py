"""TGI codec: /generate bodies and parameters, /info, timing headers, token streams."""

from __future__ import annotations

import pytest

from shared_ollama.errors import InvalidRequest, ProtocolError, ServerError
from shared_ollama.protocols import (
    ChatRequest,
    EmbedRequest,
    GenerateRequest,
    ListedModel,
    Piece,
    TGICodec,
    WireRequest,
    WireResponse,
)
from shared_ollama.types import Message

from . import payloads as P
from .streaming import pieces_anywhere, run

codec = TGICodec()
USER = Message(role="user", content="What is deep learning?")


def ok(obj: object, headers: dict[str, str] | None = None) -> WireResponse:
    return WireResponse(200, headers or {"content-type": "application/json"}, P.body(obj))


# -- building ----------------------------------------------------------------------------


def test_chat_uses_the_messages_api() -> None:
    req = codec.chat(ChatRequest(model="tgi", messages=[USER]))
    assert req == WireRequest(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "tgi",
            "messages": [{"role": "user", "content": "What is deep learning?"}],
            "stream": False,
        },
    )


def test_chat_stream_options_and_translation() -> None:
    req = codec.chat(
        ChatRequest(
            model="",
            messages=[USER],
            stream=True,
            options={
                "num_predict": 20,
                "temperature": 0,
                "top_p": 0.95,
                "seed": 1,
                "stop": "\n",
                "presence_penalty": 0.1,
                "frequency_penalty": 0.2,
                "top_k": 40,  # not in the Messages API: ignored
                "repeat_penalty": 1.2,  # idem
                "logprobs": True,
                "num_ctx": 8192,
            },
            format={"type": "object"},
            think=True,
            keep_alive="5m",
        )
    )
    assert req.stream is True
    assert req.json == {
        "model": "tgi",
        "messages": [{"role": "user", "content": "What is deep learning?"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 20,
        "temperature": 0,
        "top_p": 0.95,
        "seed": 1,
        "stop": ["\n"],
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "logprobs": True,
        "response_format": {"type": "json", "value": {"type": "object"}},
    }


def test_generate_minimal() -> None:
    req = codec.generate(GenerateRequest(model="tgi", prompt="My name is Olivier and I"))
    assert req == WireRequest(
        "POST",
        "/generate",
        json={
            "inputs": "My name is Olivier and I",
            "parameters": {"details": True, "decoder_input_details": False},
        },
    )


def test_generate_stream_and_parameters() -> None:
    req = codec.generate(
        GenerateRequest(
            model="tgi",
            prompt="Why is the sky blue?",
            stream=True,
            system="Answer briefly.",
            template="ignored",
            context=[1],
            images=["aGk="],
            raw=True,
            options={
                "num_predict": 64,
                "temperature": 0.8,
                "top_p": 0.9,
                "top_k": 10,
                "seed": 7,
                "stop": "photographer",
                "repeat_penalty": 1.03,
                "typical_p": 0.95,
                "frequency_penalty": 0.1,
                "do_sample": True,
                "watermark": False,
                "truncate": 1000,
                "num_ctx": 4096,  # ignored
                "return_full_text": True,  # not allowlisted: would change the reply
                "best_of": 2,  # idem
            },
            format="json",
            think=True,
            keep_alive=0,
        )
    )
    assert req.path == "/generate_stream"
    assert req.stream is True
    assert req.json == {
        "inputs": "Answer briefly.\n\nWhy is the sky blue?",
        "parameters": {
            "details": True,
            "max_new_tokens": 64,
            "temperature": 0.8,
            "top_p": 0.9,
            "top_k": 10,
            "seed": 7,
            "stop": ["photographer"],
            "repetition_penalty": 1.03,
            "typical_p": 0.95,
            "frequency_penalty": 0.1,
            "do_sample": True,
            "watermark": False,
            "truncate": 1000,
            "grammar": {"type": "json", "value": {"type": "object"}},
            "decoder_input_details": False,
        },
    }


@pytest.mark.parametrize(
    ("options", "kept"),
    [
        ({"temperature": 0}, {}),
        ({"temperature": 0.0, "top_p": 1.0, "top_k": 0}, {}),
        ({"top_p": 0}, {}),
        (
            {"temperature": 1.0, "top_p": 0.5, "top_k": 1},
            {"temperature": 1.0, "top_p": 0.5, "top_k": 1},
        ),
        ({"num_predict": -1}, {}),
    ],
)
def test_generate_drops_values_that_mean_off(
    options: dict[str, float], kept: dict[str, float]
) -> None:
    params = codec.generate(GenerateRequest(model="tgi", prompt="x", options=options)).json[
        "parameters"
    ]
    assert params == {"details": True, "decoder_input_details": False, **kept}


def test_generate_schema_format_and_refusals() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    params = codec.generate(GenerateRequest(model="tgi", prompt="x", format=schema)).json[
        "parameters"
    ]
    assert params["grammar"] == {"type": "json", "value": schema}
    with pytest.raises(InvalidRequest, match="suffix"):
        codec.generate(GenerateRequest(model="tgi", prompt="x", suffix="y"))
    with pytest.raises(InvalidRequest, match="unsupported format"):
        codec.generate(GenerateRequest(model="tgi", prompt="x", format=3))


def test_embed_is_refused_and_routes() -> None:
    with pytest.raises(InvalidRequest, match="TGI does not serve embeddings"):
        codec.embed(EmbedRequest(model="tgi", input=["a"]))
    with pytest.raises(InvalidRequest):
        codec.parse_embed(ok({}))
    assert codec.list_models() == WireRequest("GET", "/info")
    assert codec.ps() is None
    assert codec.show("anything") == WireRequest("GET", "/info")
    assert codec.health() == WireRequest("GET", "/health")
    assert codec.kind == "tgi"
    assert codec.operations == {"chat", "generate", "list", "ps", "show"}


# -- parsing -----------------------------------------------------------------------------


def test_parse_generate_with_headers() -> None:
    p = codec.parse_generate(ok(P.TGI_GENERATE, P.TGI_GENERATE_HEADERS))
    assert p.text == " Rayleigh scattering"
    assert p.done_reason == "stop"
    assert (p.input_tokens, p.output_tokens) == (7, 3)
    assert p.served_model == P.TGI_MODEL
    assert p.server_timings == {
        "queue_time_ms": 3.0,
        "inference_time_ms": 408.0,
        "time_per_token_ms": 136.0,
        "validation_time_ms": 1.0,
        "compute_time_s": 0.412345,
    }


def test_parse_generate_without_headers_or_details() -> None:
    p = codec.parse_generate(ok(P.TGI_GENERATE))
    assert (p.input_tokens, p.output_tokens) == (None, 3)
    assert p.served_model is None
    assert p.server_timings == {}
    body = {
        "generated_text": "x",
        "details": {"finish_reason": "length", "generated_tokens": 1, "input_length": 4},
    }
    p = codec.parse_generate(ok(body))
    assert (p.done_reason, p.input_tokens) == ("length", 4)
    p = codec.parse_generate(
        ok({"generated_text": "x"}, {"x-generated-tokens": "5", "x-prompt-tokens": "bad"})
    )
    assert (p.done_reason, p.input_tokens, p.output_tokens) == (None, None, 5)


@pytest.mark.parametrize(
    ("tgi", "ours"), [("eos_token", "stop"), ("stop_sequence", "stop"), ("length", "length")]
)
def test_finish_reasons_normalized(tgi: str, ours: str) -> None:
    body = {"generated_text": "", "details": {"finish_reason": tgi, "generated_tokens": 0}}
    assert codec.parse_generate(ok(body)).done_reason == ours


def test_parse_chat() -> None:
    p = codec.parse_chat(ok(P.TGI_CHAT, {"x-compute-time": "0.5", "x-queue-time": "2"}))
    assert p.text == "Deep learning is..."
    assert p.done_reason == "length"
    assert (p.input_tokens, p.output_tokens) == (15, 20)
    assert p.served_model == "HuggingFaceH4/zephyr-7b-beta"
    assert p.server_timings == {"compute_time_s": 0.5, "queue_time_ms": 2.0}
    body = dict(P.TGI_CHAT, usage=None, model="")
    body["choices"] = [dict(P.TGI_CHAT["choices"][0], finish_reason="eos_token")]
    headers = {"x-prompt-tokens": "15", "x-generated-tokens": "20", "x-model-id": P.TGI_MODEL}
    p = codec.parse_chat(ok(body, headers))
    assert (p.input_tokens, p.output_tokens, p.served_model) == (15, 20, P.TGI_MODEL)
    assert p.done_reason == "stop"


def test_parse_info() -> None:
    [m] = codec.parse_list(ok(P.TGI_INFO))
    assert m == ListedModel(
        name=P.TGI_MODEL, details={k: v for k, v in P.TGI_INFO.items() if k != "model_id"}
    )
    assert codec.parse_ps(ok(P.TGI_INFO)) == [m]
    shown = codec.parse_show(ok(P.TGI_INFO))
    assert shown == {
        "details": {
            "model_id": P.TGI_MODEL,
            "model_sha": "e985a63cdc139290c5f700ff1929f0b5942cced2",
            "model_dtype": "torch.float16",
            "model_device_type": "cuda",
            "model_pipeline_tag": "text-generation",
            "max_input_tokens": 1024,
            "max_total_tokens": 2048,
            "version": "2.4.1",
        },
        "model_info": P.TGI_INFO,
    }
    with pytest.raises(ProtocolError, match="model_id"):
        codec.parse_list(ok({"router": "x"}))


def test_response_timings_skip_bad_values() -> None:
    headers = {
        "x-queue-time": "abc",
        "x-inference-time": "nan",
        "X-Time-Per-Token": "12",
        "x-validation-time": " 4 ",
    }
    assert codec.response_timings(headers) == {"time_per_token_ms": 12.0, "validation_time_ms": 4.0}
    assert codec.response_timings({}) == {}


def test_error_message_and_overload() -> None:
    overloaded = WireResponse(429, {}, P.body(P.TGI_OVERLOADED))
    assert codec.error_message(overloaded) == "Model is overloaded"
    assert codec.is_overload(overloaded)
    assert codec.is_overload(WireResponse(503, {}, P.body(P.TGI_OVERLOADED)))
    assert not codec.is_overload(WireResponse(422, {}, P.body(P.TGI_VALIDATION)))
    assert not codec.is_overload(WireResponse(503, {}, b"<html>"))
    assert not codec.is_overload(WireResponse(503, {}, b"[]"))


# -- streams -----------------------------------------------------------------------------


def test_generate_stream_every_split() -> None:
    pieces, finished = pieces_anywhere(
        lambda: codec.stream_parser("generate"), P.TGI_GENERATE_STREAM
    )
    assert finished
    assert pieces == [
        Piece(text=" Ray", tokens=1),
        Piece(text="leigh ñ", tokens=1),
        Piece(
            text="",  # the special </s> token is not text
            tokens=1,
            done=True,
            final=True,
            done_reason="stop",
            input_tokens=7,
            output_tokens=3,
        ),
    ]


def test_generate_stream_final_event_without_details() -> None:
    data = P.sse(
        {
            "index": 1,
            "token": {"id": 5, "text": "Hi", "special": False},
            "generated_text": "Hi",
            "details": None,
        },
        done=False,
    )
    pieces, finished = run(codec.stream_parser("generate"), [data])
    assert finished
    assert pieces == [Piece(text="Hi", tokens=1, done=True, final=True)]


def test_generate_stream_truncated() -> None:
    cut = P.TGI_GENERATE_STREAM.rindex(b"data:")
    pieces, finished = run(codec.stream_parser("generate"), [P.TGI_GENERATE_STREAM[:cut]])
    assert not finished
    assert [p.text for p in pieces] == [" Ray", "leigh ñ"]


def test_generate_stream_error_event() -> None:
    data = P.sse(
        {
            "index": 1,
            "token": {"id": 5, "text": "Hi", "special": False},
            "generated_text": None,
            "details": None,
        },
        P.TGI_STREAM_ERROR,
        done=False,
    )
    parser = codec.stream_parser("generate")
    [piece] = parser.feed(data)
    assert piece.text == "Hi"
    with pytest.raises(ServerError) as info:
        parser.flush()
    assert info.value.server_message == "Request failed during generation: CUDA OOM"
    with pytest.raises(ServerError):
        codec.stream_parser("generate").feed(b"event: error\ndata: bad\n\n")


def test_chat_stream_every_split() -> None:
    pieces, finished = pieces_anywhere(lambda: codec.stream_parser("chat"), P.TGI_CHAT_STREAM)
    assert finished
    model = "HuggingFaceH4/zephyr-7b-beta"
    assert pieces == [
        Piece(text="Deep", served_model=model),
        Piece(text=" learning", served_model=model),
        Piece(
            done=True,
            done_reason="stop",
            input_tokens=15,
            output_tokens=3,
            served_model=model,
        ),
        Piece(final=True),
    ]


@pytest.mark.parametrize(
    "event",
    [
        b"data: {bad\n\n",
        b"data: []\n\n",
        b'data: {"token": "x"}\n\n',
        b'data: {"token": {"text": 1}}\n\n',
        b'data: {"token": {"text": "a", "special": "no"}}\n\n',
        b'data: {"token": {"text": "a"}, "details": {"generated_tokens": "3"}}\n\n',
        b'data: {"token": {"text": "a"}, "details": []}\n\n',
    ],
)
def test_malformed_events(event: bytes) -> None:
    with pytest.raises(ProtocolError):
        codec.stream_parser("generate").feed(event)
