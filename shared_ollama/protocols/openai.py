"""The OpenAI-compatible API of vLLM, llama.cpp and SGLang (``/v1/*``) and its SSE stream.

Also home of the chat-completions pieces TGI's Messages API reuses (body, reply, stream).

Option translation (Ollama names in, OpenAI body fields out):

* ``num_predict`` -> ``max_tokens`` (a negative value, Ollama's "no limit", is dropped);
  ``temperature``, ``top_p``, ``seed``, ``stop``, ``presence_penalty``,
  ``frequency_penalty`` keep their names.
* vLLM/SGLang extra sampling parameters, sent when given: ``top_k``, ``min_p``,
  ``min_tokens``, ``ignore_eos``, and ``repeat_penalty`` -> ``repetition_penalty``.
* Allowlist of native fields passed as-is: ``repetition_penalty``, ``logit_bias``,
  ``logprobs``, ``top_logprobs``.
* Everything else is ignored: ``num_ctx``, ``num_gpu``, ``num_thread``, ``mirostat*``,
  ``typical_p``... are server settings or unknown to these engines, and an unknown field
  can make a strict server reject the whole request.

``format`` becomes ``response_format`` (``"json"`` -> ``json_object``, a schema ->
``json_schema``); ``think`` becomes ``reasoning_effort`` (a level string) or
``chat_template_kwargs.enable_thinking`` (a bool); ``keep_alive`` has no equivalent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Final, Literal

from ..errors import InvalidRequest, ProtocolError
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
    JSON_ERRORS,
    SSEDecoder,
    SSEEvent,
    decode_json,
    error_text,
    excerpt,
    expect_dict,
    float_list,
    opt_dict,
    opt_int,
    opt_list,
    opt_number,
    opt_str,
    stream_error,
)

__all__ = [
    "OPENAI_OPTIONS",
    "OPENAI_PASSTHROUGH",
    "OpenAICodec",
    "OpenAIStream",
    "cached_tokens",
    "chat_body",
    "parse_completion",
    "translate_options",
]

#: Ollama option -> OpenAI body field.
OPENAI_OPTIONS: Final[Mapping[str, str]] = {
    "num_predict": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    # vLLM / SGLang extra sampling parameters (llama.cpp reads top_k and min_p too).
    "top_k": "top_k",
    "min_p": "min_p",
    "min_tokens": "min_tokens",
    "ignore_eos": "ignore_eos",
    "repeat_penalty": "repetition_penalty",
}
#: Native fields a caller may put in ``options`` and that are sent unchanged (``user`` and
#: ``prompt_cache_key`` also key the ``affinity`` strategy).
OPENAI_PASSTHROUGH: Final = frozenset(
    {"repetition_penalty", "logit_bias", "logprobs", "top_logprobs", "user", "prompt_cache_key"}
)
#: vLLM reports cumulative usage in every chunk with ``continuous_usage_stats``; servers
#: that do not know the flag ignore it and send usage once, before ``[DONE]``.
_STREAM_OPTIONS: Final[Mapping[str, bool]] = {
    "include_usage": True,
    "continuous_usage_stats": True,
}
_IMAGE_MAGIC: Final = (("/9j/", "image/jpeg"), ("R0lGOD", "image/gif"), ("UklGR", "image/webp"))


class OpenAICodec(Codec):
    """OpenAI-compatible servers. Stateless; ``codec_for("openai")`` returns the shared one.

    ``ps`` is served by the model list (these engines keep every served model loaded);
    ``show`` has no portable route, so ``operations`` leaves it out.
    """

    kind: ClassVar[Literal["ollama", "openai", "tgi"]] = "openai"
    operations: ClassVar[frozenset[str]] = frozenset({"chat", "generate", "embed", "list", "ps"})

    # -- building -------------------------------------------------------------------
    def chat(self, req: ChatRequest) -> WireRequest:
        """``POST /v1/chat/completions``."""
        body = chat_body(
            req,
            options=OPENAI_OPTIONS,
            passthrough=OPENAI_PASSTHROUGH,
            stream_options=_STREAM_OPTIONS,
            response_format=_response_format,
        )
        if isinstance(req.think, bool):
            body["chat_template_kwargs"] = {"enable_thinking": req.think}
        elif isinstance(req.think, str):
            body["reasoning_effort"] = req.think
        return WireRequest("POST", "/v1/chat/completions", json=body, stream=req.stream)

    def generate(self, req: GenerateRequest) -> WireRequest:
        """``POST /v1/completions``; ``system`` is prepended to the prompt.

        ``template``, ``context``, ``images``, ``raw``, ``think`` and ``keep_alive`` have
        no equivalent and are ignored (a completions prompt is always raw).
        """
        prompt = f"{req.system}\n\n{req.prompt}" if req.system else req.prompt
        body: dict[str, Any] = {"model": req.model, "prompt": prompt, "stream": req.stream}
        if req.suffix is not None:
            body["suffix"] = req.suffix
        body.update(translate_options(req.options, OPENAI_OPTIONS, OPENAI_PASSTHROUGH))
        if (fmt := _response_format(req.format)) is not None:
            body["response_format"] = fmt
        if req.stream:
            body["stream_options"] = dict(_STREAM_OPTIONS)
        return WireRequest("POST", "/v1/completions", json=body, stream=req.stream)

    def embed(self, req: EmbedRequest) -> WireRequest:
        """``POST /v1/embeddings`` with a list input (``truncate`` has no portable field)."""
        body: dict[str, Any] = {"model": req.model, "input": list(req.input)}
        if req.dimensions is not None:
            body["dimensions"] = req.dimensions
        return WireRequest("POST", "/v1/embeddings", json=body)

    def list_models(self) -> WireRequest:
        """``GET /v1/models``."""
        return WireRequest("GET", "/v1/models")

    def ps(self) -> WireRequest | None:
        """None: every served model is loaded."""
        return None

    def show(self, model: str) -> WireRequest | None:
        """None: ``/v1/models/{id}`` is not served everywhere."""
        return None

    def health(self) -> WireRequest:
        """``GET /health`` (vLLM, llama.cpp and SGLang all serve it)."""
        return WireRequest("GET", "/health")

    # -- parsing --------------------------------------------------------------------
    def parse_chat(self, resp: WireResponse) -> Parsed:
        """Decode a ``chat.completion`` object."""
        return parse_completion(resp.body, chat=True, what="OpenAI chat reply")

    def parse_generate(self, resp: WireResponse) -> Parsed:
        """Decode a ``text_completion`` object."""
        return parse_completion(resp.body, chat=False, what="OpenAI completion reply")

    def parse_embed(self, resp: WireResponse) -> Parsed:
        """Decode an embeddings list (put back in input order by ``index``)."""
        what = "OpenAI embeddings reply"
        obj = _object(resp.body, what)
        data = opt_list(obj, "data", what)
        if data is None:
            raise ProtocolError(f"{what}: no 'data'")
        items = [expect_dict(item, what) for item in data]
        order = [opt_int(item, "index", what) for item in items]
        if all(i is not None for i in order):
            pairs = sorted(zip(order, items, strict=True), key=lambda pair: pair[0] or 0)
            items = [item for _, item in pairs]
        input_tokens, _ = _usage(obj, what)
        return Parsed(
            embeddings=[float_list(item.get("embedding"), what) for item in items],
            input_tokens=input_tokens,
            served_model=opt_str(obj, "model", what),
        )

    def parse_list(self, resp: WireResponse) -> list[ListedModel]:
        """Decode ``/v1/models``; the other fields of each entry go to ``details``."""
        what = "OpenAI model list"
        obj = _object(resp.body, what)
        data = opt_list(obj, "data", what)
        if data is None:
            raise ProtocolError(f"{what}: no 'data'")
        return [_listed(expect_dict(item, what), what) for item in data]

    def parse_ps(self, resp: WireResponse) -> list[ListedModel]:
        """Same as the model list: every served model is loaded."""
        return self.parse_list(resp)

    def parse_show(self, resp: WireResponse) -> dict[str, Any]:
        """Decode one model object (``/v1/models/{id}``) where a server has the route."""
        what = "OpenAI model"
        return {"details": _listed(_object(resp.body, what), what).details}

    def stream_parser(self, operation: Literal["chat", "generate"]) -> StreamParser:
        """A fresh SSE decoder for one streamed reply."""
        return OpenAIStream(operation)

    def error_message(self, resp: WireResponse) -> str | None:
        """Handles OpenAI/llama.cpp, vLLM and FastAPI error bodies."""
        return error_text(resp.body)


class OpenAIStream(FramedStream[SSEEvent]):
    """SSE chunks -> Pieces; ``data: [DONE]`` is the end marker.

    ``tokens`` is set only when the server reports usage on every chunk (vLLM's continuous
    usage): it is the growth of ``completion_tokens`` since the previous chunk. Usage on
    the last chunk alone (llama.cpp, SGLang, TGI) says nothing per chunk, so it only fills
    ``input_tokens``/``output_tokens``, which are cumulative wherever they appear.
    """

    def __init__(
        self,
        operation: Literal["chat", "generate"],
        *,
        finish_reason: Callable[[str], str] | None = None,
        what: str = "OpenAI",
    ) -> None:
        label = f"{what} {operation} stream"
        super().__init__(SSEDecoder(field_events=("error",), what=label), label)
        self._chat = operation == "chat"
        self._finish_reason = finish_reason
        self._continuous = False
        self._completion_tokens = 0

    def _piece(self, event: SSEEvent) -> Iterable[Piece]:
        if event.event == "error":
            raise stream_error(event.data)
        if event.event != "message":
            return []  # no OpenAI-compatible server sends other types; skip, don't fail
        data = event.data.strip()
        if not data:
            return []
        if data == "[DONE]":
            self._finished = True
            return [Piece(final=True)]
        obj = expect_dict(decode_json(data, self._what), self._what)
        if "error" in obj or obj.get("object") == "error":  # vLLM fails mid-stream this way
            raise stream_error(obj)
        return [self._chunk(obj)]

    def _chunk(self, obj: dict[str, Any]) -> Piece:
        # Runs on every chunk, so the common fields are checked inline (isinstance, not an
        # accessor call each); a wrong type still goes through the accessor that names it.
        what = self._what
        model = obj.get("model")
        if model is not None and not isinstance(model, str):
            opt_str(obj, "model", what)  # raises ProtocolError
        piece = Piece(served_model=model)
        has_usage = "usage" in obj
        if "timings" in obj:  # llama.cpp's, on its last chunk
            piece.server_timings = _llamacpp_timings(obj, what)
        if has_usage or "timings" in obj:  # only where they are: this runs every chunk
            piece.cached_tokens = cached_tokens(obj, what)
        choice = _first_choice(obj, what)
        if choice is not None:
            if self._chat:
                delta = opt_dict(choice, "delta", what) or {}
                text = delta.get("content")
                if "reasoning_content" in delta or "reasoning" in delta:
                    piece.thinking = _reasoning(delta, what)
                if "tool_calls" in delta:
                    # Deltas carry argument fragments: passed raw, the caller joins them.
                    calls = opt_list(delta, "tool_calls", what)
                    piece.tool_calls = (
                        None if calls is None else [expect_dict(c, what) for c in calls]
                    )
                source, key = delta, "content"
            else:
                text = choice.get("text")
                source, key = choice, "text"
            if text is not None:
                piece.text = text if isinstance(text, str) else opt_str(source, key, what) or ""
            reason = choice.get("finish_reason")
            if reason is not None and not isinstance(reason, str):
                opt_str(choice, "finish_reason", what)  # raises
            if reason:
                piece.done = True
                piece.done_reason = self._finish_reason(reason) if self._finish_reason else reason
        if has_usage and opt_dict(obj, "usage", what) is not None:
            piece.input_tokens, piece.output_tokens = _usage(obj, what)
            if choice is not None and not piece.done:
                self._continuous = True
            if self._continuous and choice is not None and piece.output_tokens is not None:
                piece.tokens = max(0, piece.output_tokens - self._completion_tokens)
                self._completion_tokens = piece.output_tokens
        return piece


# -- request pieces shared with TGI's Messages API ---------------------------------------


def chat_body(
    req: ChatRequest,
    *,
    options: Mapping[str, str],
    passthrough: frozenset[str],
    stream_options: Mapping[str, bool],
    response_format: Callable[[Any], dict[str, Any] | None],
    stop_as_list: bool = False,
) -> dict[str, Any]:
    """A ``/v1/chat/completions`` body from a ChatRequest."""
    body: dict[str, Any] = {
        "model": req.model,
        "messages": [_message(m) for m in req.messages],
        "stream": req.stream,
    }
    body.update(translate_options(req.options, options, passthrough, stop_as_list=stop_as_list))
    if req.tools:  # OpenAI rejects an empty list; Ollama's tool schema is OpenAI's
        body["tools"] = req.tools
    if (fmt := response_format(req.format)) is not None:
        body["response_format"] = fmt
    if req.stream:
        body["stream_options"] = dict(stream_options)
    return body


def translate_options(
    options: Mapping[str, Any],
    names: Mapping[str, str],
    passthrough: frozenset[str],
    *,
    stop_as_list: bool = False,
) -> dict[str, Any]:
    """Ollama-style options -> body fields: renamed by ``names``, or kept if allowlisted."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key == "num_predict" and isinstance(value, int | float) and value < 0:
            continue  # -1 / -2: Ollama's "until done" / "fill the context"
        if key == "stop" and stop_as_list and isinstance(value, str):
            value = [value]
        if key in names:
            out[names[key]] = value
        elif key in passthrough:
            out[key] = value
    return out


