"""Ollama codec: exact request bodies, documented replies, NDJSON streams cut anywhere."""

from __future__ import annotations

import pytest

from shared_ollama.errors import ProtocolError, ServerError
from shared_ollama.protocols import (
    ChatRequest,
    EmbedRequest,
    GenerateRequest,
    ListedModel,
    OllamaCodec,
    Piece,
    WireRequest,
    WireResponse,
)
from shared_ollama.types import Message

from . import payloads as P
from .streaming import pieces_anywhere, run

codec = OllamaCodec()


def ok(obj: object) -> WireResponse:
    return WireResponse(200, {"content-type": "application/json"}, P.body(obj))


USER = Message(role="user", content="why is the sky blue?")

# -- building ----------------------------------------------------------------------------


def test_chat_minimal_sends_stream_false_explicitly() -> None:
    req = codec.chat(ChatRequest(model="llama3.2", messages=[USER]))
    assert req == WireRequest(
        "POST",
        "/api/chat",
        json={
            "model": "llama3.2",
            "messages": [{"role": "user", "content": "why is the sky blue?"}],
            "stream": False,
        },
        stream=False,
    )


def test_chat_every_field() -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}}
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    messages = [
        Message(role="system", content="be brief"),
        Message(role="user", content="what is this?", images=["iVBORw0KGgo="]),
        Message(
            role="assistant",
            content="",
            tool_calls=[{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        ),
        Message.model_validate({"role": "tool", "content": "22C", "tool_name": "get_weather"}),
    ]
    req = codec.chat(
        ChatRequest(
            model="llama3.2",
            messages=messages,
            stream=True,
            options={"temperature": 0, "num_ctx": 4096, "mirostat": 1, "seed": None},
            format=schema,
            tools=[tool],
            think=True,
            keep_alive="5m",
        )
    )
    assert req.method == "POST"
    assert req.path == "/api/chat"
    assert req.stream is True
    assert req.json == {
        "model": "llama3.2",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is this?", "images": ["iVBORw0KGgo="]},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                ],
            },
            {"role": "tool", "content": "22C", "tool_name": "get_weather"},
        ],
        "stream": True,
        # Unknown options pass through for Ollama; None values are dropped.
        "options": {"temperature": 0, "num_ctx": 4096, "mirostat": 1},
        "format": schema,
        "tools": [tool],
        "think": True,
        "keep_alive": "5m",
    }


def test_chat_keep_alive_zero_and_think_false_are_sent() -> None:
    req = codec.chat(ChatRequest(model="m", messages=[], think=False, keep_alive=0, format="json"))
    assert req.json == {
        "model": "m",
        "messages": [],
        "stream": False,
        "think": False,
        "keep_alive": 0,
        "format": "json",
    }


def test_generate_minimal_and_full() -> None:
    req = codec.generate(GenerateRequest(model="llama3.2", prompt="Why is the sky blue?"))
    assert req == WireRequest(
        "POST",
        "/api/generate",
        json={"model": "llama3.2", "prompt": "Why is the sky blue?", "stream": False},
    )
    req = codec.generate(
        GenerateRequest(
            model="codellama:code",
            prompt="def compute_gcd(a, b):",
            stream=True,
            suffix="    return result",
            system="You are a coder",
            template="{{ .Prompt }}",
            context=[1, 2, 3],
            images=["aGk="],
            raw=True,
            options={"temperature": 0, "num_predict": 100, "stop": ["\n", "user:"]},
            format="json",
            think="high",
            keep_alive=300,
        )
    )
    assert req.stream is True
    assert req.json == {
        "model": "codellama:code",
        "prompt": "def compute_gcd(a, b):",
        "stream": True,
        "suffix": "    return result",
        "system": "You are a coder",
        "template": "{{ .Prompt }}",
        "context": [1, 2, 3],
        "images": ["aGk="],
        "raw": True,
        "options": {"temperature": 0, "num_predict": 100, "stop": ["\n", "user:"]},
        "format": "json",
        "think": "high",
        "keep_alive": 300,
    }


def test_embed() -> None:
    req = codec.embed(EmbedRequest(model="all-minilm", input=["a", "b"]))
    assert req == WireRequest(
        "POST", "/api/embed", json={"model": "all-minilm", "input": ["a", "b"]}
    )
    req = codec.embed(
        EmbedRequest(
            model="all-minilm",
            input=["a"],
            truncate=False,
            dimensions=256,
            options={"num_ctx": 512},
            keep_alive="1m",
        )
    )
    assert req.json == {
        "model": "all-minilm",
        "input": ["a"],
        "truncate": False,
        "dimensions": 256,
        "options": {"num_ctx": 512},
        "keep_alive": "1m",
    }


