"""Typed responses and chunks from decoded replies plus what the plan knows of the call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..protocols import Parsed, Piece
from ..records import CallRecord
from ..types import (
    ChatChunk,
    ChatResponse,
    EmbeddingsResponse,
    EmbedResponse,
    GenerateChunk,
    GenerateResponse,
)

__all__ = ["CHUNKS", "RESPONSES", "chat_chunk", "generate_chunk", "response_fields"]

R = TypeVar("R", ChatResponse, GenerateResponse, EmbedResponse)


def ollama_counts(rec: CallRecord, end_ns: int) -> dict[str, Any]:
    """ollama-python's counters and durations (ns) for a call that ended at ``end_ns``.

    Durations come from the server where it reports them: Ollama's own fields, llama.cpp's
    ``timings`` (prompt and generation), TGI's headers (queue + inference as the total,
    time per token x tokens as the generation). Otherwise they are measured here: the total
    from the call's start; for a stream, the prompt as the time to the first chunk and the
    generation from the first chunk to the last token-carrying one; for a whole reply,
    generation as the total (prefill cannot be told apart from outside). So
    ``eval_count / eval_duration * 1e9`` (tokens/s) works on every endpoint of a mixed pool.
    """
    # A server's 0 (TGI rounds its headers to whole milliseconds) says nothing: measured.
    st = {k: v for k, v in rec.server_timings.items() if v > 0}
    measured = max(1, end_ns - rec.t_start_ns)
    total = st.get("total_duration_ns")
    if total is None and "inference_time_ms" in st:
        total = (st.get("queue_time_ms", 0.0) + st["inference_time_ms"]) * 1e6
    prompt = st.get("prompt_eval_duration_ns")
    gen = st.get("eval_duration_ns")
    if gen is None and "time_per_token_ms" in st and rec.output_tokens:
        gen = st["time_per_token_ms"] * rec.output_tokens * 1e6
    first, last = rec.t_first_chunk_ns, rec.t_last_token_ns
    if rec.stream and first is not None:
        if prompt is None:
            prompt = max(1, first - rec.t_start_ns)
        if gen is None:
            gen = max(1, (last if last is not None and last > first else end_ns) - first)
    if gen is None:
        gen = measured if total is None else total
    load = st.get("load_duration_ns")
    return {
        "total_duration": int(total if total is not None else measured),
        "load_duration": None if load is None else int(load),
        "prompt_eval_count": rec.input_tokens,
        "prompt_eval_duration": None if prompt is None else int(prompt),
        "eval_count": rec.output_tokens,
        "eval_duration": int(gen),
    }


def response_fields(rec: CallRecord, parsed: Parsed) -> dict[str, Any]:
    """The fields every full response shares, from the call's record, as plain data: the
    response is validated once, nested models included (one pydantic call, not five)."""
    return {
        **ollama_counts(rec, rec.t_end_ns or rec.t_start_ns),
        "model": rec.model or "",
        "served_model": parsed.served_model or rec.served_model or "",
        "endpoint": rec.endpoint or "",
        "usage": {
            "input_tokens": parsed.input_tokens,
            "output_tokens": parsed.output_tokens,
            "cached_tokens": rec.cached_tokens,
        },
        "timings": {
            "t_start_ns": rec.t_start_ns,
            "t_first_chunk_ns": rec.t_first_chunk_ns,
            "t_end_ns": rec.t_end_ns,
            "server": rec.server_timings,
        },
        "request_id": rec.request_id,
        "attempts": len(rec.attempts),
        "routing": rec.routing,
    }


def _message(p: Parsed | Piece, role: str = "assistant") -> dict[str, Any]:
    message: dict[str, Any] = {"role": role, "content": p.text}
    if p.thinking is not None:
        message["thinking"] = p.thinking
    if p.tool_calls is not None:
        message["tool_calls"] = p.tool_calls
    return message


def chat_response(rec: CallRecord, parsed: Parsed) -> ChatResponse:
    """A full chat reply."""
    fields = response_fields(rec, parsed)
    fields["message"] = _message(parsed, parsed.role)
    fields["done_reason"] = parsed.done_reason
    return ChatResponse.model_validate(fields)


def generate_response(rec: CallRecord, parsed: Parsed) -> GenerateResponse:
    """A full completion reply."""
    fields = response_fields(rec, parsed)
    fields.update(response=parsed.text, done_reason=parsed.done_reason, context=parsed.context)
    return GenerateResponse.model_validate(fields)


def embed_response(rec: CallRecord, parsed: Parsed) -> EmbedResponse:
    """An embedding reply."""
    return EmbedResponse(embeddings=parsed.embeddings or [], **response_fields(rec, parsed))


def _chunk_fields(rec: CallRecord, piece: Piece) -> dict[str, Any]:
    """What every streamed chunk carries; the last one also the usage and ollama's
    counters, as ollama sends them. Plain data: one validation per chunk."""
    fields: dict[str, Any] = {
        "model": rec.model or "",
        "served_model": rec.served_model or "",
        "endpoint": rec.endpoint or "",
        "done": piece.done,
        "done_reason": piece.done_reason,
        "tokens": piece.tokens,
    }
    if piece.done:
        fields["usage"] = {
            "input_tokens": rec.input_tokens,
            "output_tokens": rec.output_tokens,
            "cached_tokens": rec.cached_tokens,
        }
        fields["routing"] = rec.routing
        end = rec.chunk_times_ns[-1] if rec.chunk_times_ns else rec.t_start_ns
        fields.update(ollama_counts(rec, end))
    return fields


def chat_chunk(rec: CallRecord, piece: Piece) -> ChatChunk:
    """One streamed chat chunk."""
    fields = _chunk_fields(rec, piece)
    fields["message"] = _message(piece)
    return ChatChunk.model_validate(fields)


def generate_chunk(rec: CallRecord, piece: Piece) -> GenerateChunk:
    """One streamed completion chunk."""
    fields = _chunk_fields(rec, piece)
    fields["response"] = piece.text
    return GenerateChunk.model_validate(fields)


def embeddings_response(r: EmbedResponse) -> EmbeddingsResponse:
    """ollama's legacy ``embeddings`` answer (one vector) from an ``embed`` answer."""
    fields = r.model_dump(include={"model", "served_model", "endpoint", "request_id", "attempts"})
    vector = r.embeddings[0] if r.embeddings else []
    return EmbeddingsResponse(
        embedding=vector, usage=r.usage, timings=r.timings, routing=r.routing, **fields
    )


RESPONSES: dict[str, Callable[[CallRecord, Parsed], Any]] = {
    "chat": chat_response,
    "generate": generate_response,
    "embed": embed_response,
}
CHUNKS: dict[str, Callable[[CallRecord, Piece], Any]] = {
    "chat": chat_chunk,
    "generate": generate_chunk,
}