def _response_format(fmt: Any) -> dict[str, Any] | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, Mapping):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": dict(fmt)}}
    raise InvalidRequest(f"unsupported format {excerpt(repr(fmt))}: use 'json' or a JSON schema")


def _message(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role}
    if m.images:
        parts: list[dict[str, Any]] = [{"type": "text", "text": m.content}] if m.content else []
        parts += [{"type": "image_url", "image_url": {"url": _image_url(i)}} for i in m.images]
        out["content"] = parts
    else:
        out["content"] = m.content
    if m.tool_calls:
        out["tool_calls"] = [
            _tool_call_out(call.model_dump(exclude_none=True), i)
            for i, call in enumerate(m.tool_calls)
        ]
    extra = m.model_extra or {}
    for key in ("name", "tool_call_id"):
        if isinstance(extra.get(key), str):
            out[key] = extra[key]
    if m.role == "tool" and "name" not in out and m.tool_name:
        out["name"] = m.tool_name  # Ollama's spelling of the tool's name
    return out


def _image_url(image: str) -> str:
    # Ollama takes bare base64; OpenAI wants a URL, so wrap it in a data: URL.
    if image.startswith("data:") or "://" in image:
        return image
    mime = next((m for magic, m in _IMAGE_MAGIC if image.startswith(magic)), "image/png")
    return f"data:{mime};base64,{image}"


