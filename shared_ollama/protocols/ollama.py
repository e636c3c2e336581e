"""Ollama's native API (``/api/*``): request bodies, replies and the NDJSON stream.

Options pass through untouched; durations (ns) from the final object become server timings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Final, Literal

from ..errors import ProtocolError
from ..types import Message
from ._framed import FramedStream
from .base import (
    ChatRequest,
    Codec,
    EmbedRequest,
    GenerateRequest,
    ListedModel,
    Parsed,
    Piece,
    StreamParser,
    WireRequest,
    WireResponse,
)
from .decoders import (
    NDJSONDecoder,
    decode_json,
    error_text,
    expect_dict,
    float_list,
    opt_bool,
    opt_dict,
    opt_int,
    opt_list,
    opt_str,
    stream_error,
)

__all__ = ["OllamaCodec"]

#: Ollama's duration fields (ns) -> ``types.ServerTimings`` names.
_DURATIONS: Final = {
    "total_duration": "total_duration_ns",
    "load_duration": "load_duration_ns",
    "prompt_eval_duration": "prompt_eval_duration_ns",
    "eval_duration": "eval_duration_ns",
}
#: Top-level ``/api/show`` fields kept besides the typed ones.
_SHOW_TEXT: Final = ("modelfile", "parameters", "template", "license", "system", "modified_at")


class OllamaCodec(Codec):
    """Ollama's native API. Stateless; ``codec_for("ollama")`` returns the shared one."""

    kind: ClassVar[Literal["ollama", "openai", "tgi"]] = "ollama"
    #: ``load``: a chat with no messages, Ollama's way to load (or, with ``keep_alive=0``,
    #: unload) a model; other engines would generate a reply from nothing instead.
    operations: ClassVar[frozenset[str]] = frozenset(
        {"chat", "load", "generate", "embed", "list", "ps", "show"}
    )

    # -- building -------------------------------------------------------------------
    def chat(self, req: ChatRequest) -> WireRequest:
        """``POST /api/chat``; ``stream`` is always explicit because Ollama defaults it on."""
        body: dict[str, Any] = {
            "model": req.model,
            "messages": [_message(m) for m in req.messages],
            "stream": req.stream,
        }
        _put(
            body,
            options=_options(req.options),
            format=req.format,
            tools=req.tools,
            think=req.think,
            keep_alive=req.keep_alive,
        )
        return WireRequest("POST", "/api/chat", json=body, stream=req.stream)

    def generate(self, req: GenerateRequest) -> WireRequest:
        """``POST /api/generate`` with every field the request sets."""
        body: dict[str, Any] = {"model": req.model, "prompt": req.prompt, "stream": req.stream}
        _put(
            body,
            suffix=req.suffix,
            system=req.system,
            template=req.template,
            context=req.context,
            images=req.images,
            raw=req.raw,
            options=_options(req.options),
            format=req.format,
            think=req.think,
            keep_alive=req.keep_alive,
        )
        return WireRequest("POST", "/api/generate", json=body, stream=req.stream)

    def embed(self, req: EmbedRequest) -> WireRequest:
        """``POST /api/embed`` with a list input."""
        body: dict[str, Any] = {"model": req.model, "input": list(req.input)}
        _put(
            body,
            truncate=req.truncate,
            dimensions=req.dimensions,
            options=_options(req.options),
            keep_alive=req.keep_alive,
        )
        return WireRequest("POST", "/api/embed", json=body)

    def list_models(self) -> WireRequest:
        """``GET /api/tags``."""
        return WireRequest("GET", "/api/tags")

    def ps(self) -> WireRequest:
        """``GET /api/ps``: the models loaded in memory."""
        return WireRequest("GET", "/api/ps")

    def show(self, model: str) -> WireRequest:
        """``POST /api/show``."""
        return WireRequest("POST", "/api/show", json={"model": model})

    def health(self) -> WireRequest:
        """``GET /api/version``: cheap and touches no model."""
        return WireRequest("GET", "/api/version")

    # -- parsing --------------------------------------------------------------------
    def parse_chat(self, resp: WireResponse) -> Parsed:
        """Decode a non-stream ``/api/chat`` reply."""
        what = "Ollama chat reply"
        obj = _object(resp.body, what)
        message = opt_dict(obj, "message", what) or {}
        return Parsed(
            text=opt_str(message, "content", what) or "",
            role=opt_str(message, "role", what) or "assistant",
            thinking=opt_str(message, "thinking", what),
            tool_calls=_dicts(message, "tool_calls", what),
            **_final(obj, what),
        )

    def parse_generate(self, resp: WireResponse) -> Parsed:
        """Decode a non-stream ``/api/generate`` reply."""
        what = "Ollama generate reply"
        obj = _object(resp.body, what)
        return Parsed(
            text=opt_str(obj, "response", what) or "",
            thinking=opt_str(obj, "thinking", what),
            context=_ints(obj, "context", what),
            **_final(obj, what),
        )

    def parse_embed(self, resp: WireResponse) -> Parsed:
        """Decode an ``/api/embed`` reply."""
        what = "Ollama embed reply"
        obj = _object(resp.body, what)
        vectors = opt_list(obj, "embeddings", what)
        if vectors is None:
            raise ProtocolError(f"{what}: no 'embeddings'")
        return Parsed(embeddings=[float_list(v, what) for v in vectors], **_final(obj, what))

    def parse_list(self, resp: WireResponse) -> list[ListedModel]:
        """Decode ``/api/tags``."""
        return _models(resp, "Ollama model list")

    def parse_ps(self, resp: WireResponse) -> list[ListedModel]:
        """Decode ``/api/ps`` (adds ``size_vram`` and ``expires_at``)."""
        return _models(resp, "Ollama running-model list")

    def parse_show(self, resp: WireResponse) -> dict[str, Any]:
        """Decode ``/api/show`` into ``types.ShowResponse`` fields."""
        what = "Ollama show reply"
        obj = _object(resp.body, what)
        out: dict[str, Any] = {
            "details": opt_dict(obj, "details", what) or {},
            "model_info": opt_dict(obj, "model_info", what) or {},
            "capabilities": [str(c) for c in opt_list(obj, "capabilities", what) or []],
        }
        for key in _SHOW_TEXT:
            if (value := opt_str(obj, key, what)) is not None:
                out[key] = value
        return out

    def stream_parser(self, operation: Literal["chat", "generate"]) -> StreamParser:
        """A fresh NDJSON decoder for one streamed reply."""
        return _OllamaStream(operation)

    def error_message(self, resp: WireResponse) -> str | None:
        """``{"error": "..."}``, or the body as text (Go's plain "404 page not found")."""
        return error_text(resp.body)

    def is_overload(self, resp: WireResponse) -> bool:
        """503 is Ollama's "server busy" when ``OLLAMA_MAX_QUEUE`` is full."""
        return resp.status == 503


