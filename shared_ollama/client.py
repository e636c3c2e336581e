"""``SharedClient`` (async) and ``SyncSharedClient``: two small interpreters of the core.

A call's whole lifecycle (routing, attempts, hedging, retries and their waits, deadlines,
bounds, breaker bookkeeping, accounting) is a step generator in ``_core.steps``; each
client here only performs the operations it yields: ``Send``/``Read``/``Close`` over httpx,
``NOW``/``WALL``, ``Sleep``, ``Race``, ``Gather`` and, for streams, ``Deliver``. Only this
module knows whether the caller is sync or async.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from types import TracebackType
from typing import Any, Literal, overload

import httpx

from ._base import NOT_GIVEN, BaseClient, NotGiven
from ._core.requests import Op, chat_op, create_body, embed_op, generate_op, show_op
from ._core.results import CHUNKS, RESPONSES, embeddings_response
from ._core.steps import (
    NOW,
    WALL,
    Close,
    Deliver,
    Gather,
    Head,
    IOOp,
    Offload,
    Race,
    Read,
    Send,
    Sleep,
    Steps,
    StreamAbandoned,
)
from ._transport import Connection, map_transport_error, timeout_extension
from ._watchdog import Alarm, Watchdog, watch_transport
from .errors import ClientClosed, ProtocolError, SharedOllamaError, Timeout
from .protocols import Parsed, Piece
from .records import CallRecord
from .types import (
    ChatChunk,
    ChatResponse,
    EmbeddingsResponse,
    EmbedResponse,
    GenerateChunk,
    GenerateResponse,
    ImageLike,
    ListResponse,
    MessageLike,
    ProgressResponse,
    PsResponse,
    ShowResponse,
    StatusResponse,
)

__all__ = ["SharedClient", "SyncSharedClient"]


# _STALE: "Server disconnected without sending a response" on a pooled keep-alive connection
# the server had already closed (llama-server closes after every stream while advertising
# keep-alive), or the request could not be written on it. The server never saw the request,
# so sending it again at once is safe and must not cost a retry, a breaker failure or
# budget. Any other protocol error (a garbled status line, a broken head) is an answer of
# sorts: it goes through the retry policy and counts as an attempt.
def _stale(exc: httpx.RemoteProtocolError | httpx.WriteError) -> bool:
    return isinstance(exc, httpx.WriteError) or "without sending a response" in str(exc)


class _Reply:
    """The driver's side of a ``Head``: the httpx response and its raw byte iterator."""

    __slots__ = ("connection", "iterator", "response", "shard")

    def __init__(self, response: httpx.Response, connection: Connection, shard: int) -> None:
        self.response = response
        self.iterator: Any = None
        #: The shard the request went to, given back once when the reply is closed.
        self.connection: Connection | None = connection
        self.shard = shard

    def release(self) -> Connection | None:
        """The connection whose shard to give back, the first time only."""
        connection, self.connection = self.connection, None
        return connection


class _Body:
    """A whole body collected within ``Read.max_bytes`` (the same bound in both drivers)."""

    __slots__ = ("data", "op")

    def __init__(self, op: Read) -> None:
        self.op = op
        self.data = bytearray()
        declared = op.head.headers.get("content-length", "")
        declared_size = int(declared) if declared.strip().isdigit() else 0
        if op.max_bytes is not None and not op.truncate and declared_size > op.max_bytes:
            raise self._too_big()  # refused before a byte of it is read

    def add(self, chunk: bytes) -> bool:
        """Append ``chunk``; True once a truncated body is full (stop reading)."""
        self.data += chunk
        limit = self.op.max_bytes
        if limit is None or len(self.data) <= limit:
            return False
        if self.op.truncate:
            del self.data[limit:]
            return True
        # Freed now: the error's traceback keeps this frame (and so this object) alive while
        # the call retries, and each attempt would otherwise hold its own full buffer.
        self.data = bytearray()
        raise self._too_big()

    def _too_big(self) -> ProtocolError:
        return ProtocolError(
            f"reply larger than {self.op.max_bytes} bytes (Limits.max_response_bytes)",
            endpoint=self.op.endpoint.url,
            model=self.op.model,
            status_code=self.op.head.status,
        )


# How long close waits for calls it cancelled to record themselves (they take microseconds).
_CLOSE_WAIT_S = 5.0
_CLOSING = "shared_ollama: the client is closing"


def _closed_error(op: IOOp) -> ClientClosed:
    if isinstance(op, Send | Read):
        return ClientClosed(
            "the client was closed during the call", endpoint=op.endpoint.url, model=op.model
        )
    return ClientClosed("the client was closed during the call")


def _limit(op: Send | Read) -> tuple[float | None, bool]:
    """(seconds to wait, whether the call's total deadline is the binding bound)."""
    limit = op.limit
    phase_deadline = op.phase_deadline if isinstance(op, Read) else None
    if phase_deadline is None and op.deadline is None:
        return limit, False
    now = time.monotonic()
    if phase_deadline is not None:
        left = max(0.0, phase_deadline - now)
        limit = left if limit is None else min(limit, left)
    if op.deadline is not None:
        left = max(0.0, op.deadline - now)
        if limit is None or left < limit:
            return left, True
    return limit, False


def _deadline_error(op: Send | Read, total: bool) -> Timeout:
    phase = "total" if total else (op.phase if isinstance(op, Read) else "first_chunk")
    what = "total deadline passed" if total else f"no data within the {phase} deadline"
    return Timeout(what, phase=phase, endpoint=op.endpoint.url, model=op.model)


def _transport_error(op: Send | Read, exc: Exception) -> SharedOllamaError:
    return map_transport_error(
        exc,
        endpoint=op.endpoint.url,
        model=op.model,
        got_reply=isinstance(op, Read),
        got_chunk=isinstance(op, Read) and op.phase == "between_chunks",
    )


