"""Ollama's native API (/api/*) as the FakeEngine speaks it: routes, NDJSON streams, errors.
Shapes follow Ollama's docs/api.md and what the official `ollama` Python client parses."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
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
from ._runtime import GenTimes, Overloaded, Runtime
from ._tokens import Plan, Token, chat_ids, chat_prompt, count_words, embedding, prompt_ids

__all__ = ["build"]

VERSION = "0.12.6"
OVERLOADED = "server busy, please try again.  maximum pending requests exceeded"
NDJSON = "application/x-ndjson"
CONTEXT_LENGTH = 4096
MODEL_SIZE = 2_019_393_189
MODIFIED_AT = "2025-01-01T00:00:00Z"
KEEP_ALIVE = timedelta(minutes=5)
DETAILS = {
    "parent_model": "",
    "format": "gguf",
    "family": "llama",
    "families": ["llama"],
    "parameter_size": "3.2B",
    "quantization_level": "Q4_K_M",
}
_INFERENCE = frozenset({"/api/chat", "/api/generate", "/api/embed", "/api/embeddings"})
_UNLOAD = (0, "0", "0s", "0m")


def canonical(name: str) -> str:
    """Ollama's full model name: a missing tag means ``:latest``."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _error(status: int, message: str | None = None) -> Response:
    default = OVERLOADED if status == 503 else HTTPStatus(status).phrase.lower()
    return JSONResponse({"error": message or default}, status)


def _done_reason(plan: Plan) -> str:
    return "length" if plan.finish == "length" else "stop"


def _line(data: Mapping[str, Any]) -> bytes:
    return dump(data) + b"\n"


async def _discard(index: int, token: Token, last: bool) -> None:
    """Non-streaming replies only need the plan's text once the generation ends."""