def test_other_routes() -> None:
    assert codec.list_models() == WireRequest("GET", "/api/tags")
    assert codec.ps() == WireRequest("GET", "/api/ps")
    assert codec.show("llama3.2") == WireRequest("POST", "/api/show", json={"model": "llama3.2"})
    assert codec.health() == WireRequest("GET", "/api/version")
    assert codec.kind == "ollama"
    assert codec.operations == {"chat", "load", "generate", "embed", "list", "ps", "show"}


# -- parsing -----------------------------------------------------------------------------


def test_parse_generate() -> None:
    p = codec.parse_generate(ok(P.OLLAMA_GENERATE))
    assert p.text == "The sky is blue because it is the color of the sky."
    assert p.role == "assistant"
    assert p.thinking is None
    assert p.done_reason is None
    assert p.input_tokens == 26
    assert p.output_tokens == 290
    assert p.served_model == "llama3.2"
    assert p.context == [1, 2, 3]
    assert p.server_timings == {
        "total_duration_ns": 5043500667.0,
        "load_duration_ns": 5025959.0,
        "prompt_eval_duration_ns": 325953000.0,
        "eval_duration_ns": 4709213000.0,
    }
    assert p.embeddings is None


def test_parse_generate_with_done_reason() -> None:
    p = codec.parse_generate(ok(P.OLLAMA_GENERATE_SUFFIX))
    assert p.text.startswith("\n  if a == 0:")
    assert p.done_reason == "stop"
    assert (p.input_tokens, p.output_tokens) == (17, 63)
    assert p.served_model == "codellama:code"
    assert p.server_timings["eval_duration_ns"] == 953997000.0


def test_parse_chat_with_tool_calls() -> None:
    p = codec.parse_chat(ok(P.OLLAMA_CHAT_TOOLS))
    assert p.text == ""
    assert p.role == "assistant"
    assert p.tool_calls == [
        {
            "function": {
                "name": "get_current_weather",
                "arguments": {"format": "celsius", "location": "Paris, FR"},
            }
        }
    ]
    assert p.done_reason == "stop"
    assert (p.input_tokens, p.output_tokens) == (122, 33)
    assert p.server_timings == {
        "total_duration_ns": 885095291.0,
        "load_duration_ns": 3753500.0,
        "prompt_eval_duration_ns": 328493000.0,
        "eval_duration_ns": 552222000.0,
    }


def test_parse_chat_thinking_and_load() -> None:
    p = codec.parse_chat(ok(P.OLLAMA_CHAT_THINKING))
    assert (p.text, p.thinking) == ("The answer is 4.", "2 + 2 is 4.")
    p = codec.parse_chat(ok(P.OLLAMA_CHAT_LOAD))
    assert p.text == ""
    assert p.done_reason == "load"
    assert (p.input_tokens, p.output_tokens) == (None, None)
    assert p.server_timings == {}


def test_parse_embed() -> None:
    p = codec.parse_embed(ok(P.OLLAMA_EMBED))
    assert p.embeddings == P.OLLAMA_EMBED["embeddings"]
    assert p.input_tokens == 8
    assert p.output_tokens is None
    assert p.served_model == "all-minilm"
    assert p.server_timings == {"total_duration_ns": 14143917.0, "load_duration_ns": 1019500.0}


def test_parse_list() -> None:
    models = codec.parse_list(ok(P.OLLAMA_TAGS))
    assert models == [
        ListedModel(
            name="codellama:13b",
            size=7365960935,
            digest="9f438cb9cd581fc025612d27f7c1a6669ff83a8bb0ed86c94fcf4c5440555697",
            modified_at="2023-11-04T14:56:49.277302595-07:00",
            details=P.OLLAMA_TAGS["models"][0]["details"],
        ),
        ListedModel(
            name="llama3:latest",
            size=3825819519,
            digest="fe938a131f40e6f6d40083c9f0f430a515233eb2edaa6d72eb85c50d64f2300e",
            modified_at="2023-12-07T09:32:18.757212583-08:00",
            details=P.OLLAMA_TAGS["models"][1]["details"],
        ),
    ]
    assert codec.parse_list(ok({"models": []})) == []


def test_parse_ps() -> None:
    [m] = codec.parse_ps(ok(P.OLLAMA_PS))
    assert m.name == "mistral:latest"
    assert m.size == m.size_vram == 5137025024
    assert m.expires_at == "2024-06-04T14:38:31.83753-07:00"
    assert m.details["parameter_size"] == "7.2B"
    assert m.modified_at is None


def test_parse_show() -> None:
    shown = codec.parse_show(ok(P.OLLAMA_SHOW))
    assert shown == {
        "modelfile": P.OLLAMA_SHOW["modelfile"],
        "parameters": P.OLLAMA_SHOW["parameters"],
        "template": P.OLLAMA_SHOW["template"],
        "details": P.OLLAMA_SHOW["details"],
        "model_info": P.OLLAMA_SHOW["model_info"],
        "capabilities": ["completion", "tools"],
        "modified_at": "2025-01-01T00:00:00Z",
    }
    assert codec.parse_show(ok({})) == {"details": {}, "model_info": {}, "capabilities": []}