def _head(resp: httpx.Response, connection: Connection, shard: int) -> Head:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in resp.headers.raw}
    return Head(resp.status_code, headers, _Reply(resp, connection, shard), time.monotonic_ns())


def _content(op: Read) -> Any:
    """A whole body's bytes: straight from the transport, decoded only where the server
    compressed it (a stream's bytes are always taken raw)."""
    resp: httpx.Response = op.head.handle.response
    if op.head.headers.get("content-encoding", "identity") == "identity":
        return resp.stream
    return (
        resp.aiter_bytes() if isinstance(resp.stream, httpx.AsyncByteStream) else resp.iter_bytes()
    )


def _has_content(record: CallRecord, piece: Piece) -> bool:
    return piece.has_content


def _content_and_text(record: CallRecord, piece: Piece) -> tuple[bool, str]:
    return piece.has_content, piece.text


def _advance(gen: Steps[Any], value: Any, error: BaseException | None) -> tuple[bool, Any]:
    """Resume ``gen`` with ``value`` (or ``error``) up to the next operation that needs the
    driver: ``(False, op)``, or ``(True, result)`` once it returned. Clock readings are
    answered here, inline (several per stream chunk)."""
    while True:
        try:
            op = gen.send(value) if error is None else gen.throw(error)
        except StopIteration as stop:
            return True, stop.value
        if op is not NOW:
            return False, op
        value, error = (time.monotonic(), time.monotonic_ns()), None


def _gathered(results: Sequence[object]) -> list[object]:
    """``Gather``'s answer: a ``SharedOllamaError`` stands in for its part; a close, or any
    other error (cancellation, a bug), is raised."""
    for result in results:
        if isinstance(result, ClientClosed) or (
            isinstance(result, BaseException) and not isinstance(result, SharedOllamaError)
        ):
            raise result
    return list(results)


