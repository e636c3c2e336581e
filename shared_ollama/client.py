"""``SharedClient`` (async) and ``SyncSharedClient``: thin drivers over the shared core.

They only send, read, sleep and close: every decision (routing, classification, retry,
breaker bookkeeping, parsing, accounting) is a step generator in ``_core.steps`` that both
drivers run. Only this module knows whether the caller is sync or async.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from functools import partial
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import httpx
from tenacity import AsyncRetrying, Retrying

from ._base import NOT_GIVEN, BaseClient, NotGiven
from ._core import steps
from ._core.plan import CallPlan
from ._core.requests import Op, chat_op, embed_op, generate_op, show_op
from ._core.results import CHUNKS, RESPONSES
from ._core.steps import NOW, WALL, Close, Head, IOOp, Opened, Read, Send, Steps
from ._transport import client_kwargs, map_transport_error, to_httpx
from ._watchdog import Alarm, Watchdog, watch_transport
from .errors import ClientClosed, NoEndpointAvailable, ProtocolError, SharedOllamaError, Timeout
from .pool import EndpointState, next_probe_delay
from .protocols import ListedModel, Parsed, Piece
from .types import (
    ChatChunk,
    ChatResponse,
    EmbedResponse,
    GenerateChunk,
    GenerateResponse,
    ListResponse,
    MessageLike,
    PsResponse,
    ShowResponse,
)

__all__ = ["SharedClient", "SyncSharedClient"]

T = TypeVar("T")
C = TypeVar("C", ChatChunk, GenerateChunk)
Make = Callable[[Any, Piece], C]


# _STALE: "Server disconnected without sending a response" on a pooled keep-alive connection
# the server had already closed (llama-server closes after every stream while advertising
# keep-alive). The server never saw the request, so sending it again at once is safe and
# must not cost a retry, a breaker failure or budget. Any other protocol error (a garbled
# status line, a broken head) is an answer of sorts: it goes through the retry policy and
# counts as an attempt.
def _stale(exc: httpx.RemoteProtocolError) -> bool:
    return "without sending a response" in str(exc)


class _Reply:
    """The driver's side of a ``Head``: the httpx response and its raw byte iterator."""

    __slots__ = ("iterator", "response")

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.iterator: Any = None


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


def _closed_error(op: Send | Read) -> ClientClosed:
    return ClientClosed(
        "the client was closed during the call", endpoint=op.endpoint.url, model=op.model
    )


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


def _head(resp: httpx.Response) -> Head:
    headers = {k.lower(): v for k, v in resp.headers.items()}
    return Head(resp.status_code, headers, _Reply(resp), time.monotonic_ns())


def _merge(endpoints: Sequence[EndpointState], results: Sequence[Any],
           operation: str) -> list[tuple[str, ListedModel]]:  # fmt: skip
    """Concatenate per-endpoint listings; fail only when every endpoint failed."""
    out: list[tuple[str, ListedModel]] = []
    reasons: dict[str, str] = {}
    for ep, res in zip(endpoints, results, strict=True):
        if isinstance(res, SharedOllamaError):
            reasons[ep.name] = res.message
        elif isinstance(res, BaseException):
            raise res
        else:
            out.extend(res)
    if reasons and len(reasons) == len(endpoints):
        raise NoEndpointAvailable(f"no endpoint answered {operation}", reasons=reasons)
    return out


def _drain(plan: CallPlan, opened: Opened, make: Make[C]) -> list[C]:
    """Turn pending pieces into chunks; once handed out, the call is never retried."""
    chunks = []
    for piece in opened.pending:
        chunks.append(make(plan.record, piece))
        plan.delivered_chunk(piece.text)
    opened.pending = []
    opened.handed_out = bool(chunks)
    return chunks