def _tool_call_out(call: Mapping[str, Any], index: int) -> dict[str, Any]:
    # Ollama: {"function": {"name", "arguments": {...}}}; OpenAI wants an id, a type and
    # the arguments as a JSON string.
    fn = call.get("function")
    if not isinstance(fn, Mapping):
        return dict(call)
    args = fn.get("arguments", {})
    return {
        "id": call.get("id") or f"call_{index}",
        "type": call.get("type") or "function",
        "function": {
            "name": fn.get("name"),
            "arguments": args if isinstance(args, str) else json.dumps(args),
        },
    }


# -- reply pieces shared with TGI's Messages API -----------------------------------------


def parse_completion(body: bytes, *, chat: bool, what: str) -> Parsed:
    """Decode a ``chat.completion`` (``chat``) or ``text_completion`` object."""
    obj = _object(body, what)
    choice = _first_choice(obj, what)
    if choice is None:
        raise ProtocolError(f"{what}: no choices")
    parsed = Parsed(
        done_reason=opt_str(choice, "finish_reason", what),
        served_model=opt_str(obj, "model", what),
        server_timings=_llamacpp_timings(obj, what),
    )
    parsed.input_tokens, parsed.output_tokens = _usage(obj, what)
    parsed.cached_tokens = cached_tokens(obj, what)
    if chat:
        message = opt_dict(choice, "message", what)
        if message is None:
            raise ProtocolError(f"{what}: choice without a message")
        parsed.text = opt_str(message, "content", what) or ""
        parsed.role = opt_str(message, "role", what) or "assistant"
        parsed.thinking = _reasoning(message, what)
        parsed.tool_calls = _tool_calls_in(message, what)
    else:
        parsed.text = opt_str(choice, "text", what) or ""
    return parsed


