"""The OpenAI-compatible API as vLLM serves it, for the FakeEngine: routes, SSE, vLLM's errors
and Prometheus names. Shapes are those the official `openai` Python client parses."""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ._http import (
    ApiError,
    Emitter,
    JSONReply,
    RequestCtx,
    StreamReply,
    Wire,
    ctx_of,
    dump,
    stop_strings,
)
from ._runtime import GenTimes, Overloaded, Runtime, now_ns
from ._tokens import Plan, Token, chat_ids, chat_prompt, count_words, embedding, prompt_ids

__all__ = ["build"]

VERSION = "0.11.0"
MAX_MODEL_LEN = 4096
SSE = "text/event-stream; charset=utf-8"
CREATED = 1_735_689_600  # when the fake models were "made" (2025-01-01)
_INFERENCE = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
# vLLM's Prometheus series: name -> (type, help).
_METRICS = {
    "num_requests_running": ("gauge", "Number of requests in model execution batches."),
    "num_requests_waiting": ("gauge", "Number of requests waiting to be processed."),
    "gpu_cache_usage_perc": ("gauge", "GPU KV-cache usage. 1 means 100 percent usage."),
    "kv_cache_usage_perc": ("gauge", "KV-cache usage. 1 means 100 percent usage."),
    "prompt_tokens_total": ("counter", "Number of prefill tokens processed."),
    "generation_tokens_total": ("counter", "Number of generation tokens processed."),
    "request_success_total": ("counter", "Count of successfully processed requests."),
    "prefix_cache_queries_total": ("counter", "Prefix cache queries, in terms of tokens."),
    "prefix_cache_hits_total": ("counter", "Prefix cache hits, in terms of tokens."),
}


def _error(status: int, message: str | None = None) -> Response:
    phrase = HTTPStatus(status).phrase
    kind = phrase.replace(" ", "").removesuffix("Error") + "Error"
    body = {"object": "error", "message": message or phrase, "type": kind, "param": None}
    return JSONResponse({**body, "code": status}, status)