# ======================================================================================
# async
# ======================================================================================
class SharedClient(BaseClient[httpx.AsyncBaseTransport]):
    """Async client over a pool of Ollama / OpenAI-compatible / TGI endpoints.

    Use as ``async with SharedClient(endpoints=[...], project="team") as client:``.
    """

    _health_task: asyncio.Task[None] | None = None

    def _open_connections(self, transport: httpx.AsyncBaseTransport | None) -> None:
        self._http = {
            ep.url: httpx.AsyncClient(
                transport=transport, **client_kwargs(ep.config, self.config.timeouts)
            )
            for ep in self._pool.endpoints
        }
        #: Resolved when an endpoint gives a slot back: calls waiting for one re-route at once.
        self._slot_freed: asyncio.Future[None] | None = None
        for ep in self._pool.endpoints:
            ep.on_release = self._wake_slot_waiters
        #: Tasks inside a send or read now (a count: hedges nest), and those close cancelled.
        self._performing: dict[asyncio.Task[Any], int] = {}
        self._close_cancelled: set[asyncio.Task[Any]] = set()
        self._recorded: asyncio.Event | None = None

    def _owner(self) -> object:
        return asyncio.current_task()

    def _wake_slot_waiters(self) -> None:
        freed, self._slot_freed = self._slot_freed, None
        if freed is not None and not freed.done():
            freed.set_result(None)

    async def _sleep(self, plan: CallPlan, seconds: float) -> None:
        """tenacity's sleep: a backoff sleeps; a wait for a slot ends at the next release."""
        if not plan.slot_wait:
            await asyncio.sleep(seconds)
            return
        if self._slot_freed is None:
            self._slot_freed = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await asyncio.shield(self._slot_freed)

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
        if self._started:
            return
        self._started = True
        await self._probe_all(refresh_models=True)
        if self.config.health.enabled:
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def aclose(self) -> None:
        """Stop probes, end calls in flight, close connections, flush the ledger (idempotent).

        Calls inside a send or read are cancelled and raise ``ClientClosed``; every call still
        open gets its record (``ClientClosed``) before the ledger is flushed and closed.
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
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await asyncio.gather(*(c.aclose() for c in self._http.values()))
        # The ledger writer is a thread; flushing may wait on the disk: not on the loop.
        await self.usage.aclose()

    # -- the driver: perform what the steps ask for ------------------------------------
    async def _run(self, gen: Steps[T]) -> T:
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = gen.throw(error) if error is not None else gen.send(value)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            value, error = None, None
            if op is NOW:  # the clock inline: no coroutine per reading (several per chunk)
                value = time.monotonic(), time.monotonic_ns()
                continue
            try:
                value = await self._perform(op)
            except BaseException as exc:  # thrown into the steps: their cleanup runs
                error = exc

    async def _perform(self, op: IOOp) -> Any:
        if op is NOW:
            return time.monotonic(), time.monotonic_ns()
        if op is WALL:
            return time.time()
        if isinstance(op, Close):
            await op.head.handle.response.aclose()
            return None
        assert isinstance(op, Send | Read)
        if self._closing:
            raise _closed_error(op)
        task = asyncio.current_task()
        assert task is not None
        performing = self._performing
        performing[task] = performing.get(task, 0) + 1
        try:
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

    async def _perform_io(self, op: Send | Read) -> Any:
        limit, total = _limit(op)
        try:
            async with asyncio.timeout(limit):
                if isinstance(op, Send):
                    http = self._http[op.endpoint.url]
                    request = to_httpx(http, op.wire, op.headers)
                    try:
                        return _head(await http.send(request, stream=True))
                    except httpx.RemoteProtocolError as exc:
                        if not _stale(exc):
                            raise
                        # See _STALE: once more, on a fresh connection.
                        return _head(await http.send(request, stream=True))
                reply: _Reply = op.head.handle
                if op.whole:
                    body = _Body(op)
                    async for chunk in reply.response.aiter_bytes():
                        if body.add(chunk):
                            break
                    return bytes(body.data)
                if reply.iterator is None:
                    reply.iterator = reply.response.aiter_raw()
                return await anext(reply.iterator, None)
        except TimeoutError:
            raise _deadline_error(op, total) from None
        except httpx.HTTPError as exc:
            raise _transport_error(op, exc) from None

    # -- health -----------------------------------------------------------------------
    async def _health_loop(self) -> None:
        policy = self.config.health
        last_models = time.monotonic()
        while True:
            await asyncio.sleep(next_probe_delay(policy, self._pool.rng))
            refresh = time.monotonic() - last_models >= policy.models_refresh_s
            if refresh:
                last_models = time.monotonic()
            await self._probe_all(refresh_models=refresh)

    async def _probe_all(self, *, refresh_models: bool) -> None:
        timeout, health = self.config.health.timeout_s, self.config.health.enabled
        await asyncio.gather(*(
            self._run(steps.probe(ep, self.project, timeout, refresh_models, health))
            for ep in self._pool.endpoints
        ))  # fmt: skip

    # -- the two call shapes ----------------------------------------------------------
    async def _call(self, op: Op[T], *, project: str | None, timeout: float | NotGiven | None,
                    tags: Mapping[str, str] | None) -> tuple[T, CallPlan]:  # fmt: skip
        plan, span = self._plan(op.operation, op.model, stream=False, project=project,
                                timeout=timeout, tags=tags, content=op.content)  # fmt: skip
        error: BaseException | None = None
        try:
            async for attempt in AsyncRetrying(
                sleep=partial(self._sleep, plan), **plan.tenacity_kwargs()
            ):
                with attempt:
                    result = await self._attempt(plan, op, span.headers())
            return result, plan
        except BaseException as exc:
            error = self._annotate(plan, exc)
            raise
        finally:
            self._finish(plan, span, error)

    async def _attempt(self, plan: CallPlan, op: Op[T], trace: Mapping[str, str]) -> T:
        """One attempt, or a hedged pair: a second copy after the p95, first answer wins."""
        delay = plan.hedge_after(self.config.hedging)
        if delay is None:
            return await self._run(steps.attempt(plan, op, trace))
        first: asyncio.Future[T] = asyncio.ensure_future(self._run(steps.attempt(plan, op, trace)))
        done: set[asyncio.Future[T]]
        done, _ = await asyncio.wait({first}, timeout=delay)
        pending: set[asyncio.Future[T]] = {first}
        if not done:
            pending.add(asyncio.ensure_future(self._run(steps.attempt(plan, op, trace))))
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

    async def _stream(self, op: Op[Parsed], make: Make[C], *, project: str | None,
                      timeout: float | NotGiven | None,
                      tags: Mapping[str, str] | None) -> AsyncIterator[C]:  # fmt: skip
        plan, span = self._plan(op.operation, op.model, stream=True, project=project,
                                timeout=timeout, tags=tags, content=op.content)  # fmt: skip
        error: BaseException | None = None
        opened: Opened | None = None
        try:
            async for attempt in AsyncRetrying(
                sleep=partial(self._sleep, plan), **plan.tenacity_kwargs()
            ):
                with attempt:
                    opened = await self._run(steps.open_stream(plan, op, span.headers()))
            assert opened is not None
            while True:
                for chunk in _drain(plan, opened, make):
                    yield chunk
                if opened.eof:
                    break
                try:
                    await self._run(steps.read_more(plan, opened))
                except SharedOllamaError as exc:
                    raise steps.interrupted(plan, opened, exc) from exc
        except BaseException as exc:
            error = self._annotate(plan, exc)
            raise
        finally:
            if opened is not None:
                await self._perform(Close(opened.head))
            self._finish(plan, span, error)

    async def _fan_out(self, operation: str,
                       project: str | None) -> list[tuple[str, ListedModel]]:  # fmt: skip
        plan, span = self._plan(operation, None, stream=False, project=project,
                                timeout=NOT_GIVEN, tags=None)  # fmt: skip
        timeout = self.config.health.timeout_s
        error: BaseException | None = None
        try:
            results = await asyncio.gather(*(
                self._run(steps.list_one(ep, operation, plan.record.project, timeout))
                for ep in self._pool.endpoints
            ), return_exceptions=True)  # fmt: skip
            return _merge(self._pool.endpoints, results, operation)
        except BaseException as exc:
            error = self._annotate(plan, exc)
            raise
        finally:
            self._finish(plan, span, error)

    # -- public API -------------------------------------------------------------------
    @overload
    async def chat(self, model: str = "", messages: Sequence[MessageLike] | None = None, *,
                   tools: Sequence[Mapping[str, Any]] | None = None,
                   stream: Literal[False] = False, think: bool | str | None = None,
                   format: Any = None, options: Mapping[str, Any] | None = None,
                   keep_alive: float | str | None = None, project: str | None = None,
                   timeout: float | NotGiven | None = NOT_GIVEN,
                   tags: Mapping[str, str] | None = None) -> ChatResponse: ...  # fmt: skip
    @overload
    async def chat(self, model: str = "", messages: Sequence[MessageLike] | None = None, *,
                   tools: Sequence[Mapping[str, Any]] | None = None,
                   stream: Literal[True], think: bool | str | None = None,
                   format: Any = None, options: Mapping[str, Any] | None = None,
                   keep_alive: float | str | None = None, project: str | None = None,
                   timeout: float | NotGiven | None = NOT_GIVEN,
                   tags: Mapping[str, str] | None = None,
                   ) -> AsyncIterator[ChatChunk]: ...  # fmt: skip
    async def chat(self, model: str = "", messages: Sequence[MessageLike] | None = None, *,
                   tools: Sequence[Mapping[str, Any]] | None = None,
                   stream: bool = False, think: bool | str | None = None,
                   format: Any = None, options: Mapping[str, Any] | None = None,
                   keep_alive: float | str | None = None, project: str | None = None,
                   timeout: float | NotGiven | None = NOT_GIVEN,
                   tags: Mapping[str, str] | None = None,
                   ) -> ChatResponse | AsyncIterator[ChatChunk]:  # fmt: skip
        """Chat with ``model``; ``stream=True`` returns an async iterator of chunks."""
        op = chat_op(model, messages, tools=tools, stream=stream, think=think, format=format,
                     options=options, keep_alive=keep_alive)  # fmt: skip
        if stream:
            return self._stream(op, CHUNKS["chat"], project=project, timeout=timeout, tags=tags)
        parsed, plan = await self._call(op, project=project, timeout=timeout, tags=tags)
        return RESPONSES["chat"](plan.record, parsed)  # type: ignore[no-any-return]

    @overload
    async def generate(self, model: str = "", prompt: str = "", suffix: str | None = None, *,
                       system: str | None = None, template: str | None = None,
                       context: Sequence[int] | None = None, stream: Literal[False] = False,
                       think: bool | str | None = None, raw: bool | None = None,
                       format: Any = None, images: Sequence[str] | None = None,
                       options: Mapping[str, Any] | None = None,
                       keep_alive: float | str | None = None, project: str | None = None,
                       timeout: float | NotGiven | None = NOT_GIVEN,
                       tags: Mapping[str, str] | None = None) -> GenerateResponse: ...  # fmt: skip
    @overload
    async def generate(self, model: str = "", prompt: str = "", suffix: str | None = None, *,
                       system: str | None = None, template: str | None = None,
                       context: Sequence[int] | None = None, stream: Literal[True],
                       think: bool | str | None = None, raw: bool | None = None,
                       format: Any = None, images: Sequence[str] | None = None,
                       options: Mapping[str, Any] | None = None,
                       keep_alive: float | str | None = None, project: str | None = None,
                       timeout: float | NotGiven | None = NOT_GIVEN,
                       tags: Mapping[str, str] | None = None,
                       ) -> AsyncIterator[GenerateChunk]: ...  # fmt: skip
    async def generate(self, model: str = "", prompt: str = "", suffix: str | None = None, *,
                       system: str | None = None, template: str | None = None,
                       context: Sequence[int] | None = None, stream: bool = False,
                       think: bool | str | None = None, raw: bool | None = None,
                       format: Any = None, images: Sequence[str] | None = None,
                       options: Mapping[str, Any] | None = None,
                       keep_alive: float | str | None = None, project: str | None = None,
                       timeout: float | NotGiven | None = NOT_GIVEN,
                       tags: Mapping[str, str] | None = None,
                       ) -> GenerateResponse | AsyncIterator[GenerateChunk]:  # fmt: skip
        """Complete ``prompt``; ``stream=True`` returns an async iterator of chunks."""
        op = generate_op(model, prompt, suffix=suffix, system=system, template=template,
                         context=context, stream=stream, think=think, raw=raw, format=format,
                         images=images, options=options, keep_alive=keep_alive)  # fmt: skip
        if stream:
            return self._stream(op, CHUNKS["generate"], project=project, timeout=timeout,
                                tags=tags)  # fmt: skip
        parsed, plan = await self._call(op, project=project, timeout=timeout, tags=tags)
        return RESPONSES["generate"](plan.record, parsed)  # type: ignore[no-any-return]

    async def embed(self, model: str = "", input: str | Sequence[str] = "",
                    truncate: bool | None = None, options: Mapping[str, Any] | None = None,
                    keep_alive: float | str | None = None, dimensions: int | None = None, *,
                    project: str | None = None, timeout: float | NotGiven | None = NOT_GIVEN,
                    tags: Mapping[str, str] | None = None) -> EmbedResponse:  # fmt: skip
        """Embed ``input`` (one string or a list) with ``model``."""
        op = embed_op(model, input, truncate=truncate, options=options, keep_alive=keep_alive,
                      dimensions=dimensions)  # fmt: skip
        parsed, plan = await self._call(op, project=project, timeout=timeout, tags=tags)
        return RESPONSES["embed"](plan.record, parsed)  # type: ignore[no-any-return]

    async def show(self, model: str, *, project: str | None = None,
                   timeout: float | NotGiven | None = NOT_GIVEN) -> ShowResponse:  # fmt: skip
        """What an endpoint serving ``model`` says about it."""
        fields, plan = await self._call(show_op(model), project=project, timeout=timeout,
                                        tags=None)  # fmt: skip
        rec = plan.record
        return ShowResponse(model=model, served_model=rec.served_model or "",
                            endpoint=rec.endpoint or "", **fields)  # fmt: skip

    async def list(self, *, project: str | None = None) -> ListResponse:
        """Models served across the pool (one entry per endpoint and model)."""
        listed = await self._fan_out("list", project)
        return ListResponse(models=self._logical_models(listed, running=False))

    async def ps(self, *, project: str | None = None) -> PsResponse:
        """Models loaded in memory across the pool."""
        listed = await self._fan_out("ps", project)
        return PsResponse(models=self._logical_models(listed, running=True))


# ======================================================================================
# sync
# ======================================================================================
class SyncSharedClient(BaseClient[httpx.BaseTransport]):
    """Blocking client with the same API as ``SharedClient``; safe to share across threads.

    Use as ``with SyncSharedClient(endpoints=[...], project="team") as client:``.
    """

    _health_thread: threading.Thread | None = None
    _hedge_pool: ThreadPoolExecutor | None = None

    def _open_connections(self, transport: httpx.BaseTransport | None) -> None:
        self._http = {
            ep.url: httpx.Client(
                transport=transport, **client_kwargs(ep.config, self.config.timeouts)
            )
            for ep in self._pool.endpoints
        }
        self._stop = threading.Event()
        self._hedge_lock = threading.Lock()
        self._watchdog = Watchdog()
        self._recorded = threading.Condition()
        #: Calls waiting for a free slot sleep on this; a release wakes them.
        self._slot_freed = threading.Condition()
        self._slot_waiters = 0
        for ep in self._pool.endpoints:
            ep.on_release = self._wake_slot_waiters
        watched = [watch_transport(http) for http in self._http.values()]
        self._watched = any(watched)

    def _owner(self) -> object:
        return threading.get_ident()

    def _wake_slot_waiters(self) -> None:
        if self._slot_waiters:  # no lock on the hot path when nobody waits
            with self._slot_freed:
                self._slot_freed.notify_all()

    def _sleep(self, plan: CallPlan, seconds: float) -> None:
        """tenacity's sleep: a backoff sleeps; a wait for a slot ends at the next release."""
        if not plan.slot_wait:
            time.sleep(seconds)
            return
        with self._slot_freed:
            self._slot_waiters += 1
            try:
                self._slot_freed.wait(seconds)
            finally:
                self._slot_waiters -= 1

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
        if self._started:
            return
        self._started = True
        self._probe_all(refresh_models=True)
        if self.config.health.enabled:
            self._health_thread = threading.Thread(
                target=self._health_loop, name="shared_ollama-health", daemon=True
            )
            self._health_thread.start()

    def close(self) -> None:
        """Stop probes, end calls in flight, close connections, flush the ledger (idempotent).

        Sends and reads in flight in other threads are cut off (their sockets shut down) and
        raise ``ClientClosed``; every call still open gets its record before the ledger closes.
        """
        if self._closed or self._closing:
            return
        self._closing = True
        waiting = self._calls_of(self._watchdog.ring_all())
        with self._recorded:
            self._recorded.wait_for(
                lambda: not waiting.intersection(list(self._calls)), timeout=_CLOSE_WAIT_S
            )
        self._finish_abandoned()
        self._closed = True
        self._stop.set()
        if self._health_thread is not None:
            self._health_thread.join()
        if self._hedge_pool is not None:
            self._hedge_pool.shutdown(wait=True)
        for http in self._http.values():
            http.close()
        self._watchdog.close()
        self.usage.close()

    # -- the driver: perform what the steps ask for ------------------------------------
    def _run(self, gen: Steps[T]) -> T:
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = gen.throw(error) if error is not None else gen.send(value)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            value, error = None, None
            try:
                value = self._perform(op)
            except BaseException as exc:  # thrown into the steps: their cleanup runs
                error = exc

    def _perform(self, op: IOOp) -> Any:
        if op is NOW:
            return time.monotonic(), time.monotonic_ns()
        if op is WALL:
            return time.time()
        if isinstance(op, Close):
            op.head.handle.response.close()
            return None
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

    def _perform_io(self, op: Send | Read, limit: float | None, total: bool,
                    alarm: Alarm | None) -> Any:  # fmt: skip
        try:
            if isinstance(op, Send):
                # httpx bounds each socket read; the deadline shortens the bound when closer.
                connect = self.config.timeouts.connect_s
                if limit is not None and connect is not None:
                    connect = min(connect, limit)
                timeout = httpx.Timeout(connect=connect, read=limit, write=connect, pool=limit)
                http = self._http[op.endpoint.url]
                request = to_httpx(http, op.wire, op.headers, timeout)
                try:
                    return _head(http.send(request, stream=True))
                except httpx.RemoteProtocolError as exc:
                    if (alarm is not None and alarm.fired) or not _stale(exc):
                        raise
                    # See _STALE: once more, on a fresh connection.
                    return _head(http.send(request, stream=True))
            reply: _Reply = op.head.handle
            if op.whole:
                body = _Body(op)
                for chunk in reply.response.iter_bytes():
                    if body.add(chunk):
                        break
                return bytes(body.data)
            if reply.iterator is None:
                reply.iterator = reply.response.iter_raw()
            return next(reply.iterator, None)
        except httpx.TimeoutException as exc:
            if total and not isinstance(exc, httpx.ConnectTimeout):
                raise _deadline_error(op, True) from None
            raise _transport_error(op, exc) from None
        except httpx.HTTPError as exc:
            if alarm is not None and alarm.fired:
                raise _deadline_error(op, total) from None
            raise _transport_error(op, exc) from None

    # -- health -----------------------------------------------------------------------
    def _health_loop(self) -> None:
        policy = self.config.health
        last_models = time.monotonic()
        while not self._stop.wait(next_probe_delay(policy, self._pool.rng)):
            refresh = time.monotonic() - last_models >= policy.models_refresh_s
            if refresh:
                last_models = time.monotonic()
            self._probe_all(refresh_models=refresh)

    def _probe_all(self, *, refresh_models: bool) -> None:
        timeout, health = self.config.health.timeout_s, self.config.health.enabled
        for ep in self._pool.endpoints:
            self._run(steps.probe(ep, self.project, timeout, refresh_models, health))

    # -- the two call shapes ----------------------------------------------------------
    def _call(self, op: Op[T], *, project: str | None, timeout: float | NotGiven | None,
              tags: Mapping[str, str] | None) -> tuple[T, CallPlan]:  # fmt: skip
        plan, span = self._plan(op.operation, op.model, stream=False, project=project,
                                timeout=timeout, tags=tags, content=op.content)  # fmt: skip
        error: BaseException | None = None
        try:
            for attempt in Retrying(sleep=partial(self._sleep, plan), **plan.tenacity_kwargs()):
                with attempt:
                    result = self._attempt(plan, op, span.headers())
            return result, plan
        except BaseException as exc:
            error = self._annotate(plan, exc)
            raise
        finally:
            self._finish(plan, span, error)

    def _attempt(self, plan: CallPlan, op: Op[T], trace: Mapping[str, str]) -> T:
        """One attempt, or a hedged pair: a second copy after the p95, first answer wins.

        A blocking request cannot be cancelled: the losing copy finishes in a worker thread
        and is discarded (its attempt is closed with the call).
        """
        delay = plan.hedge_after(self.config.hedging)
        if delay is None:
            return self._run(steps.attempt(plan, op, trace))
        with self._hedge_lock:
            if self._hedge_pool is None:
                self._hedge_pool = ThreadPoolExecutor(thread_name_prefix="shared_ollama-hedge")
            pool = self._hedge_pool
        first = pool.submit(self._run, steps.attempt(plan, op, trace))
        done, pending = futures_wait({first}, timeout=delay)
        if not done:
            pending.add(pool.submit(self._run, steps.attempt(plan, op, trace)))
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

    def _stream(self, op: Op[Parsed], make: Make[C], *, project: str | None,
                timeout: float | NotGiven | None,
                tags: Mapping[str, str] | None) -> Iterator[C]:  # fmt: skip
        plan, span = self._plan(op.operation, op.model, stream=True, project=project,
                                timeout=timeout, tags=tags, content=op.content)  # fmt: skip
        error: BaseException | None = None
        opened: Opened | None = None
        try:
            for attempt in Retrying(sleep=partial(self._sleep, plan), **plan.tenacity_kwargs()):
                with attempt:
                    opened = self._run(steps.open_stream(plan, op, span.headers()))
            assert opened is not None
            while True:
                yield from _drain(plan, opened, make)
                if opened.eof:
                    break
                try:
                    self._run(steps.read_more(plan, opened))
                except SharedOllamaError as exc:
                    raise steps.interrupted(plan, opened, exc) from exc
        except BaseException as exc:
            error = self._annotate(plan, exc)
            raise
        finally:
            if opened is not None:
                self._perform(Close(opened.head))
            self._finish(plan, span, error)

    def _fan_out(self, operation: str, project: str | None) -> list[tuple[str, ListedModel]]:
        plan, span = self._plan(operation, None, stream=False, project=project,
                                timeout=NOT_GIVEN, tags=None)  # fmt: skip
        timeout = self.config.health.timeout_s
        error: BaseException | None = None
        try:
            results: list[Any] = []
            for ep in self._pool.endpoints:
                try:
                    results.append(
                        self._run(steps.list_one(ep, operation, plan.record.project, timeout))
                    )
                except SharedOllamaError as exc:
                    results.append(exc)
            return _merge(self._pool.endpoints, results, operation)
        except BaseException as exc:
            error = self._annotate(plan, exc)
            raise
        finally:
            self._finish(plan, span, error)

    # -- public API -------------------------------------------------------------------
    @overload
    def chat(self, model: str = "", messages: Sequence[MessageLike] | None = None, *,
             tools: Sequence[Mapping[str, Any]] | None = None,
             stream: Literal[False] = False, think: bool | str | None = None,
             format: Any = None, options: Mapping[str, Any] | None = None,
             keep_alive: float | str | None = None, project: str | None = None,
             timeout: float | NotGiven | None = NOT_GIVEN,
             tags: Mapping[str, str] | None = None) -> ChatResponse: ...  # fmt: skip
    @overload
    def chat(self, model: str = "", messages: Sequence[MessageLike] | None = None, *,
             tools: Sequence[Mapping[str, Any]] | None = None,
             stream: Literal[True], think: bool | str | None = None,
             format: Any = None, options: Mapping[str, Any] | None = None,
             keep_alive: float | str | None = None, project: str | None = None,
             timeout: float | NotGiven | None = NOT_GIVEN,
             tags: Mapping[str, str] | None = None) -> Iterator[ChatChunk]: ...  # fmt: skip
    def chat(self, model: str = "", messages: Sequence[MessageLike] | None = None, *,
             tools: Sequence[Mapping[str, Any]] | None = None,
             stream: bool = False, think: bool | str | None = None,
             format: Any = None, options: Mapping[str, Any] | None = None,
             keep_alive: float | str | None = None, project: str | None = None,
             timeout: float | NotGiven | None = NOT_GIVEN,
             tags: Mapping[str, str] | None = None,
             ) -> ChatResponse | Iterator[ChatChunk]:  # fmt: skip
        """Chat with ``model``; ``stream=True`` returns an iterator of chunks."""
        op = chat_op(model, messages, tools=tools, stream=stream, think=think, format=format,
                     options=options, keep_alive=keep_alive)  # fmt: skip
        if stream:
            return self._stream(op, CHUNKS["chat"], project=project, timeout=timeout, tags=tags)
        parsed, plan = self._call(op, project=project, timeout=timeout, tags=tags)
        return RESPONSES["chat"](plan.record, parsed)  # type: ignore[no-any-return]

    @overload
    def generate(self, model: str = "", prompt: str = "", suffix: str | None = None, *,
                 system: str | None = None, template: str | None = None,
                 context: Sequence[int] | None = None, stream: Literal[False] = False,
                 think: bool | str | None = None, raw: bool | None = None,
                 format: Any = None, images: Sequence[str] | None = None,
                 options: Mapping[str, Any] | None = None,
                 keep_alive: float | str | None = None, project: str | None = None,
                 timeout: float | NotGiven | None = NOT_GIVEN,
                 tags: Mapping[str, str] | None = None) -> GenerateResponse: ...  # fmt: skip
    @overload
    def generate(self, model: str = "", prompt: str = "", suffix: str | None = None, *,
                 system: str | None = None, template: str | None = None,
                 context: Sequence[int] | None = None, stream: Literal[True],
                 think: bool | str | None = None, raw: bool | None = None,
                 format: Any = None, images: Sequence[str] | None = None,
                 options: Mapping[str, Any] | None = None,
                 keep_alive: float | str | None = None, project: str | None = None,
                 timeout: float | NotGiven | None = NOT_GIVEN,
                 tags: Mapping[str, str] | None = None) -> Iterator[GenerateChunk]: ...  # fmt: skip
    def generate(self, model: str = "", prompt: str = "", suffix: str | None = None, *,
                 system: str | None = None, template: str | None = None,
                 context: Sequence[int] | None = None, stream: bool = False,
                 think: bool | str | None = None, raw: bool | None = None,
                 format: Any = None, images: Sequence[str] | None = None,
                 options: Mapping[str, Any] | None = None,
                 keep_alive: float | str | None = None, project: str | None = None,
                 timeout: float | NotGiven | None = NOT_GIVEN,
                 tags: Mapping[str, str] | None = None,
                 ) -> GenerateResponse | Iterator[GenerateChunk]:  # fmt: skip
        """Complete ``prompt``; ``stream=True`` returns an iterator of chunks."""
        op = generate_op(model, prompt, suffix=suffix, system=system, template=template,
                         context=context, stream=stream, think=think, raw=raw, format=format,
                         images=images, options=options, keep_alive=keep_alive)  # fmt: skip
        if stream:
            return self._stream(op, CHUNKS["generate"], project=project, timeout=timeout,
                                tags=tags)  # fmt: skip
        parsed, plan = self._call(op, project=project, timeout=timeout, tags=tags)
        return RESPONSES["generate"](plan.record, parsed)  # type: ignore[no-any-return]

    def embed(self, model: str = "", input: str | Sequence[str] = "",
              truncate: bool | None = None, options: Mapping[str, Any] | None = None,
              keep_alive: float | str | None = None, dimensions: int | None = None, *,
              project: str | None = None, timeout: float | NotGiven | None = NOT_GIVEN,
              tags: Mapping[str, str] | None = None) -> EmbedResponse:  # fmt: skip
        """Embed ``input`` (one string or a list) with ``model``."""
        op = embed_op(model, input, truncate=truncate, options=options, keep_alive=keep_alive,
                      dimensions=dimensions)  # fmt: skip
        parsed, plan = self._call(op, project=project, timeout=timeout, tags=tags)
        return RESPONSES["embed"](plan.record, parsed)  # type: ignore[no-any-return]

    def show(self, model: str, *, project: str | None = None,
             timeout: float | NotGiven | None = NOT_GIVEN) -> ShowResponse:  # fmt: skip
        """What an endpoint serving ``model`` says about it."""
        fields, plan = self._call(show_op(model), project=project, timeout=timeout, tags=None)
        rec = plan.record
        return ShowResponse(model=model, served_model=rec.served_model or "",
                            endpoint=rec.endpoint or "", **fields)  # fmt: skip

    def list(self, *, project: str | None = None) -> ListResponse:
        """Models served across the pool (one entry per endpoint and model)."""
        return ListResponse(models=self._logical_models(self._fan_out("list", project), False))

    def ps(self, *, project: str | None = None) -> PsResponse:
        """Models loaded in memory across the pool."""
        return PsResponse(models=self._logical_models(self._fan_out("ps", project), True))