def test_error_message_and_overload() -> None:
    assert codec.error_message(WireResponse(404, {}, P.body(P.OLLAMA_NOT_FOUND))) == (
        "model 'llama3' not found, try pulling it first"
    )
    assert codec.error_message(WireResponse(404, {}, b"404 page not found")) == "404 page not found"
    assert codec.is_overload(WireResponse(503, {}, P.body(P.OLLAMA_BUSY)))
    assert not codec.is_overload(WireResponse(429, {}, b""))
    assert not codec.is_overload(WireResponse(500, {}, b""))
    assert codec.response_timings({"x-queue-time": "3"}) == {}


# -- streams -----------------------------------------------------------------------------


def test_chat_stream_every_split() -> None:
    pieces, finished = pieces_anywhere(
        lambda: codec.stream_parser("chat"), P.ndjson(*P.OLLAMA_CHAT_STREAM)
    )
    assert finished
    assert pieces == [
        Piece(text="The", served_model="llama3.2"),
        Piece(text=" ciel est bleu 🌍", served_model="llama3.2"),
        Piece(
            done=True,
            final=True,
            input_tokens=26,
            output_tokens=282,
            served_model="llama3.2",
            server_timings={
                "total_duration_ns": 4883583458.0,
                "load_duration_ns": 1334875.0,
                "prompt_eval_duration_ns": 342546000.0,
                "eval_duration_ns": 4535599000.0,
            },
        ),
    ]


def test_generate_stream_every_split_with_crlf() -> None:
    data = P.ndjson(*P.OLLAMA_GENERATE_STREAM).replace(b"\n", b"\r\n")
    pieces, finished = pieces_anywhere(lambda: codec.stream_parser("generate"), data)
    assert finished
    assert [p.text for p in pieces] == ["The", " sky 🦙 é", ""]
    last = pieces[-1]
    assert (last.done, last.final, last.done_reason) == (True, True, "stop")
    assert (last.input_tokens, last.output_tokens) == (26, 259)
    assert last.server_timings["load_duration_ns"] == 6338219291.0
    assert all(p.tokens is None for p in pieces)


def test_stream_thinking_and_tool_calls() -> None:
    data = P.ndjson(
        {"model": "qwen3", "message": {"role": "assistant", "content": "", "thinking": "hm"}},
        {
            "model": "qwen3",
            "message": {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "f", "arguments": {}}}],
            },
        },
        {"model": "qwen3", "response": "", "done": True, "done_reason": "stop"},
    )
    pieces, finished = run(codec.stream_parser("chat"), [data])
    assert finished
    assert pieces[0].thinking == "hm"
    assert pieces[1].tool_calls == [{"function": {"name": "f", "arguments": {}}}]
    gen = codec.stream_parser("generate")
    [piece] = gen.feed(P.ndjson({"response": "", "thinking": "let me see", "done": False}))
    assert piece.thinking == "let me see"


def test_truncated_stream_is_not_finished() -> None:
    data = P.ndjson(*P.OLLAMA_CHAT_STREAM[:2])
    pieces, finished = run(codec.stream_parser("chat"), [data])
    assert not finished
    assert len(pieces) == 2
    # A final line without its newline still counts once flushed.
    parser = codec.stream_parser("chat")
    full = P.ndjson(*P.OLLAMA_CHAT_STREAM).rstrip(b"\n")
    pieces, finished = run(parser, [full])
    assert finished
    assert pieces[-1].done


def test_truncated_mid_line_is_protocol_error() -> None:
    data = P.ndjson(*P.OLLAMA_CHAT_STREAM)[:-20]
    parser = codec.stream_parser("chat")
    assert len(parser.feed(data)) == 2
    with pytest.raises(ProtocolError):
        parser.flush()
    assert not parser.finished


def test_error_object_mid_stream_is_server_error_after_earlier_pieces() -> None:
    data = P.ndjson(P.OLLAMA_CHAT_STREAM[0], P.OLLAMA_STREAM_ERROR)
    parser = codec.stream_parser("chat")
    [first] = parser.feed(data)
    assert first.text == "The"
    with pytest.raises(ServerError) as info:
        parser.feed(b"")
    assert info.value.server_message == P.OLLAMA_STREAM_ERROR["error"]
    with pytest.raises(ServerError):
        parser.flush()


def test_error_object_first_raises_at_once() -> None:
    parser = codec.stream_parser("generate")
    with pytest.raises(ServerError, match="during the stream"):
        parser.feed(P.ndjson(P.OLLAMA_STREAM_ERROR))


@pytest.mark.parametrize(
    "line",
    [
        b"not json\n",
        b"[1, 2]\n",
        b'{"message": "text"}\n',
        b'{"message": {"content": 5}}\n',
        b'{"done": "yes"}\n',
        b'{"done": true, "eval_count": "12"}\n',
    ],
)
def test_malformed_stream_lines(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        codec.stream_parser("chat").feed(line)
