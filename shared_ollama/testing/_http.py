"""HTTP plumbing shared by the FakeEngine's wire formats: request context, faults carried out on
the wire (reset, truncate, malformed, fail, delay), auth, stats, and the streamed/JSON replies."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ._faults import Fault
from ._runtime import GenTimes, Runtime, Ticket, now_ns

__all__ = [
    "ApiError",
    "EngineApp",
    "Emitter",
    "JSONReply",
    "RequestCtx",
    "StreamReply",
    "Wire",
    "ctx_of",
    "dump",
    "protocol_class",
    "stop_strings",
]

Transports = dict[tuple[str, int], asyncio.Transport]
_CTX_KEY = "fake_engine.ctx"
_DISCONNECT_WAIT_S = 5.0


def protocol_class(transports: Transports) -> type[H11Protocol]:
    """uvicorn's h11 protocol, also recording each connection's transport by peer address.

    ASGI hides the socket from the app; faults need it to reset or cut a connection.
    """

    class FaultableH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if self.client is not None:
                transports[(self.client[0], self.client[1])] = transport

        def connection_lost(self, exc: Exception | None) -> None:
            if self.client is not None:
                transports.pop((self.client[0], self.client[1]), None)
            super().connection_lost(exc)

    return FaultableH11Protocol


def stop_strings(value: Any) -> tuple[str, ...]:
    """A request's stop strings: one string or a list of them; anything else means none."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(s for s in value if isinstance(s, str))
    return ()


