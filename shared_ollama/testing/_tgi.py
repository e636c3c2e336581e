"""Hugging Face TGI's API as the FakeEngine speaks it: /generate, /generate_stream, the compat
route /, the messages API, /info, /metrics, timing headers, and TGI's errors (router/server.rs)."""

from __future__ import annotations

import time
from collections.abc import Mapping
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
from ._runtime import Emit, Overloaded, Runtime, Ticket
from ._tokens import Plan, Token, chat_ids, chat_prompt, count_words, prompt_ids

__all__ = ["build"]

VERSION = "3.3.6"
FINGERPRINT = f"{VERSION}-native"
COMPUTE_TYPE = "gpu+optimized"
MAX_INPUT_TOKENS = 4095
MAX_TOTAL_TOKENS = 4096
MAX_STOP_SEQUENCES = 4
OVERLOADED = "Model is overloaded"
SSE = "text/event-stream"
_INFERENCE = frozenset({"/", "/generate", "/generate_stream", "/v1/chat/completions"})
_FINISH = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}
# error_type and default message TGI gives each status (InferError in router/src/infer).
_ERRORS = {
    422: ("validation", "Input validation error"),
    424: ("generation", "Request failed during generation"),
    429: ("overloaded", OVERLOADED),
    500: ("incomplete_generation", "Incomplete generation"),
    503: ("healthcheck", "unhealthy"),
}


def _error(status: int, message: str | None = None, error_type: str | None = None) -> Response:
    default_type, default_message = _ERRORS.get(status, ("generation", HTTPStatus(status).phrase))
    body = {"error": message or default_message, "error_type": error_type or default_type}
    return JSONResponse(body, status)


def _error_event(message: str, error_type: str) -> bytes:
    return _sse({"error": message, "error_type": error_type})


def _sse(data: Mapping[str, Any] | str) -> bytes:
    # axum's Sse writes "data:" with no space after the colon.
    payload = data.encode() if isinstance(data, str) else dump(data)
    return b"data:" + payload + b"\n\n"


def _token(token: Token) -> dict[str, Any]:
    # A fixed, plausible log-probability per token id keeps replies deterministic.
    return {
        "id": token.id,
        "text": token.text,
        "logprob": -round(0.1 * (1 + token.id % 7), 1),
        "special": False,
    }


def _rejection(message: str) -> ApiError:
    """axum's own 422 for a body it cannot deserialize: plain text, no error_type."""
    return ApiError(422, message, error_type="")


