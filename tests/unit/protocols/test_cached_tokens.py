"""Prompt-cache hits as servers report them: OpenAI's ``prompt_tokens_details`` and
llama.cpp's ``timings.cache_n``, in whole replies and in the last stream chunk."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from shared_ollama.errors import ProtocolError
from shared_ollama.protocols import OpenAICodec, WireResponse

from . import payloads as P
from .streaming import pieces_anywhere

codec = OpenAICodec()


def ok(obj: object) -> WireResponse:
    return WireResponse(200, {"content-type": "application/json"}, P.body(obj))


def with_usage(obj: dict[str, Any], **usage: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["usage"] = {**out["usage"], **usage}
    return out


def test_openai_prompt_tokens_details() -> None:
    reply = with_usage(P.LLAMACPP_CHAT, prompt_tokens_details={"cached_tokens": 8})
    del reply["timings"]
    assert codec.parse_chat(ok(reply)).cached_tokens == 8
    # Null details (vLLM without prefix caching) or none at all: not said.
    reply = with_usage(P.LLAMACPP_CHAT, prompt_tokens_details=None)
    del reply["timings"]
    assert codec.parse_chat(ok(reply)).cached_tokens is None
    assert codec.parse_generate(ok(P.VLLM_COMPLETION)).cached_tokens is None


def test_llamacpp_cache_n() -> None:
    reply = copy.deepcopy(P.LLAMACPP_CHAT)
    reply["timings"]["cache_n"] = 6
    assert codec.parse_chat(ok(reply)).cached_tokens == 6
    assert codec.parse_chat(ok(P.LLAMACPP_CHAT)).cached_tokens is None


def test_hostile_values_are_typed_errors_or_ignored() -> None:
    reply = with_usage(P.LLAMACPP_CHAT, prompt_tokens_details={"cached_tokens": "many"})
    with pytest.raises(ProtocolError):
        codec.parse_chat(ok(reply))
    reply = with_usage(P.LLAMACPP_CHAT, prompt_tokens_details=[1, 2])
    with pytest.raises(ProtocolError):
        codec.parse_chat(ok(reply))
    reply = with_usage(P.LLAMACPP_CHAT, prompt_tokens_details={"cached_tokens": -5})
    assert codec.parse_chat(ok(reply)).cached_tokens is None


def test_stream_final_usage_chunk() -> None:
    head = {"model": "m", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
    end = {"model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    usage = {
        "model": "m",
        "choices": [],
        "usage": {
            "prompt_tokens": 20,
            "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": 16},
        },
    }
    pieces, finished = pieces_anywhere(lambda: codec.stream_parser("chat"), P.sse(head, end, usage))
    assert finished
    assert [p.cached_tokens for p in pieces] == [None, None, 16, None]
    llama_end = {**end, "timings": {"cache_n": 12, "prompt_n": 3, "prompt_ms": 1.0}}
    pieces, _ = pieces_anywhere(lambda: codec.stream_parser("chat"), P.sse(head, llama_end))
    assert pieces[1].cached_tokens == 12