# ======================================================================================
# async
# ======================================================================================
class SharedClient(BaseClient[httpx.AsyncBaseTransport]):
    """Async client over a pool of Ollama / OpenAI-compatible / TGI endpoints.

    Use as ``async with SharedClient(endpoints=[...], project="team") as client:``.
    """

    _health_task: asyncio.Task[None] | None = None

    def _open_connections(self, transport: httpx.AsyncBaseTransport | None) -> None:
        self._http = self._http_connections(transport)
        #: Resolved when an endpoint gives a slot back: calls waiting for one re-route at once.
        self._slot_freed: asyncio.Future[None] | None = None
        #: Tasks inside a send, read or sleep now (a count: hedges nest), and those close
        #: cancelled.
        self._performing: dict[asyncio.Task[Any], int] = {}
        self._close_cancelled: set[asyncio.Task[Any]] = set()
        self._recorded: asyncio.Event | None = None

    def _http_connections(
        self, transport: httpx.AsyncBaseTransport | None
    ) -> dict[str, Connection]:
        """The endpoints' httpx transports (a driver over another library has none)."""
        return self._connections(httpx.AsyncHTTPTransport, transport)

    def _owner(self) -> object:
        return asyncio.current_task()

    def _wake_slot_waiters(self) -> None:
        freed, self._slot_freed = self._slot_freed, None
        if freed is not None and not freed.done():
            freed.set_result(None)
        if not (admission := self._pool.admission).idle:
            admission.wake(time.monotonic())

    def _call_finished(self) -> None:
        if self._recorded is not None:
            self._recorded.set()

    async def __aenter__(self) -> SharedClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Detect protocols, discover models and start health probes (idempotent)."""
        if (probes := self._starting()) is None:
            return
        await self._run(probes)
        if self.config.health.enabled:
            loop = asyncio.get_running_loop()
            self._health_task = loop.create_task(self._run(self._health_steps()))

    async def aclose(self) -> None:
        """Stop probes, end calls in flight, close connections, flush the ledger (idempotent).

        Calls inside a send, read or wait are cancelled and raise ``ClientClosed``; every call
        still open gets its record (``ClientClosed``) before the ledger is flushed and closed.
        """
        if self._closed or self._closing:
            return
        self._closing = True
        me = asyncio.current_task()
        victims = {task for task in self._performing if task is not me and not task.done()}
        for task in victims:
            self._close_cancelled.add(task)
            task.cancel(_CLOSING)
        waiting = self._calls_of(victims)
        self._recorded = asyncio.Event()
        loop = asyncio.get_running_loop()
        until = loop.time() + _CLOSE_WAIT_S
        while waiting & self._calls.keys() and loop.time() < until:
            self._recorded.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._recorded.wait(), until - loop.time())
        self._finish_abandoned()
        self._closed = True
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, SharedOllamaError):
                await self._health_task
        transports = (t for c in self._http.values() for t in c.transports)
        await asyncio.gather(*(t.aclose() for t in transports))
        # The ledger writer is a thread; flushing may wait on the disk: not on the loop.
        await self.usage.aclose()

    # -- the interpreter ----------------------------------------------------------------
    async def _run(
        self,
        gen: Steps[Any],
        value: Any = None,
        error: BaseException | None = None,
        op: Any = None,
    ) -> Any:
        """Perform what ``gen`` yields (starting with ``op`` when it already yielded one)
        until it returns (its value is returned) or yields a ``Deliver`` (returned as is:
        ``_iterate`` hands its chunk over and resumes)."""
        while True:
            if op is None:
                done, op = _advance(gen, value, error)
                if done or type(op) is Deliver:
                    return op
            try:
                value, error = await self._perform(op), None
            except BaseException as exc:  # thrown into the steps: their cleanup runs
                value, error = None, exc
            op = None

    async def _iterate(self, gen: Steps[None]) -> AsyncIterator[Any]:
        """A stream: each chunk the steps ``Deliver``, handed to the caller in turn."""
        out = await self._run(gen)
        while out is not None:
            try:
                yield out.chunk
            except GeneratorExit:  # the caller stopped reading: the steps close the reply
                with contextlib.suppress(StreamAbandoned):
                    await self._run(gen, error=StreamAbandoned())
                raise
            except BaseException as exc:
                out = await self._run(gen, error=exc)
            else:
                # Chunks decoded from one read come one after another: the next is taken
                # here, with no coroutine made to await; I/O goes through _run as usual.
                done, op = _advance(gen, None, None)
                if done or type(op) is Deliver:
                    out = op
                else:
                    out = await self._run(gen, op=op)

    async def _perform(self, op: IOOp) -> Any:
        if op is WALL:
            return time.time()
        if isinstance(op, Close):
            await self._close_reply(op.head.handle)
            return None
        if isinstance(op, Race):
            return await self._race(op)
        if isinstance(op, Gather):
            parts = (self._run(part) for part in op.parts)
            return _gathered(await asyncio.gather(*parts, return_exceptions=True))
        if isinstance(op, Offload):
            return await asyncio.to_thread(op.fn)
        assert isinstance(op, Send | Read | Sleep)
        if self._closing:
            raise _closed_error(op)
        if type(op) is Read and not op.whole and (ready := self._ready(op)) is not None:
            return ready or None  # no await: nothing for a close to cancel
        task = asyncio.current_task()
        assert task is not None
        performing = self._performing
        performing[task] = performing.get(task, 0) + 1
        try:
            if isinstance(op, Sleep):
                return await self._sleep(op)
            return await self._perform_io(op)
        except asyncio.CancelledError:
            if task not in self._close_cancelled:
                raise  # the caller's own cancellation
            self._close_cancelled.discard(task)
            task.uncancel()
            raise _closed_error(op) from None
        except (SharedOllamaError, httpx.HTTPError, RuntimeError) as exc:
            # Whatever a closing pool makes of a send or read is the close, not a fault.
            if self._closing and not isinstance(exc, ClientClosed):
                raise _closed_error(op) from exc
            raise
        finally:
            if performing[task] == 1:
                del performing[task]
            else:
                performing[task] -= 1

    def _ready(self, op: Read) -> bytes | None:
        """A stream's bytes the transport already holds (``b""`` at its end), taken without
        a timer or a coroutine; None when the read has to wait. httpx cannot say."""
        return None

    async def _close_reply(self, reply: _Reply) -> None:
        """Close a reply (read or not) and give its shard back."""
        if (connection := reply.release()) is not None:
            connection.give(reply.shard)
        await reply.response.aclose()

    async def _sleep(self, op: Sleep) -> None:
        """A backoff sleeps; a wait for a slot ends at the next release."""
        if not op.slot:
            await asyncio.sleep(op.seconds)
            return
        if (ticket := op.ticket) is not None:  # in admission's order: woken in its turn
            woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def wake() -> None:
                if not woken.done():
                    woken.set_result(None)

            admission = self._pool.admission
            admission.sleeping(ticket, wake)
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(op.seconds):
                        await woken
            finally:
                admission.awake(ticket)
            return
        if self._slot_freed is None:
            self._slot_freed = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(op.seconds):
                await asyncio.shield(self._slot_freed)

    async def _race(self, op: Race) -> Any:
        first: asyncio.Future[Any] = asyncio.ensure_future(self._run(op.first))
        done: set[asyncio.Future[Any]]
        done, _ = await asyncio.wait({first}, timeout=op.after)
        pending: set[asyncio.Future[Any]] = {first}
        if not done:
            pending.add(asyncio.ensure_future(self._run(op.second())))
        error: BaseException | None = None
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    if fut.exception() is None:
                        return fut.result()
                    error = fut.exception()
            assert error is not None
            raise error
        finally:
            for fut in pending:  # the slower copy: cancelled, its slot released
                fut.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _perform_io(self, op: Send | Read) -> Any:
        limit, total = _limit(op)
        try:
            async with asyncio.timeout(limit):
                if isinstance(op, Send):
                    connection = self._http[op.endpoint.url]
                    request = connection.request(op.wire, op.headers)
                    shard = connection.take()
                    send = connection.transports[shard].handle_async_request
                    try:
                        try:
                            return _head(await send(request), connection, shard)
                        except (httpx.RemoteProtocolError, httpx.WriteError) as exc:
                            if not _stale(exc):
                                raise
                            # See _STALE: once more, on a fresh connection.
                            return _head(await send(request), connection, shard)
                    except BaseException:
                        connection.give(shard)
                        raise
                reply: _Reply = op.head.handle
                if op.whole:
                    body = _Body(op)
                    async for chunk in _content(op):
                        if body.add(chunk):
                            break
                    return bytes(body.data)
                if reply.iterator is None:
                    reply.iterator = aiter(reply.response.stream)  # type: ignore[arg-type]
                return await anext(reply.iterator, None)
        except TimeoutError:
            raise _deadline_error(op, total) from None
        except httpx.HTTPError as exc:
            raise _transport_error(op, exc) from None

    def _content_flags(
        self, op: Op[Parsed], tags: Mapping[str, str] | None, *, text: bool = False
    ) -> AsyncIterator[Any]:
        """A stream read the bench's way: whether each chunk carried content (text,
        thinking or tool calls), with no typed chunk built; the call is routed, retried and
        accounted exactly as a public stream. ``text``: ``(flag, the chunk's text)`` pairs."""
        make = _content_and_text if text else _has_content
        return self._iterate(self._streaming(op, make, None, NOT_GIVEN, tags))

    # -- public API -------------------------------------------------------------------
    @overload
    async def chat(
        self,
        model: str = "",
        messages: Sequence[MessageLike] | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        stream: Literal[False] = False,
        think: bool | str | None = None,
        format: Any = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
        tags: Mapping[str, str] | None = None,
        session: str | None = None,
        service_class: str | None = None,
    ) -> ChatResponse: ...
    @overload
    async def chat(
        self,
        model: str = "",
        messages: Sequence[MessageLike] | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        stream: Literal[True],
        think: bool | str | None = None,
        format: Any = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
        tags: Mapping[str, str] | None = None,
        session: str | None = None,
        service_class: str | None = None,
    ) -> AsyncIterator[ChatChunk]: ...
    async def chat(
        self,
        model: str = "",
        messages: Sequence[MessageLike] | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        stream: bool = False,
        think: bool | str | None = None,
        format: Any = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
        tags: Mapping[str, str] | None = None,
        session: str | None = None,
        service_class: str | None = None,
    ) -> ChatResponse | AsyncIterator[ChatChunk]:
        """Chat with ``model``; ``stream=True`` returns an async iterator of chunks.

        ``session`` is the routing key for ``strategy="affinity"`` (docs/routing.md; only its
        hash is recorded); ``service_class`` names the call's admission class.
        """
        op = chat_op(
            model,
            messages,
            tools=tools,
            stream=stream,
            think=think,
            format=format,
            options=options,
            keep_alive=keep_alive,
            session=session,
            service_class=service_class,
        )
        if stream:
            return self._iterate(self._streaming(op, CHUNKS["chat"], project, timeout, tags))
        parsed, record = await self._run(self._calling(op, project, timeout, tags))
        return RESPONSES["chat"](record, parsed)  # type: ignore[no-any-return]

    @overload
    async def generate(
        self,
        model: str = "",
        prompt: str = "",
        suffix: str | None = None,
        *,
        system: str | None = None,
        template: str | None = None,
        context: Sequence[int] | None = None,
        stream: Literal[False] = False,
        think: bool | str | None = None,
        raw: bool | None = None,
        format: Any = None,
        images: Sequence[ImageLike] | None = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
        tags: Mapping[str, str] | None = None,
        session: str | None = None,
        service_class: str | None = None,
    ) -> GenerateResponse: ...
    @overload
    async def generate(
        self,
        model: str = "",
        prompt: str = "",
        suffix: str | None = None,
        *,
        system: str | None = None,
        template: str | None = None,
        context: Sequence[int] | None = None,
        stream: Literal[True],
        think: bool | str | None = None,
        raw: bool | None = None,
        format: Any = None,
        images: Sequence[ImageLike] | None = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
        tags: Mapping[str, str] | None = None,
        session: str | None = None,
        service_class: str | None = None,
    ) -> AsyncIterator[GenerateChunk]: ...
    async def generate(
        self,
        model: str = "",
        prompt: str = "",
        suffix: str | None = None,
        *,
        system: str | None = None,
        template: str | None = None,
        context: Sequence[int] | None = None,
        stream: bool = False,
        think: bool | str | None = None,
        raw: bool | None = None,
        format: Any = None,
        images: Sequence[ImageLike] | None = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
        tags: Mapping[str, str] | None = None,
        session: str | None = None,
        service_class: str | None = None,
    ) -> GenerateResponse | AsyncIterator[GenerateChunk]:
        """Complete ``prompt``; ``stream=True`` returns an async iterator of chunks.

        ``session`` is the routing key for ``strategy="affinity"`` (docs/routing.md; only its
        hash is recorded); ``service_class`` names the call's admission class.
        """
        op = generate_op(
            model,
            prompt,
            suffix=suffix,
            system=system,
            template=template,
            context=context,
            stream=stream,
            think=think,
            raw=raw,
            format=format,
            images=images,
            options=options,
            keep_alive=keep_alive,
            session=session,
            service_class=service_class,
        )
        if stream:
            chunks = CHUNKS["generate"]
            return self._iterate(self._streaming(op, chunks, project, timeout, tags))
        parsed, record = await self._run(self._calling(op, project, timeout, tags))
        return RESPONSES["generate"](record, parsed)  # type: ignore[no-any-return]

    async def embed(
        self,
        model: str = "",
        input: str | Sequence[str] = "",
        truncate: bool | None = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        dimensions: int | None = None,
        *,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
        tags: Mapping[str, str] | None = None,
    ) -> EmbedResponse:
        """Embed ``input`` (one string or a list) with ``model``."""
        op = embed_op(
            model,
            input,
            truncate=truncate,
            options=options,
            keep_alive=keep_alive,
            dimensions=dimensions,
        )
        parsed, record = await self._run(self._calling(op, project, timeout, tags))
        return RESPONSES["embed"](record, parsed)  # type: ignore[no-any-return]

    async def show(
        self,
        model: str,
        *,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
    ) -> ShowResponse:
        """What an endpoint serving ``model`` says about it."""
        fields, record = await self._run(self._calling(show_op(model), project, timeout, None))
        return self._show_response(model, record, fields)

    async def list(self, *, project: str | None = None) -> ListResponse:
        """Models served across the pool (one entry per endpoint and model)."""
        listed, _ = await self._run(self._listing("list", project))
        return ListResponse(models=self._logical_models(listed, running=False))

    async def ps(self, *, project: str | None = None) -> PsResponse:
        """Models loaded in memory across the pool."""
        listed, _ = await self._run(self._listing("ps", project))
        return PsResponse(models=self._logical_models(listed, running=True))

    # -- model management (Ollama endpoints) ---------------------------------------------
    async def pull(
        self,
        model: str,
        *,
        insecure: bool = False,
        stream: bool = False,
        endpoint: str | None = None,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
    ) -> ProgressResponse | AsyncIterator[ProgressResponse]:
        """Pull ``model`` onto every Ollama endpoint (or ``endpoint``); ``stream=True``
        returns the progress of each endpoint in turn."""
        body = {"model": model, "insecure": insecure, "stream": stream}
        return await self._admin("pull", model, body, endpoint, project, timeout, stream)

    async def push(
        self,
        model: str,
        *,
        insecure: bool = False,
        stream: bool = False,
        endpoint: str | None = None,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
    ) -> ProgressResponse | AsyncIterator[ProgressResponse]:
        """Push ``model`` from every Ollama endpoint (or ``endpoint``) to its registry."""
        body = {"model": model, "insecure": insecure, "stream": stream}
        return await self._admin("push", model, body, endpoint, project, timeout, stream)

    async def create(
        self,
        model: str,
        quantize: str | None = None,
        from_: str | None = None,
        files: Mapping[str, str] | None = None,
        adapters: Mapping[str, str] | None = None,
        template: str | None = None,
        license: str | Sequence[str] | None = None,
        system: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        messages: Sequence[MessageLike] | None = None,
        *,
        stream: bool = False,
        endpoint: str | None = None,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
    ) -> ProgressResponse | AsyncIterator[ProgressResponse]:
        """Create ``model`` (from a base model, files, a template...) on Ollama endpoints."""
        body = create_body(
            model,
            quantize,
            from_,
            files,
            adapters,
            template,
            license,
            system,
            parameters,
            messages,
            stream,
        )
        return await self._admin("create", model, body, endpoint, project, timeout, stream)

    async def delete(
        self, model: str, *, endpoint: str | None = None, project: str | None = None
    ) -> StatusResponse:
        """Delete ``model`` from every Ollama endpoint (or ``endpoint``)."""
        done = await self._run(
            self._managing(
                "delete",
                model,
                {"model": model},
                endpoint=endpoint,
                project=project,
                timeout=NOT_GIVEN,
                stream=False,
                method="DELETE",
            )
        )
        return StatusResponse(status="success", endpoints=done)

    async def copy(
        self,
        source: str,
        destination: str,
        *,
        endpoint: str | None = None,
        project: str | None = None,
    ) -> StatusResponse:
        """Copy ``source`` to ``destination`` on every Ollama endpoint (or ``endpoint``)."""
        body = {"source": source, "destination": destination}
        done = await self._run(
            self._managing(
                "copy",
                source,
                body,
                endpoint=endpoint,
                project=project,
                timeout=NOT_GIVEN,
                stream=False,
            )
        )
        return StatusResponse(status="success", endpoints=done)

    async def embeddings(
        self,
        model: str = "",
        prompt: str = "",
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        *,
        project: str | None = None,
    ) -> EmbeddingsResponse:
        """ollama's legacy single-vector embedding, on any endpoint that embeds."""
        r = await self.embed(model, prompt, options=options, keep_alive=keep_alive, project=project)
        return embeddings_response(r)

    async def _admin(
        self,
        operation: str,
        model: str,
        body: dict[str, Any],
        endpoint: str | None,
        project: str | None,
        timeout: float | NotGiven | None,
        stream: bool,
    ) -> ProgressResponse | AsyncIterator[ProgressResponse]:
        run = self._managing(
            operation,
            model,
            body,
            endpoint=endpoint,
            project=project,
            timeout=timeout,
            stream=stream,
        )
        if stream:
            return self._iterate(run)
        return ProgressResponse(status="success", endpoints=await self._run(run))


# ======================================================================================
# sync
# ======================================================================================
class SyncSharedClient(BaseClient[httpx.BaseTransport]):
    """Blocking client with the same API as ``SharedClient``; safe to share across threads.

    Use as ``with SyncSharedClient(endpoints=[...], project="team") as client:``.
    """

    _health_thread: threading.Thread | None = None
    _workers: ThreadPoolExecutor | None = None

    def _open_connections(self, transport: httpx.BaseTransport | None) -> None:
        self._http = self._connections(httpx.HTTPTransport, transport)
        #: Set when the client starts closing: waits (backoffs, the health loop) end at once.
        self._stop = threading.Event()
        self._workers_lock = threading.Lock()
        self._watchdog = Watchdog()
        self._recorded = threading.Condition()
        #: Calls waiting for a free slot sleep on this; a release wakes them.
        self._slot_freed = threading.Condition()
        self._slot_waiters = 0
        #: Calls asleep in admission's order (each on its own event): close sets them all.
        self._ticket_sleeps: set[threading.Event] = set()
        #: Guards the shards' free-connection counts (``Connection.take``/``give``).
        self._shards_lock = threading.Lock()
        watched = [watch_transport(t) for c in self._http.values() for t in c.transports]
        self._watched = any(watched)

    def _owner(self) -> object:
        return threading.get_ident()

    def _wake_slot_waiters(self) -> None:
        if self._slot_waiters:  # no lock on the hot path when nobody waits
            with self._slot_freed:
                self._slot_freed.notify_all()
        if not (admission := self._pool.admission).idle:
            admission.wake(time.monotonic())

    def _call_finished(self) -> None:
        if self._closing:
            with self._recorded:
                self._recorded.notify_all()

    def __enter__(self) -> SyncSharedClient:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Detect protocols, discover models and start health probes (idempotent)."""
        if (probes := self._starting()) is None:
            return
        self._run(probes)
        if self.config.health.enabled:
            self._health_thread = threading.Thread(
                target=self._health, name="shared_ollama-health", daemon=True
            )
            self._health_thread.start()

    def _health(self) -> None:
        with contextlib.suppress(ClientClosed):
            self._run(self._health_steps())

    def close(self) -> None:
        """Stop probes, end calls in flight, close connections, flush the ledger (idempotent).

        Sends and reads in flight in other threads are cut off (their sockets shut down) and
        raise ``ClientClosed``, as do waits; every call still open gets its record before the
        ledger closes.
        """
        if self._closed or self._closing:
            return
        self._closing = True
        self._stop.set()
        with self._slot_freed:
            for woken in self._ticket_sleeps:
                woken.set()
            self._slot_freed.notify_all()
        waiting = self._calls_of(self._watchdog.ring_all())
        with self._recorded:
            self._recorded.wait_for(
                lambda: not waiting.intersection(list(self._calls)), timeout=_CLOSE_WAIT_S
            )
        self._finish_abandoned()
        self._closed = True
        if self._health_thread is not None:
            self._health_thread.join()
        with self._workers_lock:
            workers = self._workers
        if workers is not None:
            workers.shutdown(wait=True)
        for connection in self._http.values():
            for transport in connection.transports:
                transport.close()
        self._watchdog.close()
        self.usage.close()

    # -- the interpreter ----------------------------------------------------------------
    def _run(self, gen: Steps[Any], value: Any = None, error: BaseException | None = None) -> Any:
        """``SharedClient._run``, blocking."""
        while True:
            done, op = _advance(gen, value, error)
            if done or type(op) is Deliver:
                return op
            try:
                value, error = self._perform(op), None
            except BaseException as exc:  # thrown into the steps: their cleanup runs
                value, error = None, exc

    def _content_flags(
        self, op: Op[Parsed], tags: Mapping[str, str] | None, *, text: bool = False
    ) -> Iterator[Any]:
        """``SharedClient._content_flags``, blocking (the Locust user's streams)."""
        make = _content_and_text if text else _has_content
        return self._iterate(self._streaming(op, make, None, NOT_GIVEN, tags))

    def _iterate(self, gen: Steps[None]) -> Iterator[Any]:
        """``SharedClient._iterate``, blocking."""
        out = self._run(gen)
        while out is not None:
            try:
                yield out.chunk
            except GeneratorExit:  # the caller stopped reading: the steps close the reply
                with contextlib.suppress(StreamAbandoned):
                    self._run(gen, error=StreamAbandoned())
                raise
            except BaseException as exc:
                out = self._run(gen, error=exc)
            else:
                out = self._run(gen)

    def _perform(self, op: IOOp) -> Any:
        if op is WALL:
            return time.time()
        if isinstance(op, Close):
            reply: _Reply = op.head.handle
            if (connection := reply.release()) is not None:
                with self._shards_lock:
                    connection.give(reply.shard)
            reply.response.close()
            return None
        if isinstance(op, Sleep):
            return self._sleep(op)
        if isinstance(op, Race):
            return self._race(op)
        if isinstance(op, Gather):
            return self._gather(op)
        if isinstance(op, Offload):
            return op.fn()
        assert isinstance(op, Send | Read)
        limit, total = _limit(op)
        if limit is not None and limit <= 0:
            raise _deadline_error(op, total)
        if self._closing:
            raise _closed_error(op)
        # httpx bounds each socket read, not the operation: the watchdog shuts the socket
        # down when the whole send or read outlasts its deadline (a server trickling bytes),
        # or at once when the client closes.
        alarm = self._watchdog.arm(limit) if self._watched else None
        try:
            value = self._perform_io(op, limit, total, alarm)
        except (SharedOllamaError, httpx.HTTPError, RuntimeError) as exc:
            if self._closing and not isinstance(exc, ClientClosed):
                raise _closed_error(op) from exc
            raise
        finally:
            if alarm is not None:
                self._watchdog.disarm(alarm)
        if self._closing:
            raise _closed_error(op)
        if alarm is not None and alarm.fired:  # a cut-short body may have looked complete
            raise _deadline_error(op, total)
        return value

    def _sleep(self, op: Sleep) -> None:
        """A backoff sleeps; a wait for a slot ends at the next release; close ends both."""
        if not op.slot:
            if self._stop.wait(op.seconds):
                raise _closed_error(op)
            return
        if (ticket := op.ticket) is not None:  # in admission's order: woken in its turn
            woken = threading.Event()
            admission = self._pool.admission
            with self._slot_freed:
                self._ticket_sleeps.add(woken)
            admission.sleeping(ticket, woken.set)
            try:
                if not self._closing:
                    woken.wait(op.seconds)
            finally:
                admission.awake(ticket)
                with self._slot_freed:
                    self._ticket_sleeps.discard(woken)
        else:
            with self._slot_freed:
                self._slot_waiters += 1
                try:
                    self._slot_freed.wait(op.seconds)
                finally:
                    self._slot_waiters -= 1
        if self._closing:
            raise _closed_error(op)

    def _pool_of_workers(self) -> ThreadPoolExecutor:
        with self._workers_lock:
            if self._closed:
                raise ClientClosed("the client was closed during the call")
            if self._workers is None:
                self._workers = ThreadPoolExecutor(64, thread_name_prefix="shared_ollama")
            return self._workers

    def _race(self, op: Race) -> Any:
        """A blocking request cannot be cancelled: the losing copy finishes in a worker
        thread and is discarded (its attempt is closed with the call)."""
        workers = self._pool_of_workers()
        first = workers.submit(self._run, op.first)
        done, pending = futures_wait({first}, timeout=op.after)
        if not done:
            pending.add(workers.submit(self._run, op.second()))
        error: BaseException | None = None
        while True:
            for fut in done:
                exc = fut.exception()
                if exc is None:
                    return fut.result()
                error = exc
            if not pending:
                break
            done, pending = futures_wait(pending, return_when=FIRST_COMPLETED)
        assert error is not None
        raise error

    def _gather(self, op: Gather) -> list[object]:
        """The parts in worker threads, all at once (the first one here)."""
        if not op.parts:
            return []
        first, *rest = op.parts
        others: list[Future[Any]] = []
        if rest:
            workers = self._pool_of_workers()
            others = [workers.submit(self._run, part) for part in rest]
        results: list[object] = []
        try:
            results.append(self._run(first))
        except BaseException as exc:
            results.append(exc)
        for fut in others:
            failure = fut.exception()
            results.append(fut.result() if failure is None else failure)
        return _gathered(results)

    def _perform_io(
        self, op: Send | Read, limit: float | None, total: bool, alarm: Alarm | None
    ) -> Any:
        try:
            if isinstance(op, Send):
                # httpx bounds each socket read; the deadline shortens the bound when closer.
                timeout = timeout_extension(self.config.timeouts.connect_s, limit)
                connection = self._http[op.endpoint.url]
                request = connection.request(op.wire, op.headers, timeout)
                with self._shards_lock:
                    shard = connection.take()
                send = connection.transports[shard].handle_request
                try:
                    try:
                        return _head(send(request), connection, shard)
                    except (httpx.RemoteProtocolError, httpx.WriteError) as exc:
                        if (alarm is not None and alarm.fired) or not _stale(exc):
                            raise
                        # See _STALE: once more, on a fresh connection.
                        return _head(send(request), connection, shard)
                except BaseException:
                    with self._shards_lock:
                        connection.give(shard)
                    raise
            reply: _Reply = op.head.handle
            if op.whole:
                body = _Body(op)
                for chunk in _content(op):
                    if body.add(chunk):
                        break
                return bytes(body.data)
            if reply.iterator is None:
                reply.iterator = iter(reply.response.stream)  # type: ignore[arg-type]
            return next(reply.iterator, None)
        except httpx.TimeoutException as exc:
            if total and not isinstance(exc, httpx.ConnectTimeout):
                raise _deadline_error(op, True) from None
            raise _transport_error(op, exc) from None
        except httpx.HTTPError as exc:
            if alarm is not None and alarm.fired:
                raise _deadline_error(op, total) from None
            raise _transport_error(op, exc) from None

    # -- public API -------------------------------------------------------------------
    @overload
    def chat(
        self,
        model: str = "",
        messages: Sequence[MessageLike] | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        stream: Literal[False] = False,
        think: bool | str | None = None,
        format: Any = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
        tags: Mapping[str, str] | None = None,
        session: str | None = None,
        service_class: str | None = None,
    ) -> ChatResponse: ...
    @overload
    def chat(
        self,
        model: str = "",
        messages: Sequence[MessageLike] | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        stream: Literal[True],
        think: bool | str | None = None,
        format: Any = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
        tags: Mapping[str, str] | None = None,
        session: str | None = None,
        service_class: str | None = None,
    ) -> Iterator[ChatChunk]: ...
    def chat(
        self,
        model: str = "",
        messages: Sequence[MessageLike] | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        stream: bool = False,
        think: bool | str | None = None,
        format: Any = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
        tags: Mapping[str, str] | None = None,
        session: str | None = None,
        service_class: str | None = None,
    ) -> ChatResponse | Iterator[ChatChunk]:
        """Chat with ``model``; ``stream=True`` returns an iterator of chunks.

        ``session`` is the routing key for ``strategy="affinity"`` (docs/routing.md; only its
        hash is recorded); ``service_class`` names the call's admission class.
        """
        op = chat_op(
            model,
            messages,
            tools=tools,
            stream=stream,
            think=think,
            format=format,
            options=options,
            keep_alive=keep_alive,
            session=session,
            service_class=service_class,
        )
        if stream:
            return self._iterate(self._streaming(op, CHUNKS["chat"], project, timeout, tags))
        parsed, record = self._run(self._calling(op, project, timeout, tags))
        return RESPONSES["chat"](record, parsed)  # type: ignore[no-any-return]

    @overload
    def generate(
        self,
        model: str = "",
        prompt: str = "",
        suffix: str | None = None,
        *,
        system: str | None = None,
        template: str | None = None,
        context: Sequence[int] | None = None,
        stream: Literal[False] = False,
        think: bool | str | None = None,
        raw: bool | None = None,
        format: Any = None,
        images: Sequence[ImageLike] | None = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
        tags: Mapping[str, str] | None = None,
        session: str | None = None,
        service_class: str | None = None,
    ) -> GenerateResponse: ...
    @overload
    def generate(
        self,
        model: str = "",
        prompt: str = "",
        suffix: str | None = None,
        *,
        system: str | None = None,
        template: str | None = None,
        context: Sequence[int] | None = None,
        stream: Literal[True],
        think: bool | str | None = None,
        raw: bool | None = None,
        format: Any = None,
        images: Sequence[ImageLike] | None = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
        tags: Mapping[str, str] | None = None,
        session: str | None = None,
        service_class: str | None = None,
    ) -> Iterator[GenerateChunk]: ...
    def generate(
        self,
        model: str = "",
        prompt: str = "",
        suffix: str | None = None,
        *,
        system: str | None = None,
        template: str | None = None,
        context: Sequence[int] | None = None,
        stream: bool = False,
        think: bool | str | None = None,
        raw: bool | None = None,
        format: Any = None,
        images: Sequence[ImageLike] | None = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
        tags: Mapping[str, str] | None = None,
        session: str | None = None,
        service_class: str | None = None,
    ) -> GenerateResponse | Iterator[GenerateChunk]:
        """Complete ``prompt``; ``stream=True`` returns an iterator of chunks.

        ``session`` is the routing key for ``strategy="affinity"`` (docs/routing.md; only its
        hash is recorded); ``service_class`` names the call's admission class.
        """
        op = generate_op(
            model,
            prompt,
            suffix=suffix,
            system=system,
            template=template,
            context=context,
            stream=stream,
            think=think,
            raw=raw,
            format=format,
            images=images,
            options=options,
            keep_alive=keep_alive,
            session=session,
            service_class=service_class,
        )
        if stream:
            chunks = CHUNKS["generate"]
            return self._iterate(self._streaming(op, chunks, project, timeout, tags))
        parsed, record = self._run(self._calling(op, project, timeout, tags))
        return RESPONSES["generate"](record, parsed)  # type: ignore[no-any-return]

    def embed(
        self,
        model: str = "",
        input: str | Sequence[str] = "",
        truncate: bool | None = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        dimensions: int | None = None,
        *,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
        tags: Mapping[str, str] | None = None,
    ) -> EmbedResponse:
        """Embed ``input`` (one string or a list) with ``model``."""
        op = embed_op(
            model,
            input,
            truncate=truncate,
            options=options,
            keep_alive=keep_alive,
            dimensions=dimensions,
        )
        parsed, record = self._run(self._calling(op, project, timeout, tags))
        return RESPONSES["embed"](record, parsed)  # type: ignore[no-any-return]

    def show(
        self,
        model: str,
        *,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
    ) -> ShowResponse:
        """What an endpoint serving ``model`` says about it."""
        fields, record = self._run(self._calling(show_op(model), project, timeout, None))
        return self._show_response(model, record, fields)

    def list(self, *, project: str | None = None) -> ListResponse:
        """Models served across the pool (one entry per endpoint and model)."""
        listed, _ = self._run(self._listing("list", project))
        return ListResponse(models=self._logical_models(listed, running=False))

    def ps(self, *, project: str | None = None) -> PsResponse:
        """Models loaded in memory across the pool."""
        listed, _ = self._run(self._listing("ps", project))
        return PsResponse(models=self._logical_models(listed, running=True))

    # -- model management (Ollama endpoints) ---------------------------------------------
    def pull(
        self,
        model: str,
        *,
        insecure: bool = False,
        stream: bool = False,
        endpoint: str | None = None,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
    ) -> ProgressResponse | Iterator[ProgressResponse]:
        """Pull ``model`` onto every Ollama endpoint (or ``endpoint``); ``stream=True``
        returns the progress of each endpoint in turn."""
        body = {"model": model, "insecure": insecure, "stream": stream}
        return self._admin("pull", model, body, endpoint, project, timeout, stream)

    def push(
        self,
        model: str,
        *,
        insecure: bool = False,
        stream: bool = False,
        endpoint: str | None = None,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
    ) -> ProgressResponse | Iterator[ProgressResponse]:
        """Push ``model`` from every Ollama endpoint (or ``endpoint``) to its registry."""
        body = {"model": model, "insecure": insecure, "stream": stream}
        return self._admin("push", model, body, endpoint, project, timeout, stream)

    def create(
        self,
        model: str,
        quantize: str | None = None,
        from_: str | None = None,
        files: Mapping[str, str] | None = None,
        adapters: Mapping[str, str] | None = None,
        template: str | None = None,
        license: str | Sequence[str] | None = None,
        system: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        messages: Sequence[MessageLike] | None = None,
        *,
        stream: bool = False,
        endpoint: str | None = None,
        project: str | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
    ) -> ProgressResponse | Iterator[ProgressResponse]:
        """Create ``model`` (from a base model, files, a template...) on Ollama endpoints."""
        body = create_body(
            model,
            quantize,
            from_,
            files,
            adapters,
            template,
            license,
            system,
            parameters,
            messages,
            stream,
        )
        return self._admin("create", model, body, endpoint, project, timeout, stream)

    def delete(
        self, model: str, *, endpoint: str | None = None, project: str | None = None
    ) -> StatusResponse:
        """Delete ``model`` from every Ollama endpoint (or ``endpoint``)."""
        done = self._run(
            self._managing(
                "delete",
                model,
                {"model": model},
                endpoint=endpoint,
                project=project,
                timeout=NOT_GIVEN,
                stream=False,
                method="DELETE",
            )
        )
        return StatusResponse(status="success", endpoints=done)

    def copy(
        self,
        source: str,
        destination: str,
        *,
        endpoint: str | None = None,
        project: str | None = None,
    ) -> StatusResponse:
        """Copy ``source`` to ``destination`` on every Ollama endpoint (or ``endpoint``)."""
        body = {"source": source, "destination": destination}
        done = self._run(
            self._managing(
                "copy",
                source,
                body,
                endpoint=endpoint,
                project=project,
                timeout=NOT_GIVEN,
                stream=False,
            )
        )
        return StatusResponse(status="success", endpoints=done)

    def embeddings(
        self,
        model: str = "",
        prompt: str = "",
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        *,
        project: str | None = None,
    ) -> EmbeddingsResponse:
        """ollama's legacy single-vector embedding, on any endpoint that embeds."""
        r = self.embed(model, prompt, options=options, keep_alive=keep_alive, project=project)
        return embeddings_response(r)

    def _admin(
        self,
        operation: str,
        model: str,
        body: dict[str, Any],
        endpoint: str | None,
        project: str | None,
        timeout: float | NotGiven | None,
        stream: bool,
    ) -> ProgressResponse | Iterator[ProgressResponse]:
        run = self._managing(
            operation,
            model,
            body,
            endpoint=endpoint,
            project=project,
            timeout=timeout,
            stream=stream,
        )
        if stream:
            return self._iterate(run)
        return ProgressResponse(status="success", endpoints=self._run(run))