class _OllamaStream(FramedStream[Any]):
    """NDJSON objects -> Pieces; the ``done: true`` object is the end marker."""

    def __init__(self, operation: Literal["chat", "generate"]) -> None:
        what = f"Ollama {operation} stream"
        super().__init__(NDJSONDecoder(what=what), what)
        self._chat = operation == "chat"

    def _piece(self, value: Any) -> Iterable[Piece]:
        what = self._what
        obj = expect_dict(value, what)
        if "error" in obj:  # generation failed after the 200 head was sent
            raise stream_error(obj)
        done = opt_bool(obj, "done", what) or False
        self._finished = self._finished or done
        if self._chat:
            message = opt_dict(obj, "message", what) or {}
            text = opt_str(message, "content", what) or ""
            thinking = opt_str(message, "thinking", what)
            tool_calls = _dicts(message, "tool_calls", what)
        else:
            text = opt_str(obj, "response", what) or ""
            thinking = opt_str(obj, "thinking", what)
            tool_calls = None
        return [
            Piece(
                text=text,
                thinking=thinking,
                tool_calls=tool_calls,
                done=done,
                final=done,
                **_final(obj, what),
            )
        ]


# -- helpers -----------------------------------------------------------------------------


def _put(body: dict[str, Any], **fields: Any) -> None:
    # Absent beats null: Ollama reads a null as "set to the zero value" for some fields.
    body.update((k, v) for k, v in fields.items() if v is not None)


def _options(options: Mapping[str, Any]) -> dict[str, Any] | None:
    kept = {k: v for k, v in options.items() if v is not None}
    return kept or None


def _message(m: Message) -> dict[str, Any]:
    # Extra fields (``tool_name`` on tool results, ...) are Ollama's own: keep them.
    return m.model_dump(exclude_none=True)


def _object(body: bytes, what: str) -> dict[str, Any]:
    return expect_dict(decode_json(body, what), what)


def _final(obj: Mapping[str, Any], what: str) -> dict[str, Any]:
    """What the final object says about the whole call (also harmless on other objects)."""
    timings: dict[str, float] = {}
    for key, name in _DURATIONS.items():
        if (ns := opt_int(obj, key, what)) is not None:
            timings[name] = float(ns)
    return {
        "done_reason": opt_str(obj, "done_reason", what),
        "input_tokens": opt_int(obj, "prompt_eval_count", what),
        "output_tokens": opt_int(obj, "eval_count", what),
        "served_model": opt_str(obj, "model", what),
        "server_timings": timings,
    }


def _dicts(obj: Mapping[str, Any], key: str, what: str) -> list[dict[str, Any]] | None:
    items = opt_list(obj, key, what)
    return None if items is None else [expect_dict(i, f"{what} {key}") for i in items]


def _ints(obj: Mapping[str, Any], key: str, what: str) -> list[int] | None:
    items = opt_list(obj, key, what)
    if items is None:
        return None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ProtocolError(f"{what}: {key!r} should hold integers")
    return items


def _models(resp: WireResponse, what: str) -> list[ListedModel]:
    obj = _object(resp.body, what)
    out: list[ListedModel] = []
    for item in opt_list(obj, "models", what) or []:
        m = expect_dict(item, what)
        name = opt_str(m, "name", what) or opt_str(m, "model", what)
        if not name:
            raise ProtocolError(f"{what}: a model without a name")
        out.append(
            ListedModel(
                name=name,
                size=opt_int(m, "size", what),
                size_vram=opt_int(m, "size_vram", what),
                digest=opt_str(m, "digest", what),
                modified_at=opt_str(m, "modified_at", what),
                expires_at=opt_str(m, "expires_at", what),
                details=opt_dict(m, "details", what) or {},
            )
        )
    return out