def _headers(ctx: RequestCtx, chars: int, prompt_tokens: int, generated: int) -> dict[str, str]:
    """TGI's timing headers: x-compute-time in seconds, the other times in whole ms."""
    t = ctx.times
    inference_ns = max(t.end_ns - t.started_ns, 0)
    return {
        "x-compute-type": COMPUTE_TYPE,
        "x-compute-time": str(t.total_ns / 1e9),
        "x-compute-characters": str(chars),
        "x-total-time": str(t.total_ns // 1_000_000),
        "x-validation-time": str(max(t.admitted_ns - t.arrival_ns, 0) // 1_000_000),
        "x-queue-time": str(t.queue_ns // 1_000_000),
        "x-inference-time": str(inference_ns // 1_000_000),
        "x-time-per-token": str(inference_ns // max(generated, 1) // 1_000_000),
        "x-prompt-tokens": str(prompt_tokens),
        "x-generated-tokens": str(generated),
    }


async def _discard(index: int, token: Token, last: bool) -> None:
    """Non-streaming replies only need the plan's text once the generation ends."""


class _Generation:
    """A parsed TGI generate request: parameters and the plan they lead to."""

    def __init__(self, rt: Runtime, body: Mapping[str, Any], full_text_default: bool) -> None:
        inputs = body.get("inputs")
        if not isinstance(inputs, str):
            raise _rejection(
                "Failed to deserialize the JSON body into the target type: missing field `inputs`"
            )
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise _rejection("Failed to deserialize the JSON body into the target type: parameters")
        self.inputs = inputs
        self.params = params
        self.prompt_tokens = count_words(inputs)
        self.ids = rt.cache_ids(lambda: prompt_ids(inputs))
        limit = params.get("max_new_tokens")
        self.limit: int | None = limit if isinstance(limit, int) else None
        self.stop = stop_strings(params.get("stop"))
        self.details = bool(params.get("details"))
        self.prefill_details = bool(params.get("decoder_input_details"))
        full = params.get("return_full_text")
        self.full_text = full_text_default if full is None else bool(full)
        self.seed = params.get("seed")
        self.invalid = _validate(inputs, self.prompt_tokens, self.limit, len(self.stop))
        self.plan = rt.plan(inputs, self.limit, self.stop) if self.invalid is None else None

    def text(self, plan: Plan) -> str:
        return self.inputs + plan.text if self.full_text else plan.text


def _validate(inputs: str, prompt_tokens: int, limit: int | None, stops: int) -> str | None:
    """TGI's validation message for a request, or None when it is valid."""
    if not inputs:
        return "`inputs` cannot be empty"
    if limit is not None and limit < 1:
        return "`max_new_tokens` must be strictly positive"
    if stops > MAX_STOP_SEQUENCES:
        return f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {stops}"
    if prompt_tokens > MAX_INPUT_TOKENS:
        return f"`inputs` must have less than {MAX_INPUT_TOKENS} tokens. Given: {prompt_tokens}"
    wanted = limit or 0
    if prompt_tokens + wanted > MAX_TOTAL_TOKENS:
        return (
            f"`inputs` tokens + `max_new_tokens` must be <= {MAX_TOTAL_TOKENS}. Given: "
            f"{prompt_tokens} `inputs` tokens and {wanted} `max_new_tokens`"
        )
    return None


class TgiApi:
    """The route handlers, bound to one running engine."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.model_id = rt.settings.models[0]

    def routes(self) -> list[Route]:
        return [
            Route("/", self.health, methods=["GET"]),
            Route("/", self.compat, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/info", self.info, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/generate", self.generate, methods=["POST"]),
            Route("/generate_stream", self.generate_stream, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
        ]

    @staticmethod
    def _body(ctx: RequestCtx) -> dict[str, Any]:
        try:
            body = ctx.json()
        except ValueError as exc:
            raise _rejection(f"Failed to parse the request body as JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _rejection("Failed to deserialize the JSON body into the target type")
        return body

    # -- /generate and friends -----------------------------------------------------------------

    async def compat(self, request: Request) -> Response:
        """POST /: what text_generation.Client calls; a JSON list unless it streams."""
        ctx = ctx_of(request)
        body = self._body(ctx)
        # TGI returns the full text by default here for text-generation models.
        gen = _Generation(self.rt, body, full_text_default=True)
        if body.get("stream"):
            return self._stream_generation(ctx, gen)
        content, headers = await self._generate(ctx, gen)
        return JSONReply(ctx, [content], headers=headers)

    async def generate(self, request: Request) -> Response:
        ctx = ctx_of(request)
        gen = _Generation(self.rt, self._body(ctx), full_text_default=False)
        content, headers = await self._generate(ctx, gen)
        return JSONReply(ctx, content, headers=headers)

    async def generate_stream(self, request: Request) -> Response:
        ctx = ctx_of(request)
        return self._stream_generation(ctx, _Generation(self.rt, self._body(ctx), False))

    async def _generate(self, ctx: RequestCtx, gen: _Generation) -> tuple[Any, dict[str, str]]:
        if gen.invalid is not None or gen.plan is None:
            raise ApiError(422, f"Input validation error: {gen.invalid}", "validation")
        plan = gen.plan
        ticket = ctx.admit(self.rt)
        await self.rt.generate(
            ticket, ctx.times, self.model_id, plan, gen.prompt_tokens, _discard, gen.ids
        )
        content: dict[str, Any] = {"generated_text": gen.text(plan)}
        if gen.details or gen.prefill_details:
            content["details"] = {
                "finish_reason": _FINISH[plan.finish],
                "generated_tokens": len(plan.tokens),
                "seed": gen.seed,
                "prefill": _prefill(gen.inputs) if gen.prefill_details else [],
                "tokens": [_token(t) for t in plan.tokens],
            }
        chars = len(gen.inputs)
        return content, _headers(ctx, chars, gen.prompt_tokens, len(plan.tokens))

    def _stream_generation(self, ctx: RequestCtx, gen: _Generation) -> Response:
        """SSE, one token an event; the last event has generated_text (and details if asked).

        As in TGI, the headers leave first, so validation and overload errors arrive as an
        error event in a 200 stream.
        """

        async def produce(out: Emitter) -> None:
            plan = gen.plan
            if gen.invalid is not None or plan is None:
                await out.emit(_error_event(f"Input validation error: {gen.invalid}", "validation"))
                return

            async def emit(index: int, token: Token, last: bool) -> None:
                event: dict[str, Any] = {
                    "index": index + 1,
                    "token": _token(token),
                    "generated_text": gen.text(plan) if last else None,
                    "details": None,
                }
                if last and gen.details:
                    event["details"] = {
                        "finish_reason": _FINISH[plan.finish],
                        "generated_tokens": len(plan.tokens),
                        "seed": gen.seed,
                        "input_length": gen.prompt_tokens,
                    }
                await out.emit(_sse(event))

            await self._run_streamed(ctx, out, plan, gen.prompt_tokens, emit, gen.ids)

        headers = _stream_headers(len(gen.inputs))
        return StreamReply(
            ctx, SSE, produce, headers_first=True, garbage=b"data:{malformed\n\n", headers=headers
        )

    async def _run_streamed(
        self,
        ctx: RequestCtx,
        out: Emitter,
        plan: Plan,
        prompt_tokens: int,
        emit: Emit,
        ids: list[int] | None,
    ) -> None:
        """Admit inside the stream (TGI's way); an overload becomes an error event. ``ids``
        go through the prefix cache (timing only: TGI reports no cache hits)."""
        try:
            ticket: Ticket = ctx.admit(self.rt)
        except Overloaded:
            await out.emit(_error_event(OVERLOADED, "overloaded"))
            return
        await self.rt.generate(ticket, ctx.times, self.model_id, plan, prompt_tokens, emit, ids)

    # -- the messages API ----------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        ctx = ctx_of(request)
        body = self._body(ctx)
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise _rejection(
                "Failed to deserialize the JSON body into the target type: missing field `messages`"
            )
        text, prompt_tokens = chat_prompt(messages)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        limit = limit if isinstance(limit, int) else None
        stops = stop_strings(body.get("stop"))
        invalid = _validate(text or " ", prompt_tokens, limit, len(stops))
        plan = self.rt.plan(text, limit, stops) if invalid is None else None
        created = int(time.time())
        head = {"object": "chat.completion.chunk", "id": "", "created": created}
        head |= {"model": self.model_id, "system_fingerprint": FINGERPRINT}
        if body.get("stream"):
            options = body.get("stream_options") or {}
            usage = bool(options.get("include_usage"))
            ids = self.rt.cache_ids(lambda: chat_ids(messages))
            return self._stream_chat(ctx, head, plan, invalid, prompt_tokens, usage, len(text), ids)
        if invalid is not None or plan is None:
            raise ApiError(422, f"Input validation error: {invalid}", "validation")
        ticket = ctx.admit(self.rt)
        await self.rt.generate(
            ticket,
            ctx.times,
            self.model_id,
            plan,
            prompt_tokens,
            _discard,
            self.rt.cache_ids(lambda: chat_ids(messages)),
        )
        choice = {"index": 0, "message": {"role": "assistant", "content": plan.text}}
        choice |= {"logprobs": None, "finish_reason": _chat_finish(plan)}
        return JSONReply(
            ctx,
            {
                **head,
                "object": "chat.completion",
                "choices": [choice],
                "usage": _usage(prompt_tokens, len(plan.tokens)),
            },
            headers=_headers(ctx, len(text), prompt_tokens, len(plan.tokens)),
        )

    def _stream_chat(
        self,
        ctx: RequestCtx,
        head: dict[str, Any],
        plan: Plan | None,
        invalid: str | None,
        prompt_tokens: int,
        include_usage: bool,
        chars: int,
        ids: list[int] | None,
    ) -> Response:
        async def produce(out: Emitter) -> None:
            # TGI ends the messages stream with [DONE] even after an error event.
            if invalid is not None or plan is None:
                await out.emit(_error_event(f"Input validation error: {invalid}", "validation"))
            else:
                emit = _chat_emitter(out, head, plan, prompt_tokens, include_usage)
                await self._run_streamed(ctx, out, plan, prompt_tokens, emit, ids)
            await out.emit(_sse("[DONE]"))

        headers = _stream_headers(chars)
        return StreamReply(
            ctx, SSE, produce, headers_first=True, garbage=b"data:{malformed\n\n", headers=headers
        )

    async def tokenize(self, request: Request) -> Response:
        """TGI's ``/tokenize``: a generate body in, one ``{id, text, start, stop}`` a token
        out (character offsets into ``inputs``)."""
        ctx = ctx_of(request)
        inputs = self._body(ctx).get("inputs")
        if not isinstance(inputs, str):
            raise _rejection(
                "Failed to deserialize the JSON body into the target type: missing field `inputs`"
            )
        tokens: list[dict[str, Any]] = []
        end = 0
        for token_id, word in zip(prompt_ids(inputs), inputs.split(), strict=True):
            start = inputs.index(word, end)
            end = start + len(word)
            tokens.append({"id": token_id, "text": word, "start": start, "stop": end})
        return JSONReply(ctx, tokens)

    # -- server info ---------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def info(self, request: Request) -> Response:
        settings = self.rt.settings
        concurrent = settings.slots + (
            settings.max_queue if settings.max_queue is not None else 128
        )
        return JSONReply(
            ctx_of(request),
            {
                "model_id": self.model_id,
                "model_sha": None,
                "model_dtype": "torch.float16",
                "model_device_type": "cuda",
                "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": concurrent,
                "max_best_of": 2,
                "max_stop_sequences": MAX_STOP_SEQUENCES,
                "max_input_tokens": MAX_INPUT_TOKENS,
                "max_total_tokens": MAX_TOTAL_TOKENS,
                "max_batch_size": settings.slots,
                "validation_workers": 2,
                "max_client_batch_size": 4,
                "router": "text-generation-router",
                "version": VERSION,
                "sha": None,
                "docker_label": None,
            },
        )

    async def models(self, request: Request) -> Response:
        model = {"id": self.model_id, "object": "model", "created": 0, "owned_by": self.model_id}
        return JSONReply(ctx_of(request), {"object": "list", "data": [model]})

    async def metrics(self, request: Request) -> Response:
        stats = self.rt.stats.snapshot()
        pool = self.rt.pool
        requests = sum(n for path, n in stats.requests.items() if path in _INFERENCE)
        series = [
            ("tgi_request_count", "counter", requests),
            ("tgi_request_success", "counter", stats.generations),
            ("tgi_queue_size", "gauge", pool.queued),
            ("tgi_batch_current_size", "gauge", pool.active),
            ("tgi_batch_current_max_tokens", "gauge", self.rt.kv_tokens),
            ("tgi_request_input_length_sum", "counter", stats.prompt_tokens),
            ("tgi_request_generated_tokens_sum", "counter", stats.tokens_generated),
        ]
        lines: list[str] = []
        for name, kind, value in series:
            lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n")


def _chat_emitter(
    out: Emitter, head: dict[str, Any], plan: Plan, prompt_tokens: int, include_usage: bool
) -> Emit:
    """Emits one messages-API chunk a token; the last has finish_reason (and usage if asked:
    TGI puts it on the last token's chunk, not on a chunk of its own)."""

    async def emit(index: int, token: Token, last: bool) -> None:
        delta = {"role": "assistant", "content": token.text}
        choice = {"index": 0, "delta": delta, "logprobs": None}
        choice["finish_reason"] = _chat_finish(plan) if last else None
        chunk: dict[str, Any] = {**head, "choices": [choice]}
        if last and include_usage:
            chunk["usage"] = _usage(prompt_tokens, len(plan.tokens))
        await out.emit(_sse(chunk))

    return emit


def _stream_headers(chars: int) -> dict[str, str]:
    return {
        "x-compute-type": COMPUTE_TYPE,
        "x-compute-characters": str(chars),
        "x-accel-buffering": "no",
    }


def _chat_finish(plan: Plan) -> str:
    return "length" if plan.finish == "length" else "stop"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _prefill(inputs: str) -> list[dict[str, Any]]:
    words = inputs.split()
    ids = prompt_ids(inputs)
    return [
        {"id": i, "text": w if n == 0 else " " + w, "logprob": None if n == 0 else -1.0}
        for n, (i, w) in enumerate(zip(ids, words, strict=True))
    ]


def build(rt: Runtime) -> tuple[Wire, Starlette]:
    """TGI's routes and error shapes for one running engine."""
    api = TgiApi(rt)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        if exc.error_type == "":  # an axum extractor rejection: plain text
            return PlainTextResponse(exc.message, exc.status)
        return _error(exc.status, exc.message, exc.error_type)

    async def on_overloaded(request: Request, exc: Exception) -> Response:
        return _error(429, OVERLOADED, "overloaded")

    async def on_unknown(request: Request, exc: Exception) -> Response:
        return Response(status_code=getattr(exc, "status_code", 404))  # axum: empty body

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
        needs_key=lambda method, path: method == "POST",  # TGI guards its generation routes
        error=_error,
        unauthorized=lambda: Response(status_code=401),  # TGI: bare 401, no body
    )
    return wire, app