def _object(body: bytes, what: str) -> dict[str, Any]:
    return expect_dict(decode_json(body, what), what)


def _first_choice(obj: Mapping[str, Any], what: str) -> dict[str, Any] | None:
    # We never ask for n > 1, so the first choice is the only one. Runs on every stream
    # chunk: the type is checked inline, the accessor only names a wrong one.
    choices = obj.get("choices")
    if choices is not None and not isinstance(choices, list):
        opt_list(obj, "choices", what)  # raises ProtocolError
    return expect_dict(choices[0], what) if choices else None


def _usage(obj: Mapping[str, Any], what: str) -> tuple[int | None, int | None]:
    usage = opt_dict(obj, "usage", what)
    if usage is None:
        return None, None
    return opt_int(usage, "prompt_tokens", what), opt_int(usage, "completion_tokens", what)


def cached_tokens(obj: Mapping[str, Any], what: str) -> int | None:
    """Prompt tokens the server took from its cache: OpenAI's (and vLLM's, SGLang's)
    ``usage.prompt_tokens_details.cached_tokens``, else llama.cpp's ``timings.cache_n``;
    None when the reply does not say."""
    usage = opt_dict(obj, "usage", what)
    details = None if usage is None else opt_dict(usage, "prompt_tokens_details", what)
    cached = None if details is None else opt_int(details, "cached_tokens", what)
    if cached is None and (timings := opt_dict(obj, "timings", what)) is not None:
        cached = opt_int(timings, "cache_n", what)
    return None if cached is None or cached < 0 else cached