def dump(data: Any) -> bytes:
    """Compact JSON, as Go, Rust and pydantic servers write it."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


class ApiError(Exception):
    """An error reply in the engine's own shape (raised by handlers, rendered by the wire)."""

    def __init__(self, status: int, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type


class Truncated(Exception):
    """The connection was cut on purpose by a truncate fault; the reply ends here."""


@dataclass(eq=False)
class RequestCtx:
    """Everything the engine knows about one request beyond the ASGI scope."""

    method: str
    path: str
    body: bytes
    times: GenTimes
    fault: Fault | None
    transport: asyncio.Transport | None
    stream: bool = False
    tickets: list[Ticket] = field(default_factory=list)
    response_complete: bool = False
    closing: bool = False  # the engine closes the connection on purpose
    client_gone: bool = False
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    def json(self) -> Any:
        """The body as JSON; ``ValueError`` when it is not."""
        return json.loads(self.body)

    def faulted(self, action: str) -> Fault | None:
        return self.fault if self.fault is not None and self.fault.action == action else None

    async def reset(self) -> None:
        """Abort the connection with an RST (SO_LINGER 0), before any byte of a reply."""
        self.closing = True
        transport = self._transport()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        await self._gone()

    async def cut(self) -> None:
        """Close the connection (FIN) in the middle of a reply."""
        self.closing = True
        self._transport().close()
        await self._gone()

    def admit(self, rt: Runtime) -> Ticket:
        """Admit this request to the engine's slots (``Overloaded`` when the queue is full)."""
        return rt.admit(self.tickets, self.times)

    def release(self) -> None:
        for ticket in self.tickets:
            ticket.done()

    def _transport(self) -> asyncio.Transport:
        if self.transport is None:
            raise RuntimeError("no transport recorded for this connection")
        return self.transport

    async def _gone(self) -> None:
        # Returning before uvicorn saw the connection go would make it log an incomplete reply.
        await asyncio.wait_for(self.disconnected.wait(), _DISCONNECT_WAIT_S)


def ctx_of(request: Request) -> RequestCtx:
    return cast(RequestCtx, request.scope[_CTX_KEY])


_GARBAGE = b'{"fake_engine": malformed'


class JSONReply(Response):
    """A JSON reply that carries out the malformed and truncate faults of a successful call."""

    media_type = "application/json"

    def __init__(
        self,
        ctx: RequestCtx,
        content: Any,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
    ) -> None:
        self.ctx = ctx
        super().__init__(dump(content), status_code, headers, media_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ok = self.status_code == 200
        if ok and self.ctx.faulted("malformed"):
            self.body = _GARBAGE
            self.headers["content-length"] = str(len(_GARBAGE))
        elif ok and self.ctx.faulted("truncate"):
            start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
            await send(start)
            half = self.body[: len(self.body) // 2]
            await send({"type": "http.response.body", "body": half, "more_body": True})
            await self.ctx.cut()
            return
        await super().__call__(scope, receive, send)


class Emitter:
    """Sends the chunks of one streamed reply, firing malformed/truncate faults on the way."""

    def __init__(
        self, ctx: RequestCtx, send: Send, headers: list[tuple[bytes, bytes]], garbage: bytes
    ) -> None:
        self._ctx = ctx
        self._send = send
        self._headers = headers
        self._garbage = garbage
        self._started = False
        self.chunks = 0

    async def start(self) -> None:
        """Send the status line and headers, once."""
        if not self._started:
            self._started = True
            await self._send(
                {"type": "http.response.start", "status": 200, "headers": self._headers}
            )

    async def emit(self, data: bytes) -> None:
        """Send one protocol chunk (an NDJSON line, an SSE event)."""
        cut = self._ctx.faulted("truncate")
        if cut is not None and self.chunks >= cut.after_chunks:
            await self.start()
            await self._ctx.cut()
            raise Truncated
        await self.start()
        await self._send({"type": "http.response.body", "body": data, "more_body": True})
        self.chunks += 1
        if self.chunks == 1 and self._ctx.faulted("malformed"):
            await self._send(
                {"type": "http.response.body", "body": self._garbage, "more_body": True}
            )

    async def finish(self) -> None:
        await self.start()
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


class StreamReply(Response):
    """A streamed reply produced by ``produce(emitter)``.

    ``headers_first``: send the headers before producing (vLLM, TGI) rather than with the first
    chunk (Ollama, whose headers wait for the first token).
    """

    def __init__(
        self,
        ctx: RequestCtx,
        media_type: str,
        produce: Callable[[Emitter], Awaitable[None]],
        *,
        headers_first: bool,
        garbage: bytes,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        ctx.stream = True
        self.ctx = ctx
        self.status_code = 200
        self.background = None
        self.produce = produce
        self.headers_first = headers_first
        self.garbage = garbage
        extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        self.raw_headers = [(b"content-type", media_type.encode()), *extra]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        out = Emitter(self.ctx, send, self.raw_headers, self.garbage)
        if self.headers_first:
            await out.start()
        try:
            await self.produce(out)
        except Truncated:
            return
        await out.finish()


@dataclass(frozen=True)
class Wire:
    """What the shared HTTP layer needs from one wire format."""

    inference: frozenset[str]  # POST paths that generate or embed: where path=None faults land
    needs_key: Callable[[str, str], bool]  # (method, path) guarded by the api key
    error: Callable[[int, str | None], Response]  # the engine's error reply for a status
    unauthorized: Callable[[], Response]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return cast(bytes, value).decode("latin-1")
    return None


def _retry_after(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else str(seconds)


class EngineApp:
    """The ASGI app uvicorn serves: stats, faults, auth, client-disconnect watch, then routes.

    The request body is read first; afterwards a watcher task waits for the client to go
    away and cancels the handler, so an abandoned generation frees its slot at once.
    """

    def __init__(
        self, runtime: Runtime, wire: Wire, app: ASGIApp, admin: ASGIApp, transports: Transports
    ) -> None:
        self.runtime = runtime
        self.wire = wire
        self.app = app
        self.admin = admin
        self.transports = transports
        self.stopping = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith("/_fake/"):
            await self.admin(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            return
        ctx = self._context(scope, body)
        scope[_CTX_KEY] = ctx
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.create_task(self._watch(receive, ctx, task))
        try:
            await self._serve(scope, ctx, self._tracking(ctx, send))
        except asyncio.CancelledError:
            if not ctx.client_gone or task.uncancel() > 0:
                raise
            if not self.stopping:
                self.runtime.stats.add("requests_aborted")
                if ctx.stream:
                    self.runtime.stats.add("streams_aborted")
        finally:
            watcher.cancel()
            ctx.release()

    def _context(self, scope: Scope, body: bytes) -> RequestCtx:
        settings = self.runtime.settings
        method, path = scope["method"], scope["path"]
        settings.stats.request(path)
        inference = method == "POST" and path in self.wire.inference
        fault = settings.faults.take(path, inference=inference)
        if fault is not None:
            settings.stats.fault(fault.action)
        client = scope.get("client")
        transport = self.transports.get((client[0], client[1])) if client else None
        return RequestCtx(method, path, body, GenTimes(now_ns()), fault, transport)

    async def _serve(self, scope: Scope, ctx: RequestCtx, send: Send) -> None:
        receive = _replay(ctx)
        fault = ctx.fault
        if fault is not None and fault.action == "delay_first_byte":
            await asyncio.sleep(fault.seconds)
        elif fault is not None and fault.action == "reset":
            await ctx.reset()
            return
        elif fault is not None and fault.action == "fail":
            reply = self.wire.error(fault.status, fault.message)
            if fault.retry_after is not None:
                reply.headers["retry-after"] = _retry_after(fault.retry_after)
            await reply(scope, receive, send)
            return
        key = self.runtime.settings.api_key
        guarded = key is not None and self.wire.needs_key(ctx.method, ctx.path)
        if guarded and _header(scope, b"authorization") != f"Bearer {key}":
            await self.wire.unauthorized()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _tracking(self, ctx: RequestCtx, send: Send) -> Send:
        stats = self.runtime.stats

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                stats.response(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                ctx.response_complete = True
            await send(message)

        return tracked

    @staticmethod
    async def _watch(receive: Receive, ctx: RequestCtx, task: asyncio.Task[Any]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        ctx.disconnected.set()
        if not ctx.response_complete and not ctx.closing:
            ctx.client_gone = True
            task.cancel()


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(ctx: RequestCtx) -> Receive:
    """A receive() for the routes: the body already read, then the client's disconnect."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": ctx.body, "more_body": False}
        await ctx.disconnected.wait()
        return {"type": "http.disconnect"}

    return receive
