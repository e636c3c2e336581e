"""Hugging Face TGI: native ``/generate`` routes, ``/info``, timing headers, SSE token stream.

Chat goes through TGI's Messages API (``/v1/chat/completions``), parsed as in openai.py.

Option translation for ``/generate`` (Ollama names in, ``parameters`` fields out):

* ``num_predict`` -> ``max_new_tokens``, ``repeat_penalty`` -> ``repetition_penalty``;
  ``temperature``, ``top_p``, ``top_k``, ``seed``, ``typical_p``, ``frequency_penalty``
  keep their names; ``stop`` is always sent as a list.
* TGI only takes ``temperature`` > 0, 0 < ``top_p`` < 1 and ``top_k`` > 0. Values outside
  those ranges mean "off" in Ollama (greedy, no nucleus, no top-k), which is TGI's
  default, so they are dropped instead of being sent and rejected.
* Allowlist of native fields passed as-is: ``do_sample``, ``truncate``, ``watermark``,
  ``repetition_penalty``. Everything else (``num_ctx``, ``mirostat``...) is ignored.

For chat: ``num_predict`` -> ``max_tokens``; ``temperature``, ``top_p``, ``seed``,
``stop`` (as a list), ``presence_penalty``, ``frequency_penalty``; allowlist
``logprobs``, ``top_logprobs``. ``format`` becomes TGI's grammar, ``{"type": "json",
"value": schema}``; ``think`` and ``keep_alive`` have no equivalent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Final, Literal

from ..errors import InvalidRequest, ProtocolError
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
    JSON_ERRORS,
    SSEDecoder,
    SSEEvent,
    decode_json,
    error_text,
    excerpt,
    expect_dict,
    opt_bool,
    opt_dict,
    opt_int,
    opt_str,
    stream_error,
)
from .openai import OpenAIStream, chat_body, parse_completion, translate_options

__all__ = ["TGICodec", "TGI_CHAT_OPTIONS", "TGI_OPTIONS"]

#: Ollama option -> ``/generate`` ``parameters`` field.
TGI_OPTIONS: Final[Mapping[str, str]] = {
    "num_predict": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
    "typical_p": "typical_p",
    "frequency_penalty": "frequency_penalty",
}
_PASSTHROUGH: Final = frozenset({"do_sample", "truncate", "watermark", "repetition_penalty"})
#: Ollama option -> Messages API field.
TGI_CHAT_OPTIONS: Final[Mapping[str, str]] = {
    "num_predict": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
_CHAT_PASSTHROUGH: Final = frozenset({"logprobs", "top_logprobs"})
# TGI's StreamOptions has include_usage only; vLLM's continuous_usage_stats stays out.
_STREAM_OPTIONS: Final[Mapping[str, bool]] = {"include_usage": True}
#: TGI's finish reasons -> the OpenAI/Ollama words the rest of the library uses.
_FINISH_REASONS: Final[Mapping[str, str]] = {
    "eos_token": "stop",
    "stop_sequence": "stop",
    "length": "length",
}
#: Timing headers -> ``types.ServerTimings`` names (all ms but x-compute-time, in s).
_TIMING_HEADERS: Final[Mapping[str, str]] = {
    "x-queue-time": "queue_time_ms",
    "x-inference-time": "inference_time_ms",
    "x-time-per-token": "time_per_token_ms",
    "x-validation-time": "validation_time_ms",
    "x-compute-time": "compute_time_s",
}
#: The open ranges TGI accepts; outside them Ollama's value means "off" (see above).
_OPEN_RANGES: Final[Mapping[str, tuple[float, float]]] = {
    "temperature": (0.0, math.inf),
    "top_p": (0.0, 1.0),
    "top_k": (0.0, math.inf),
}
#: ``/info`` fields that describe the model (the rest describe the router).
_SHOW_DETAILS: Final = (
    "model_id",
    "model_sha",
    "model_dtype",
    "model_device_type",
    "model_pipeline_tag",
    "max_input_tokens",
    "max_total_tokens",
    "version",
)


class TGICodec(Codec):
    """Text Generation Inference. Stateless; ``codec_for("tgi")`` returns the shared one.

    TGI serves one model, described by ``/info``; it serves no embeddings.
    """

    kind: ClassVar[Literal["ollama", "openai", "tgi"]] = "tgi"
    operations: ClassVar[frozenset[str]] = frozenset({"chat", "generate", "list", "ps", "show"})

    # -- building -------------------------------------------------------------------
    def chat(self, req: ChatRequest) -> WireRequest:
        """``POST /v1/chat/completions`` (TGI's Messages API; it ignores ``model``)."""
        body = chat_body(
            req,
            options=TGI_CHAT_OPTIONS,
            passthrough=_CHAT_PASSTHROUGH,
            stream_options=_STREAM_OPTIONS,
            response_format=_grammar,
            stop_as_list=True,
        )
        body["model"] = req.model or "tgi"
        return WireRequest("POST", "/v1/chat/completions", json=body, stream=req.stream)

    def generate(self, req: GenerateRequest) -> WireRequest:
        """``POST /generate``, or ``/generate_stream`` when streaming.

        ``system`` is prepended to the prompt; ``suffix`` (fill-in-the-middle) is
        refused because TGI cannot honour it; ``template``, ``context``, ``images``,
        ``raw``, ``think`` and ``keep_alive`` have no equivalent and are ignored.
        """
        if req.suffix:
            raise InvalidRequest("TGI does not support suffix (fill-in-the-middle)")
        params: dict[str, Any] = {"details": True}
        params.update(translate_options(req.options, TGI_OPTIONS, _PASSTHROUGH, stop_as_list=True))
        _drop_off_values(params)
        if (grammar := _grammar(req.format)) is not None:
            params["grammar"] = grammar
        # Prompt-token details are refused on the stream route and cost bandwidth anyway.
        params["decoder_input_details"] = False
        prompt = f"{req.system}\n\n{req.prompt}" if req.system else req.prompt
        path = "/generate_stream" if req.stream else "/generate"
        body = {"inputs": prompt, "parameters": params}
        return WireRequest("POST", path, json=body, stream=req.stream)

    def embed(self, req: EmbedRequest) -> WireRequest:
        """Always InvalidRequest: ``operations`` has no ``embed``."""
        raise InvalidRequest("TGI does not serve embeddings", model=req.model)

    def list_models(self) -> WireRequest:
        """``GET /info``: the one model this server holds."""
        return WireRequest("GET", "/info")

    def ps(self) -> WireRequest | None:
        """None: the one model is always loaded."""
        return None

    def show(self, model: str) -> WireRequest:
        """``GET /info`` (whatever the model: the server has only one)."""
        return WireRequest("GET", "/info")

    def health(self) -> WireRequest:
        """``GET /health``."""
        return WireRequest("GET", "/health")

    # -- parsing --------------------------------------------------------------------
    def parse_chat(self, resp: WireResponse) -> Parsed:
        """Decode a Messages API reply, plus what TGI's headers add."""
        parsed = parse_completion(resp.body, chat=True, what="TGI chat reply")
        if parsed.done_reason is not None:
            parsed.done_reason = _finish_reason(parsed.done_reason)
        if parsed.input_tokens is None:
            parsed.input_tokens = _header_int(resp.headers, "x-prompt-tokens")
        if parsed.output_tokens is None:
            parsed.output_tokens = _header_int(resp.headers, "x-generated-tokens")
        parsed.served_model = parsed.served_model or _header(resp.headers, "x-model-id")
        parsed.server_timings.update(self.response_timings(resp.headers))
        return parsed

    def parse_generate(self, resp: WireResponse) -> Parsed:
        """Decode ``/generate``: text and ``details`` from the body, the rest from headers."""
        what = "TGI generate reply"
        obj = expect_dict(decode_json(resp.body, what), what)
        text = opt_str(obj, "generated_text", what)
        if text is None:
            raise ProtocolError(f"{what}: no 'generated_text'")
        details = opt_dict(obj, "details", what) or {}
        input_tokens = _header_int(resp.headers, "x-prompt-tokens")
        if input_tokens is None:
            input_tokens = opt_int(details, "input_length", what)
        output_tokens = opt_int(details, "generated_tokens", what)
        if output_tokens is None:
            output_tokens = _header_int(resp.headers, "x-generated-tokens")
        reason = opt_str(details, "finish_reason", what)
        return Parsed(
            text=text,
            done_reason=None if reason is None else _finish_reason(reason),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            served_model=_header(resp.headers, "x-model-id"),
            server_timings=self.response_timings(resp.headers),
        )

    def parse_embed(self, resp: WireResponse) -> Parsed:
        """Always InvalidRequest: TGI serves no embeddings."""
        raise InvalidRequest("TGI does not serve embeddings")

    def parse_list(self, resp: WireResponse) -> list[ListedModel]:
        """``/info`` -> one ListedModel; the other info fields go to ``details``."""
        info = _info(resp)
        details = {k: v for k, v in info.items() if k != "model_id"}
        return [ListedModel(name=info["model_id"], details=details)]

    def parse_ps(self, resp: WireResponse) -> list[ListedModel]:
        """Same as the list: the one model is loaded."""
        return self.parse_list(resp)

    def parse_show(self, resp: WireResponse) -> dict[str, Any]:
        """``/info`` -> ``details`` (the model's fields) and ``model_info`` (all of it)."""
        info = _info(resp)
        details = {k: info[k] for k in _SHOW_DETAILS if info.get(k) is not None}
        return {"details": details, "model_info": info}

    def stream_parser(self, operation: Literal["chat", "generate"]) -> StreamParser:
        """Chat: the OpenAI chunk stream; generate: TGI's one-token-per-event stream."""
        if operation == "chat":
            return OpenAIStream("chat", finish_reason=_finish_reason, what="TGI")
        return _TGIStream()

    def error_message(self, resp: WireResponse) -> str | None:
        """``{"error": "...", "error_type": "..."}``, or the body as text."""
        return error_text(resp.body)

    def is_overload(self, resp: WireResponse) -> bool:
        """429, or an error typed ``overloaded`` (TGI's queue is full)."""
        if resp.status == 429:
            return True
        try:
            obj = json.loads(resp.body)
        except JSON_ERRORS:
            return False
        return isinstance(obj, dict) and obj.get("error_type") == "overloaded"

    def response_timings(self, headers: Mapping[str, str]) -> dict[str, float]:
        """``x-queue-time`` & co. (ms) and ``x-compute-time`` (s); bad values are skipped."""
        out: dict[str, float] = {}
        for header, name in _TIMING_HEADERS.items():
            value = _header(headers, header)
            if value is None:
                continue
            try:
                number = float(value)
            except ValueError:
                continue  # advisory numbers: a bad one is not worth failing the call
            if math.isfinite(number):
                out[name] = number
        return out


class _TGIStream(FramedStream[SSEEvent]):
    """``/generate_stream`` events -> one Piece per token; the event with ``details`` ends it."""

    def __init__(self) -> None:
        what = "TGI generate stream"
        super().__init__(SSEDecoder(field_events=("error",), what=what), what)

    def _piece(self, event: SSEEvent) -> Iterable[Piece]:
        what = self._what
        if event.event == "error":
            raise stream_error(event.data)
        data = event.data.strip()
        if event.event != "message" or not data:
            return []
        obj = expect_dict(decode_json(data, what), what)
        if "error" in obj:  # TGI reports a failed generation as a data event
            raise stream_error(obj)
        token = opt_dict(obj, "token", what) or {}
        special = opt_bool(token, "special", what) or False
        piece = Piece(text="" if special else opt_str(token, "text", what) or "", tokens=1)
        details = opt_dict(obj, "details", what)
        # generated_text alone also marks the end (a request made without details).
        if details is not None or opt_str(obj, "generated_text", what) is not None:
            piece.done = piece.final = self._finished = True
        if details is not None:
            reason = opt_str(details, "finish_reason", what)
            piece.done_reason = None if reason is None else _finish_reason(reason)
            piece.output_tokens = opt_int(details, "generated_tokens", what)
            piece.input_tokens = opt_int(details, "input_length", what)
        return [piece]


def _finish_reason(reason: str) -> str:
    return _FINISH_REASONS.get(reason, reason)


def _grammar(fmt: Any) -> dict[str, Any] | None:
    # TGI's guidance takes a JSON schema; plain "json" mode is the schema of any object.
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json", "value": {"type": "object"}}
    if isinstance(fmt, Mapping):
        return {"type": "json", "value": dict(fmt)}
    raise InvalidRequest(f"unsupported format {excerpt(repr(fmt))}: use 'json' or a JSON schema")


def _drop_off_values(params: dict[str, Any]) -> None:
    for key, (low, high) in _OPEN_RANGES.items():
        value = params.get(key)
        in_range = (
            not isinstance(value, int | float) or isinstance(value, bool) or low < value < high
        )
        if not in_range:
            del params[key]


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # the contract says lower-case names; be lenient with other casings
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


def _header_int(headers: Mapping[str, str], name: str) -> int | None:
    value = _header(headers, name)
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def _info(resp: WireResponse) -> dict[str, Any]:
    what = "TGI /info reply"
    info = expect_dict(decode_json(resp.body, what), what)
    if not opt_str(info, "model_id", what):
        raise ProtocolError(f"{what}: no 'model_id'")
    return info