def _usage(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    if cached is not None:  # vLLM (prefix caching on) and llama-server say what hit
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def _timings(times: GenTimes, prompt: int, completion: int) -> dict[str, Any]:
    """llama-server's ``timings``: ``cache_n`` tokens reused, ``prompt_n`` computed."""
    end = times.end_ns or now_ns()
    return {
        "cache_n": times.cached_tokens,
        "prompt_n": prompt - times.cached_tokens,
        "prompt_ms": times.prefill_ns / 1e6,
        "predicted_n": completion,
        "predicted_ms": max(end - times.first_ns, 0) / 1e6 if times.first_ns else 0.0,
    }


def _sse(data: Mapping[str, Any]) -> bytes:
    return b"data: " + dump(data) + b"\n\n"


def _finish(plan: Plan) -> str:
    return "length" if plan.finish == "length" else "stop"


async def _discard(index: int, token: Token, last: bool) -> None:
    """Non-streaming replies only need the plan's text once the generation ends."""


class _Call:
    """What the chat and completion endpoints share once their request is parsed."""

    def __init__(
        self,
        body: dict[str, Any],
        model: str,
        prompt_tokens: int,
        plan: Plan,
        ids: list[int] | None,
        caching: bool,
    ) -> None:
        self.body = body
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.plan = plan
        self.ids = ids
        # Cache hits are reported only while the engine has a prefix cache (as vLLM, whose
        # prompt_tokens_details is null without one).
        self.caching = caching
        self.created = int(time.time())
        self.stream = bool(body.get("stream"))
        options = body.get("stream_options") or {}
        # vLLM: continuous usage only comes with include_usage.
        self.include_usage = bool(options.get("include_usage"))
        self.continuous = self.include_usage and bool(options.get("continuous_usage_stats"))

    def usage(self, times: GenTimes, completion: int) -> dict[str, Any]:
        """The usage object, with the cache hits while caching."""
        cached = times.cached_tokens if self.caching else None
        return _usage(self.prompt_tokens, completion, cached)

    def extras(self, times: GenTimes) -> dict[str, Any]:
        """What the reply's last object carries besides: llama-server's ``timings``."""
        if not self.caching:
            return {}
        return {"timings": _timings(times, self.prompt_tokens, len(self.plan.tokens))}


class OpenAIApi:
    """The route handlers, bound to one running engine."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def routes(self) -> list[Route]:
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/version", self.version, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
        ]

    # -- request parsing -----------------------------------------------------------------------

    def _body(self, ctx: RequestCtx) -> dict[str, Any]:
        try:
            body = ctx.json()
        except ValueError as exc:
            raise ApiError(400, f"Invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object")
        return body

    def _model(self, body: Mapping[str, Any]) -> str:
        name = body.get("model")
        if name is None:  # vLLM serves its first model when none is named
            return self.rt.settings.models[0]
        if name not in self.rt.settings.models:
            raise ApiError(404, f"The model `{name}` does not exist.")
        return str(name)

    def _call(
        self,
        body: dict[str, Any],
        model: str,
        text: str,
        prompt_tokens: int,
        ids: list[int] | None,
    ) -> _Call:
        raw_limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if raw_limit is not None and (
            not isinstance(raw_limit, int) or isinstance(raw_limit, bool) or raw_limit < 1
        ):
            raise ApiError(400, f"max_tokens must be at least 1, got {raw_limit}.")
        limit: int | None = raw_limit
        wanted = limit if limit is not None else self.rt.timing.default_max_tokens
        if prompt_tokens + wanted > MAX_MODEL_LEN:
            raise ApiError(
                400,
                f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you "
                f"requested {prompt_tokens + wanted} tokens ({prompt_tokens} in the messages, "
                f"{wanted} in the completion). Please reduce the length of the messages or "
                "completion.",
            )
        if body.get("n", 1) != 1:
            raise ApiError(400, "The fake engine only supports n=1.")
        if body.get("stream_options") is not None and not body.get("stream"):
            raise ApiError(400, "Stream options can only be defined when `stream=True`.")
        stops = stop_strings(body.get("stop"))
        caching = self.rt.timing.prefix_cache_tokens > 0
        return _Call(body, model, prompt_tokens, self.rt.plan(text, limit, stops), ids, caching)

    # -- generation ----------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        ctx = ctx_of(request)
        body = self._body(ctx)
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ApiError(400, "messages: Field required (a list of message objects)")
        model = self._model(body)
        text, prompt_tokens = chat_prompt(messages)
        ids = self.rt.cache_ids(lambda: chat_ids(messages))
        call = self._call(body, model, text, prompt_tokens, ids)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        head = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": call.created,
            "model": model,
        }

        def chunk(delta: dict[str, Any], finish: str | None, sent: int) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None}
            choice["finish_reason"] = finish
            if finish is not None:
                choice["stop_reason"] = None
            data = {**head, "choices": [choice]}
            return {**data, "usage": call.usage(ctx.times, sent)} if call.continuous else data

        async def first(out: Emitter) -> None:
            await out.emit(_sse(chunk({"role": "assistant", "content": ""}, None, 0)))

        def text_chunk(piece: str, finish: str | None, sent: int) -> dict[str, Any]:
            return chunk({"content": piece}, finish, sent)

        if call.stream:
            return self._stream(ctx, call, head, first, text_chunk)
        await self.rt.generate(
            ctx.admit(self.rt), ctx.times, model, call.plan, prompt_tokens, _discard, call.ids
        )
        message = {"role": "assistant", "reasoning_content": None, "content": call.plan.text}
        choice = {"index": 0, "message": {**message, "tool_calls": []}, "logprobs": None}
        return JSONReply(
            ctx,
            {
                "id": rid,
                "object": "chat.completion",
                "created": call.created,
                "model": model,
                "choices": [{**choice, "finish_reason": _finish(call.plan), "stop_reason": None}],
                "usage": call.usage(ctx.times, len(call.plan.tokens)),
                "prompt_logprobs": None,
                **call.extras(ctx.times),
            },
        )

    async def completions(self, request: Request) -> Response:
        ctx = ctx_of(request)
        body = self._body(ctx)
        model = self._model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt: the fake engine takes one string prompt")
        ids = self.rt.cache_ids(lambda: prompt_ids(prompt))
        call = self._call(body, model, prompt, count_words(prompt), ids)
        rid = f"cmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "text_completion", "created": call.created, "model": model}

        def text_chunk(piece: str, finish: str | None, sent: int) -> dict[str, Any]:
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
            data = {**head, "choices": [{**choice, "stop_reason": None}]}
            return {**data, "usage": call.usage(ctx.times, sent)} if call.continuous else data

        if call.stream:
            return self._stream(ctx, call, head, None, text_chunk)
        await self.rt.generate(
            ctx.admit(self.rt), ctx.times, model, call.plan, call.prompt_tokens, _discard, call.ids
        )
        choice = {"index": 0, "text": call.plan.text, "logprobs": None}
        choice |= {"finish_reason": _finish(call.plan), "stop_reason": None}
        return JSONReply(
            ctx,
            {
                **head,
                "choices": [{**choice, "prompt_logprobs": None}],
                "usage": call.usage(ctx.times, len(call.plan.tokens)),
                **call.extras(ctx.times),
            },
        )

    def _stream(
        self,
        ctx: RequestCtx,
        call: _Call,
        head: dict[str, Any],
        first: Callable[[Emitter], Awaitable[None]] | None,
        text_chunk: Callable[[str, str | None, int], dict[str, Any]],
    ) -> Response:
        """SSE: tokens_per_chunk tokens a chunk, the last with finish_reason, then usage, [DONE]."""
        # Admitted before the headers leave, so a full queue is still an HTTP 429.
        ticket = ctx.admit(self.rt)
        per_chunk = self.rt.timing.tokens_per_chunk
        finish = _finish(call.plan)

        async def produce(out: Emitter) -> None:
            pending: list[str] = []
            sent = 0

            async def emit(index: int, token: Token, last: bool) -> None:
                nonlocal sent
                pending.append(token.text)
                if len(pending) >= per_chunk or last:
                    if sent == 0 and first is not None:  # the role chunk leaves with the first text
                        await first(out)
                    sent += len(pending)
                    piece = "".join(pending)
                    pending.clear()
                    data = text_chunk(piece, finish if last else None, sent)
                    if last and not call.include_usage:  # llama-server: timings on the last
                        data |= call.extras(ctx.times)
                    await out.emit(_sse(data))

            await self.rt.generate(
                ticket, ctx.times, call.model, call.plan, call.prompt_tokens, emit, call.ids
            )
            if call.include_usage:
                usage = call.usage(ctx.times, len(call.plan.tokens))
                extras = call.extras(ctx.times)
                await out.emit(_sse({**head, "choices": [], "usage": usage, **extras}))
            await out.emit(b"data: [DONE]\n\n")

        return StreamReply(ctx, SSE, produce, headers_first=True, garbage=b"data: {malformed\n\n")

    async def embeddings(self, request: Request) -> Response:
        ctx = ctx_of(request)
        body = self._body(ctx)
        model = self._model(body)
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if (
            not isinstance(inputs, list)
            or not inputs
            or not all(isinstance(i, str) for i in inputs)
        ):
            raise ApiError(400, "input: the fake engine takes a string or a list of strings")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(400, f"encoding_format: unsupported value {encoding!r}")
        words = sum(count_words(i) for i in inputs)
        await self.rt.embed(ctx.admit(self.rt), ctx.times, model, words)
        data = [
            {"index": i, "object": "embedding", "embedding": _encode(embedding(text), encoding)}
            for i, text in enumerate(inputs)
        ]
        return JSONReply(
            ctx,
            {
                "id": f"embd-{uuid.uuid4().hex}",
                "object": "list",
                "created": int(time.time()),
                "model": model,
                "data": data,
                "usage": _usage(words, 0),
            },
        )

    async def tokenize(self, request: Request) -> Response:
        """vLLM's ``/tokenize``: a ``prompt`` (``add_special_tokens``, default true: no
        special tokens here) or ``messages`` counted as the chat route counts them."""
        ctx = ctx_of(request)
        body = self._body(ctx)
        self._model(body)
        messages, prompt = body.get("messages"), body.get("prompt")
        if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
            text, count = chat_prompt(messages)
        elif isinstance(prompt, str):
            text, count = prompt, count_words(prompt)
        else:
            raise ApiError(400, "prompt: Field required (or messages)")
        tokens = prompt_ids(text)
        tokens += [0] * (count - len(tokens))  # the chat template's tokens: no text of their own
        reply: dict[str, Any] = {"count": count, "max_model_len": MAX_MODEL_LEN, "tokens": tokens}
        if body.get("return_token_strs"):
            reply["token_strs"] = text.split() + [""] * (count - len(text.split()))
        return JSONReply(ctx, reply)

    # -- server info ---------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def version(self, request: Request) -> Response:
        return JSONReply(ctx_of(request), {"version": VERSION})

    async def models(self, request: Request) -> Response:
        data = [
            {
                "id": m,
                "object": "model",
                "created": CREATED,
                "owned_by": "vllm",
                "root": m,
                "parent": None,
                "max_model_len": MAX_MODEL_LEN,
            }
            for m in self.rt.settings.models
        ]
        return JSONReply(ctx_of(request), {"object": "list", "data": data})

    async def metrics(self, request: Request) -> Response:
        stats = self.rt.stats.snapshot()
        pool = self.rt.pool
        usage = self.rt.kv_tokens / (MAX_MODEL_LEN * max(pool.size, 1))
        labels = f'{{engine="0",model_name="{self.rt.settings.models[0]}"}}'
        caching = self.rt.timing.prefix_cache_tokens > 0
        values = {
            "num_requests_running": pool.active,
            "num_requests_waiting": pool.queued,
            "gpu_cache_usage_perc": usage,
            "kv_cache_usage_perc": usage,
            "prompt_tokens_total": stats.prompt_tokens,
            "generation_tokens_total": stats.tokens_generated,
            "request_success_total": stats.generations,
            "prefix_cache_queries_total": stats.prompt_tokens if caching else 0,
            "prefix_cache_hits_total": stats.cached_tokens,
        }
        lines: list[str] = []
        for name, value in values.items():
            kind, help_text = _METRICS[name]
            lines += [
                f"# HELP vllm:{name} {help_text}",
                f"# TYPE vllm:{name} {kind}",
                f"vllm:{name}{labels} {float(value)}",
            ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def build(rt: Runtime) -> tuple[Wire, Starlette]:
    """vLLM's routes and error shapes for one running engine."""
    api = OpenAIApi(rt)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _error(exc.status, exc.message)

    async def on_overloaded(request: Request, exc: Exception) -> Response:
        return _error(429, "The server is overloaded; too many requests are waiting.")

    async def on_unknown(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        return JSONResponse({"detail": HTTPStatus(status).phrase}, status)

    app = Starlette(
        routes=api.routes(),
        exception_handlers={
            ApiError: on_api_error,
            Overloaded: on_overloaded,
            404: on_unknown,
            405: on_unknown,
        },
    )
    wire = Wire(
        inference=_INFERENCE,
        needs_key=lambda method, path: path.startswith("/v1"),  # vLLM guards /v1 only
        error=_error,
        unauthorized=lambda: JSONResponse({"error": "Unauthorized"}, 401),
    )
    return wire, app
