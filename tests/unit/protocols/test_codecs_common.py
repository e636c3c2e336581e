"""What every codec promises: the registry, and no reply shape escapes as KeyError/TypeError."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from typing import Any, get_args

import pytest

import shared_ollama.protocols as protocols
from shared_ollama.errors import ConfigError, ProtocolError, ServerError
from shared_ollama.protocols import (
    Codec,
    OllamaCodec,
    OpenAICodec,
    TGICodec,
    WireResponse,
    codec_for,
)
from shared_ollama.protocols.decoders import SSEDecoder
from shared_ollama.types import Operation

from . import payloads as P
from .streaming import run

KINDS = ("ollama", "openai", "tgi")


def test_codec_for_returns_singletons() -> None:
    assert isinstance(codec_for("ollama"), OllamaCodec)
    assert isinstance(codec_for("openai"), OpenAICodec)
    assert isinstance(codec_for("tgi"), TGICodec)
    for kind in KINDS:
        assert codec_for(kind) is codec_for(kind)
        assert codec_for(kind).kind == kind
    assert protocols.KINDS == KINDS
    with pytest.raises(ConfigError, match="unknown protocol kind 'auto'"):
        codec_for("auto")


def test_reexports() -> None:
    for name in protocols.__all__:
        assert hasattr(protocols, name)
    from shared_ollama.protocols import base

    assert set(base.__all__) <= set(protocols.__all__)


@pytest.mark.parametrize("kind", KINDS)
def test_operations_are_known_and_consistent(kind: str) -> None:
    codec = codec_for(kind)
    assert codec.operations <= set(get_args(Operation))
    assert ("show" in codec.operations) == (codec.show("m") is not None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("operation", ["chat", "generate"])
def test_stream_parsers_are_fresh(kind: str, operation: Any) -> None:
    codec = codec_for(kind)
    a, b = codec.stream_parser(operation), codec.stream_parser(operation)
    assert a is not b
    assert not a.finished
    assert a.flush() == []


# -- shape fuzzing -------------------------------------------------------------------------
# Every value of every documented reply is replaced by every other JSON type (and every
# key removed): parsing must succeed or raise ProtocolError, never anything else.

SUBSTITUTES: list[Any] = [None, 0, -1, 1.5, "x", True, [], {}, [1], {"a": 1}]


def mutations(obj: Any) -> Iterator[Any]:
    """Copies of ``obj`` with one value swapped for another type, or one key removed."""
    for path in _paths(obj):
        for sub in SUBSTITUTES:
            yield _replace(obj, path, sub)
        if path and isinstance(path[-1], str):
            yield _replace(obj, path, _DELETE)


_DELETE = object()


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj[:2]):
            yield from _paths(value, (*prefix, i))


def _replace(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    out = copy.deepcopy(obj)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if value is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


Parse = Callable[[Codec, WireResponse], Any]

REPLIES: list[tuple[str, str, Any, dict[str, str]]] = [
    ("ollama", "parse_chat", P.OLLAMA_CHAT_TOOLS, {}),
    ("ollama", "parse_chat", P.OLLAMA_CHAT_THINKING, {}),
    ("ollama", "parse_generate", P.OLLAMA_GENERATE, {}),
    ("ollama", "parse_embed", P.OLLAMA_EMBED, {}),
    ("ollama", "parse_list", P.OLLAMA_TAGS, {}),
    ("ollama", "parse_ps", P.OLLAMA_PS, {}),
    ("ollama", "parse_show", P.OLLAMA_SHOW, {}),
    ("openai", "parse_chat", P.VLLM_CHAT, {}),
    ("openai", "parse_chat", P.OPENAI_CHAT_TOOL_CALL, {}),
    ("openai", "parse_chat", P.LLAMACPP_CHAT, {}),
    ("openai", "parse_generate", P.VLLM_COMPLETION, {}),
    ("openai", "parse_embed", P.OPENAI_EMBEDDINGS, {}),
    ("openai", "parse_list", P.VLLM_MODELS, {}),
    ("openai", "parse_show", P.VLLM_MODELS["data"][0], {}),
    ("tgi", "parse_generate", P.TGI_GENERATE, P.TGI_GENERATE_HEADERS),
    ("tgi", "parse_chat", P.TGI_CHAT, P.TGI_GENERATE_HEADERS),
    ("tgi", "parse_list", P.TGI_INFO, {}),
    ("tgi", "parse_show", P.TGI_INFO, {}),
]


@pytest.mark.parametrize(("kind", "method", "reply", "headers"), REPLIES)
def test_every_wrong_shape_is_protocol_error(
    kind: str, method: str, reply: Any, headers: dict[str, str]
) -> None:
    parse = getattr(codec_for(kind), method)
    parse(WireResponse(200, headers, P.body(reply)))  # the real one parses
    for bad in mutations(reply):
        with contextlib.suppress(ProtocolError):
            parse(WireResponse(200, headers, P.body(bad)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "raw", [b"", b"null", b"[]", b"{", b"\xff\xfe", b'"text"', b"<html>502</html>", b"1e999"]
)
def test_undecodable_bodies(kind: str, raw: bytes) -> None:
    codec = codec_for(kind)
    methods = ["parse_chat", "parse_generate", "parse_list", "parse_ps", "parse_show"]
    if "embed" in codec.operations:
        methods.append("parse_embed")
    for method in methods:
        with pytest.raises(ProtocolError):
            getattr(codec, method)(WireResponse(200, {}, raw))


def _sse_objects(data: bytes) -> list[Any]:
    dec = SSEDecoder()
    return [
        json.loads(e.data) if e.data != "[DONE]" else "[DONE]" for e in dec.feed(data) + dec.flush()
    ]


def _encode_sse(objs: list[Any]) -> bytes:
    return b"".join(
        b"data: " + (o.encode() if o == "[DONE]" else json.dumps(o).encode()) + b"\n\n"
        for o in objs
    )


STREAMS: list[tuple[str, Any, list[Any], Callable[[list[Any]], bytes]]] = [
    ("ollama", "chat", P.OLLAMA_CHAT_STREAM, lambda objs: P.ndjson(*objs)),
    ("ollama", "generate", P.OLLAMA_GENERATE_STREAM, lambda objs: P.ndjson(*objs)),
    ("openai", "chat", _sse_objects(P.VLLM_CHAT_STREAM), _encode_sse),
    ("openai", "chat", _sse_objects(P.LLAMACPP_CHAT_STREAM), _encode_sse),
    ("openai", "generate", _sse_objects(P.VLLM_COMPLETION_STREAM), _encode_sse),
    ("tgi", "generate", _sse_objects(P.TGI_GENERATE_STREAM), _encode_sse),
    ("tgi", "chat", _sse_objects(P.TGI_CHAT_STREAM), _encode_sse),
]


@pytest.mark.parametrize(("kind", "operation", "objs", "encode"), STREAMS)
def test_every_wrong_stream_shape_is_protocol_or_server_error(
    kind: str, operation: Any, objs: list[Any], encode: Callable[[list[Any]], bytes]
) -> None:
    codec = codec_for(kind)
    _, finished = run(codec.stream_parser(operation), [encode(objs)])
    assert finished
    for i, obj in enumerate(objs):
        if obj == "[DONE]":
            continue
        for bad in mutations(obj):
            data = encode([*objs[:i], bad, *objs[i + 1 :]])
            with contextlib.suppress(ProtocolError, ServerError):
                run(codec.stream_parser(operation), [data])


@pytest.mark.parametrize("module", ["shared_ollama._core.status", "shared_ollama.protocols"])
def test_doctests(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0
    assert result.failed == 0