class OllamaApi:
    """The route handlers, bound to one running engine."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        #: Served models; pull, create, copy and delete change it as Ollama's would.
        self.served = list(dict.fromkeys(canonical(m) for m in rt.settings.models))

    def routes(self) -> list[Route]:
        return [
            Route("/", self.root, methods=["GET"]),
            Route("/api/version", self.version, methods=["GET"]),
            Route("/api/tags", self.tags, methods=["GET"]),
            Route("/api/ps", self.ps, methods=["GET"]),
            Route("/api/show", self.show, methods=["POST"]),
            Route("/api/chat", self.chat, methods=["POST"]),
            Route("/api/generate", self.generate, methods=["POST"]),
            Route("/api/embed", self.embed, methods=["POST"]),
            Route("/api/embeddings", self.embeddings, methods=["POST"]),
            Route("/api/pull", self.pull, methods=["POST"]),
            Route("/api/push", self.push, methods=["POST"]),
            Route("/api/create", self.create, methods=["POST"]),
            Route("/api/copy", self.copy, methods=["POST"]),
            Route("/api/delete", self.delete, methods=["DELETE"]),
        ]

    # -- request parsing ---------------------------------------------------------------------

    def _body(self, ctx: RequestCtx) -> dict[str, Any]:
        if not ctx.body:
            raise ApiError(400, "missing request body")
        try:
            body = ctx.json()
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        if not isinstance(body, dict):
            raise ApiError(400, "json: cannot unmarshal into Go value of type api.Request")
        return body

    def _model(self, body: Mapping[str, Any]) -> tuple[str, str]:
        """(name as asked, canonical served name); 404 in Ollama's words when not served."""
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "model is required")
        if canonical(name) not in self.served:
            raise ApiError(404, f'model "{name}" not found, try pulling it first')
        return name, canonical(name)

    @staticmethod
    def _options(body: Mapping[str, Any]) -> tuple[int | None, tuple[str, ...]]:
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "json: cannot unmarshal options")
        num_predict = options.get("num_predict")
        # Ollama: -1 is "no limit", -2 "fill the context"; both end at default_max_tokens here.
        limit = num_predict if isinstance(num_predict, int) and num_predict > 0 else None
        return limit, stop_strings(options.get("stop"))

    def _final(self, times: GenTimes, prompt_tokens: int, plan: Plan) -> dict[str, Any]:
        return {
            "done_reason": _done_reason(plan),
            "done": True,
            "total_duration": times.total_ns,
            "load_duration": times.load_ns,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": times.prefill_ns,
            "eval_count": len(plan.tokens),
            # At least 1 ns: clients divide eval_count by it.
            "eval_duration": max(times.decode_ns, 1),
        }

    async def _load_only(
        self, body: Mapping[str, Any], name: str, model: str, field: dict[str, Any]
    ) -> Response:
        """An empty prompt / message list only loads (or, keep_alive 0, unloads) the model."""
        if body.get("keep_alive") in _UNLOAD:
            self.rt.unload(model)
            reason = "unload"
        else:
            await self.rt.load(model)
            reason = "load"
        return JSONResponse(
            {"model": name, "created_at": _now(), **field, "done_reason": reason, "done": True}
        )

    # -- generation ----------------------------------------------------------------------------

    async def _run(
        self,
        ctx: RequestCtx,
        name: str,
        model: str,
        stream: bool,
        plan: Plan,
        prompt_tokens: int,
        piece: Callable[[str], dict[str, Any]],
        extra_final: dict[str, Any],
        ids: list[int] | None,
    ) -> Response:
        """Generate; ``piece(text)`` builds the field carrying text ("message" or "response").
        ``ids`` go through the prefix cache (timing only: Ollama reports no cache hits)."""
        ticket = ctx.admit(self.rt)

        def final(text: str) -> dict[str, Any]:
            head = {"model": name, "created_at": _now(), **piece(text)}
            return {**head, **self._final(ctx.times, prompt_tokens, plan), **extra_final}

        if not stream:
            await self.rt.generate(ticket, ctx.times, model, plan, prompt_tokens, _discard, ids)
            return JSONReply(ctx, final(plan.text))

        per_chunk = self.rt.timing.tokens_per_chunk

        async def produce(out: Emitter) -> None:
            pending: list[str] = []

            # tokens_per_chunk tokens a line, sent when its last token is produced: Ollama's
            # lines say nothing of how many tokens each carries (only the final eval_count).
            async def emit(index: int, token: Token, last: bool) -> None:
                pending.append(token.text)
                if len(pending) < per_chunk and not last:
                    return
                text = "".join(pending)
                pending.clear()
                chunk = {"model": name, "created_at": _now(), **piece(text), "done": False}
                await out.emit(_line(chunk))

            await self.rt.generate(ticket, ctx.times, model, plan, prompt_tokens, emit, ids)
            await out.emit(_line(final("")))

        return StreamReply(ctx, NDJSON, produce, headers_first=False, garbage=b'{"model":\n')

    async def chat(self, request: Request) -> Response:
        ctx = ctx_of(request)
        body = self._body(ctx)
        name, model = self._model(body)
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ApiError(400, "json: cannot unmarshal messages into []api.Message")
        if not messages:
            return await self._load_only(body, name, model, {"message": _message("")})
        text, prompt_tokens = chat_prompt(messages)
        limit, stop = self._options(body)
        plan = self.rt.plan(text, limit, stop)
        stream = body.get("stream") is not False  # Ollama streams unless told not to

        def piece(content: str) -> dict[str, Any]:
            return {"message": _message(content)}

        ids = self.rt.cache_ids(lambda: chat_ids(messages))
        return await self._run(ctx, name, model, stream, plan, prompt_tokens, piece, {}, ids)

    async def generate(self, request: Request) -> Response:
        ctx = ctx_of(request)
        body = self._body(ctx)
        name, model = self._model(body)
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise ApiError(400, "json: cannot unmarshal prompt into string")
        if not prompt and not body.get("images"):
            return await self._load_only(body, name, model, {"response": ""})
        limit, stop = self._options(body)
        plan = self.rt.plan(prompt, limit, stop)
        stream = body.get("stream") is not False
        context = prompt_ids(prompt) + [t.id for t in plan.tokens]

        def piece(text: str) -> dict[str, Any]:
            return {"response": text}

        extra = {} if body.get("raw") else {"context": context}
        ids = self.rt.cache_ids(lambda: prompt_ids(prompt))
        tokens = count_words(prompt)
        return await self._run(ctx, name, model, stream, plan, tokens, piece, extra, ids)

    async def embed(self, request: Request) -> Response:
        ctx = ctx_of(request)
        body = self._body(ctx)
        name, model = self._model(body)
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if inputs is None:
            inputs = []
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise ApiError(400, "invalid input type")
        inputs = [i for i in inputs if i]
        if not inputs:
            await self.rt.load(model)
            return JSONResponse({"model": name, "embeddings": []})
        words = sum(count_words(i) for i in inputs)
        await self.rt.embed(ctx.admit(self.rt), ctx.times, model, words)
        return JSONReply(
            ctx,
            {
                "model": name,
                "embeddings": [embedding(i) for i in inputs],
                "total_duration": ctx.times.total_ns,
                "load_duration": ctx.times.load_ns,
                "prompt_eval_count": words,
            },
        )

    async def embeddings(self, request: Request) -> Response:
        ctx = ctx_of(request)
        body = self._body(ctx)
        _, model = self._model(body)
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise ApiError(400, "json: cannot unmarshal prompt into string")
        if not prompt:
            await self.rt.load(model)
            return JSONResponse({"embedding": []})
        await self.rt.embed(ctx.admit(self.rt), ctx.times, model, count_words(prompt))
        return JSONReply(ctx, {"embedding": embedding(prompt)})

    # -- model management ----------------------------------------------------------------------

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(self, request: Request) -> Response:
        return JSONReply(ctx_of(request), {"version": VERSION})

    async def tags(self, request: Request) -> Response:
        return JSONReply(ctx_of(request), {"models": [_entry(m) for m in self.served]})

    async def ps(self, request: Request) -> Response:
        expires = (datetime.now(UTC) + KEEP_ALIVE).isoformat()
        models = [
            {
                **_entry(m),
                "expires_at": expires,
                "size_vram": MODEL_SIZE,
                "context_length": CONTEXT_LENGTH,
            }
            for m in self.rt.loaded()
        ]
        return JSONReply(ctx_of(request), {"models": models})

    def _progress(self, body: Mapping[str, Any], steps: list[dict[str, Any]]) -> Response:
        """Ollama's progress reply: NDJSON statuses ending in "success", or only the last."""
        if body.get("stream") is False:
            return JSONResponse(steps[-1])
        return StreamingResponse(
            iter([_line(step) for step in steps]), media_type="application/x-ndjson"
        )

    def _name(self, body: Mapping[str, Any], key: str = "model") -> str:
        name = body.get(key) or (body.get("name") if key == "model" else None)
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"{key} is required")
        return canonical(name)

    async def pull(self, request: Request) -> Response:
        body = self._body(ctx_of(request))
        name = self._name(body)
        digest = f"sha256:{_digest(name)}"
        layers = [
            {"status": f"pulling {digest[7:19]}", "digest": digest, "total": MODEL_SIZE,
             "completed": done}
            for done in (0, MODEL_SIZE // 2, MODEL_SIZE)
        ]  # fmt: skip
        if name not in self.served:
            self.served.append(name)
        steps: list[dict[str, Any]] = [{"status": "pulling manifest"}, *layers,
                 {"status": "verifying sha256 digest"},
                 {"status": "writing manifest"}, {"status": "success"}]  # fmt: skip
        return self._progress(body, steps)

    async def push(self, request: Request) -> Response:
        body = self._body(ctx_of(request))
        name = self._name(body)
        if name not in self.served:
            raise ApiError(404, f"model '{name}' not found")
        steps = [{"status": "retrieving manifest"}, {"status": "pushing manifest"},
                 {"status": "success"}]  # fmt: skip
        return self._progress(body, steps)

    async def create(self, request: Request) -> Response:
        body = self._body(ctx_of(request))
        name = self._name(body)
        base = body.get("from")
        if isinstance(base, str) and canonical(base) not in self.served:
            raise ApiError(404, f"model '{base}' not found")
        if name not in self.served:
            self.served.append(name)
        steps = [{"status": "reading model metadata"}, {"status": "writing manifest"},
                 {"status": "success"}]  # fmt: skip
        return self._progress(body, steps)

    async def copy(self, request: Request) -> Response:
        body = self._body(ctx_of(request))
        source, destination = self._name(body, "source"), self._name(body, "destination")
        if source not in self.served:
            raise ApiError(404, f"model '{source}' not found")
        if destination not in self.served:
            self.served.append(destination)
        return Response(status_code=200)

    async def delete(self, request: Request) -> Response:
        name = self._name(self._body(ctx_of(request)))
        if name not in self.served:
            raise ApiError(404, f"model '{name}' not found")
        self.served.remove(name)
        return Response(status_code=200)

    async def show(self, request: Request) -> Response:
        ctx = ctx_of(request)
        body = self._body(ctx)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "model is required")
        if canonical(name) not in self.served:
            raise ApiError(404, f"model '{name}' not found")
        return JSONReply(ctx, _show(canonical(name)))