def _reasoning(message: Mapping[str, Any], what: str) -> str | None:
    # llama.cpp and older vLLM say reasoning_content, newer vLLM says reasoning.
    return opt_str(message, "reasoning_content", what) or opt_str(message, "reasoning", what)


def _tool_calls_in(message: Mapping[str, Any], what: str) -> list[dict[str, Any]] | None:
    """Tool calls with JSON-string arguments decoded into objects, as Ollama returns them."""
    calls = opt_list(message, "tool_calls", what)
    if calls is None:
        return None
    out: list[dict[str, Any]] = []
    for item in calls:
        call = dict(expect_dict(item, what))
        fn = opt_dict(call, "function", what)
        if fn is not None and isinstance(fn.get("arguments"), str):
            try:
                args = json.loads(fn["arguments"])
            except JSON_ERRORS:
                args = None  # not JSON (a truncated call): leave the string as sent
            if isinstance(args, dict):
                call["function"] = {**fn, "arguments": args}
        out.append(call)
    return out


def _llamacpp_timings(obj: Mapping[str, Any], what: str) -> dict[str, float]:
    """llama.cpp's ``timings`` (ms) -> server timings in ns; {} for other servers."""
    timings = opt_dict(obj, "timings", what)
    if timings is None:
        return {}
    out: dict[str, float] = {}
    for key, name in (
        ("prompt_ms", "prompt_eval_duration_ns"),
        ("predicted_ms", "eval_duration_ns"),
    ):
        if (ms := opt_number(timings, key, what)) is not None:
            out[name] = float(round(ms * 1_000_000))
    return out


def _listed(item: Mapping[str, Any], what: str) -> ListedModel:
    name = opt_str(item, "id", what)
    if not name:
        raise ProtocolError(f"{what}: a model without an id")
    details = {k: v for k, v in item.items() if k not in ("id", "object")}
    return ListedModel(name=name, details=details)
