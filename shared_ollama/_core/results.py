"""Typed responses and chunks from decoded replies plus what the plan knows of the call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..protocols import Parsed, Piece
from ..records import CallRecord
from ..types import (
    ChatChunk,
    ChatResponse,
    EmbedResponse,
    GenerateChunk,
    GenerateResponse,
    Message,
    ServerTimings,
    Timings,
    Usage,
)

__all__ = ["CHUNKS", "RESPONSES", "chat_chunk", "generate_chunk", "response_fields"]

R = TypeVar("R", ChatResponse, GenerateResponse, EmbedResponse)


def response_fields(rec: CallRecord, parsed: Parsed) -> dict[str, Any]:
    """The fields every full response shares, from the call's record."""
    return {
        "model": rec.model or "",
        "served_model": parsed.served_model or rec.served_model or "",
        "endpoint": rec.endpoint or "",
        "usage": Usage(input_tokens=parsed.input_tokens, output_tokens=parsed.output_tokens),
        "timings": Timings(
            t_start_ns=rec.t_start_ns,
            t_first_chunk_ns=rec.t_first_chunk_ns,
            t_end_ns=rec.t_end_ns,
            server=ServerTimings.model_validate(rec.server_timings),
        ),
        "request_id": rec.request_id,
        "attempts": len(rec.attempts),
    }


def _message(p: Parsed | Piece) -> Message:
    return Message(role="assistant", content=p.text, thinking=p.thinking, tool_calls=p.tool_calls)


def chat_response(rec: CallRecord, parsed: Parsed) -> ChatResponse:
    """A full chat reply."""
    return ChatResponse(
        message=Message(
            role=parsed.role,
            content=parsed.text,
            thinking=parsed.thinking,
            tool_calls=parsed.tool_calls,
        ),
        done_reason=parsed.done_reason,
        **response_fields(rec, parsed),
    )


def generate_response(rec: CallRecord, parsed: Parsed) -> GenerateResponse:
    """A full completion reply."""
    return GenerateResponse(
        response=parsed.text,
        done_reason=parsed.done_reason,
        context=parsed.context,
        **response_fields(rec, parsed),
    )


def embed_response(rec: CallRecord, parsed: Parsed) -> EmbedResponse:
    """An embedding reply."""
    return EmbedResponse(embeddings=parsed.embeddings or [], **response_fields(rec, parsed))


def _usage(rec: CallRecord, piece: Piece) -> Usage | None:
    if not piece.done:
        return None
    return Usage(input_tokens=rec.input_tokens, output_tokens=rec.output_tokens)


def chat_chunk(rec: CallRecord, piece: Piece) -> ChatChunk:
    """One streamed chat chunk."""
    return ChatChunk(
        model=rec.model or "",
        served_model=rec.served_model or "",
        endpoint=rec.endpoint or "",
        message=_message(piece),
        done=piece.done,
        done_reason=piece.done_reason,
        usage=_usage(rec, piece),
        tokens=piece.tokens,
    )


def generate_chunk(rec: CallRecord, piece: Piece) -> GenerateChunk:
    """One streamed completion chunk."""
    return GenerateChunk(
        model=rec.model or "",
        served_model=rec.served_model or "",
        endpoint=rec.endpoint or "",
        response=piece.text,
        done=piece.done,
        done_reason=piece.done_reason,
        usage=_usage(rec, piece),
        tokens=piece.tokens,
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