def _message(content: str) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def _digest(model: str) -> str:
    return hashlib.sha256(model.encode()).hexdigest()


def _entry(model: str) -> dict[str, Any]:
    return {
        "name": model,
        "model": model,
        "modified_at": MODIFIED_AT,
        "size": MODEL_SIZE,
        "digest": _digest(model),
        "details": DETAILS,
    }


def _show(model: str) -> dict[str, Any]:
    return {
        "license": "fake license",
        "modelfile": f'# Modelfile generated by "ollama show"\nFROM {model}\n',
        "parameters": 'stop "<|eot_id|>"',
        "template": "{{ .Prompt }}",
        "details": DETAILS,
        "model_info": {
            "general.architecture": "llama",
            "general.parameter_count": 3_212_749_888,
            "llama.context_length": CONTEXT_LENGTH,
            "llama.embedding_length": 8,
        },
        "capabilities": ["completion"],
        "modified_at": MODIFIED_AT,
    }


def build(rt: Runtime) -> tuple[Wire, Starlette]:
    """Ollama's routes and error shapes for one running engine."""
    api = OllamaApi(rt)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _error(exc.status, exc.message)

    async def on_overloaded(request: Request, exc: Exception) -> Response:
        return _error(503, OVERLOADED)

    async def on_unknown(request: Request, exc: Exception) -> Response:
        # gin answers unknown routes and wrong methods alike.
        return PlainTextResponse("404 page not found", 404)

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
        # Ollama has no keys; one given guards /api like a reverse proxy in front of it would.
        needs_key=lambda method, path: path.startswith("/api/"),
        error=_error,
        unauthorized=lambda: JSONResponse({"error": "unauthorized"}, 401),
    )
    return wire, app
