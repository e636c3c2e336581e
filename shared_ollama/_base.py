"""What both clients share and that does no I/O: configuration, pool, hooks, records.

``SharedClient`` and ``SyncSharedClient`` add only sending, streaming, sleeping and
closing (see ``client.py``).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from functools import partial
from typing import Any, Final, Generic, Self, TypeAlias, TypeVar

from ._core import steps
from ._core.plan import CallPlan, RetryBudget
from ._core.requests import Op
from ._core.steps import Gather, Offload, Steps
from ._transport import Connection
from .config import (
    AdaptivePolicy,
    AdmissionPolicy,
    BreakerPolicy,
    Budget,
    Endpoint,
    HealthPolicy,
    Limits,
    PoolConfig,
    RetryPolicy,
    Strategy,
    Timeouts,
    UsageConfig,
    load_config,
    ollama_endpoints,
)
from .errors import ClientClosed, ConfigError, InvalidRequest, NotSupported, SharedOllamaError
from .pool import EndpointState, EndpointStatus, Pool, RouteRequest
from .protocols import ListedModel, Parsed, Piece, WireRequest
from .records import CallListener, CallRecord
from .telemetry import CallSpan, Telemetry
from .types import ModelInfo, ProgressResponse, RunningModel, ShowResponse
from .usage import UsageTracker

__all__ = ["NOT_GIVEN", "BaseClient", "EndpointLike", "NotGiven"]

log = logging.getLogger("shared_ollama")

EndpointLike: TypeAlias = Endpoint | str | Mapping[str, Any]
TransportT = TypeVar("TransportT")
T = TypeVar("T")


class NotGiven(Enum):
    """Sentinel type: "use the client's default" (``None`` means "no limit")."""

    NOT_GIVEN = "NOT_GIVEN"

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Final = NotGiven.NOT_GIVEN


def _endpoint(e: EndpointLike) -> Endpoint:
    if isinstance(e, Endpoint):
        return e
    if isinstance(e, str):
        return Endpoint(e)
    return Endpoint(**dict(e))


class _RequestIds:
    """Request ids unique across processes and hosts without a syscall per call: a random
    64-bit prefix per process (drawn again in a forked child) and a 64-bit counter, as 32 hex
    digits like a UUID's. The ledger keys its rows on them (``uuid4()`` cost an ``os.urandom``
    read per call)."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()

    def __call__(self) -> str:
        # next() on itertools.count is atomic under the GIL: no lock between threads.
        return f"{self.prefix}{next(self.counter) & 0xFFFFFFFFFFFFFFFF:016x}"


new_request_id = _RequestIds()


class BaseClient(Generic[TransportT]):
    """Configuration, pool, listeners and accounting shared by both clients.

    ``transport`` is httpx's seam (``httpx.MockTransport`` in tests): an
    ``httpx.AsyncBaseTransport`` for ``SharedClient``, an ``httpx.BaseTransport`` for
    ``SyncSharedClient``.
    """

    def __init__(
        self,
        endpoints: Sequence[EndpointLike] | None = None,
        *,
        project: str | None = None,
        config: PoolConfig | None = None,
        strategy: Strategy | None = None,
        retry: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
        timeouts: Timeouts | None = None,
        limits: Limits | None = None,
        health: HealthPolicy | None = None,
        usage: UsageConfig | bool | None = None,
        budgets: Mapping[str, Budget] | None = None,
        admission: AdmissionPolicy | None = None,
        adaptive: AdaptivePolicy | None = None,
        listeners: Sequence[CallListener] = (),
        telemetry: Telemetry | None = None,
        transport: TransportT | None = None,
    ) -> None:
        cfg = config or PoolConfig()
        updates: dict[str, Any] = {}
        if endpoints is not None:
            try:
                updates["endpoints"] = [_endpoint(e) for e in endpoints]
            except ConfigError:
                raise
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                raise ConfigError(f"invalid endpoint: {_first_error(exc)}") from None
        for key, value in (
            ("project", project),
            ("strategy", strategy),
            ("retry", retry),
            ("breaker", breaker),
            ("timeouts", timeouts),
            ("limits", limits),
            ("health", health),
            ("budgets", dict(budgets) if budgets is not None else None),
            ("admission", admission),
            ("adaptive", adaptive),
        ):
            if value is not None:
                updates[key] = value
        if isinstance(usage, bool):
            updates["usage"] = cfg.usage.model_copy(update={"enabled": usage})
        elif usage is not None:
            updates["usage"] = usage
        try:
            cfg = PoolConfig.model_validate({**cfg.model_dump(), **updates})
        except ValueError as exc:
            raise ConfigError(f"invalid configuration: {_first_error(exc)}") from None
        if not cfg.endpoints and os.environ.get("OLLAMA_HOST"):
            # Nothing configured but ollama's own variable: that server, as ollama would.
            cfg = cfg.model_copy(update={"endpoints": ollama_endpoints()})
        if not cfg.endpoints:
            raise ConfigError(
                "no endpoints configured (endpoints=[...], SHARED_OLLAMA_ENDPOINTS, a pool "
                "file, or OLLAMA_HOST)"
            )
        urls = [e.url for e in cfg.endpoints]
        if len(set(urls)) != len(urls):
            raise ConfigError("the same endpoint url is configured twice")
        self.config = cfg
        self.project = cfg.project
        self._pool = Pool(cfg)
        self._budget = RetryBudget(cfg.retry)
        self._listeners: list[CallListener] = list(listeners)
        self.usage = UsageTracker(cfg.usage, cfg.budgets)
        if cfg.usage.prometheus_port is not None:  # imported here: prometheus-client is extra
            from .usage.prometheus import exporter

            port, addr = cfg.usage.prometheus_port, cfg.usage.prometheus_addr
            self._listeners.append(exporter(port, addr)[0])
        self._telemetry = telemetry or Telemetry()
        self._telemetry.observe_pool(self._status_dicts)
        self._closed = False
        #: Set by close before anything is torn down: new calls and sends get ClientClosed.
        self._closing = False
        #: Calls started and not yet recorded, with their span and owner.
        self._calls: dict[CallPlan, tuple[CallSpan, object]] = {}
        self._record_lock = threading.Lock()
        self._started = False
        for ep in self._pool.endpoints:  # a slot given back wakes the calls waiting for one
            ep.on_release = self._wake_slot_waiters
        self._open_connections(transport)

    def _open_connections(self, transport: TransportT | None) -> None:
        """Create the driver's httpx client per endpoint (each driver its own kind)."""
        raise NotImplementedError

    def _connections(
        self, factory: Callable[..., TransportT], transport: TransportT | None
    ) -> dict[str, Connection]:
        """httpx transports per endpoint, in shards (or the caller's one for all)."""
        timeouts = self.config.timeouts
        if transport is not None:
            return {
                ep.url: Connection(ep.config, timeouts, [transport], [ep.config.max_connections])
                for ep in self._pool.endpoints
            }
        endpoints = self._pool.endpoints
        return {ep.url: Connection.open(ep.config, timeouts, factory) for ep in endpoints}

    def _wake_slot_waiters(self) -> None:
        """An endpoint gave a slot back (each driver wakes its waiters its own way)."""

    def _lazy_start(self) -> Steps[None]:
        """A first call on a client never started (no ``with``, no ``start()``): the
        start-up probes run first, once (health checks start only with ``start()``)."""
        if self._closed or self._closing:
            return
        probes = self._starting()
        if probes is not None:
            yield from probes

    def _starting(self) -> Steps[None] | None:
        """The start-up probes, the first time only (``start`` is idempotent)."""
        if self._started:
            return None
        self._started = True
        return self._probe_steps()

    @classmethod
    def from_config(
        cls,
        path: str | None = None,
        **overrides: Any,
    ) -> Self:
        """A client from a TOML file and/or ``SHARED_OLLAMA_*`` env vars."""
        client_keys = {"listeners", "telemetry"}
        extra = {k: overrides.pop(k) for k in list(overrides) if k in client_keys}
        return cls(config=load_config(path, **overrides), **extra)

    # -- observation ------------------------------------------------------------------
    def pool_status(self) -> list[EndpointStatus]:
        """Per endpoint: health, breaker, in-flight, latency EWMA, models, last error."""
        return self._pool.status(time.monotonic())

    def _status_dicts(self) -> list[dict[str, object]]:
        return [s.as_dict() for s in self.pool_status()]

    def add_listener(self, listener: CallListener) -> None:
        """Call ``listener(record)`` after every call (keep it cheap: it runs inline)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: CallListener) -> None:
        """Stop calling ``listener``."""
        self._listeners.remove(listener)

    # -- per call ---------------------------------------------------------------------
    def _plan(
        self,
        operation: str,
        model: str | None,
        *,
        stream: bool,
        project: str | None,
        timeout: float | NotGiven | None,
        tags: Mapping[str, str] | None,
        content: object = None,
        op: Op[Any] | None = None,
        admitted: str | None = None,
    ) -> tuple[CallPlan, CallSpan]:
        """The call's plan and span; ``admitted``: the request id its budget check (run by
        ``_admit``, off the event loop) already admitted."""
        if self._closed or self._closing:
            raise ClientClosed("client is closed", model=model)
        project = project or self.project
        now = time.monotonic()
        if admitted is not None:
            request_id = admitted
        else:
            request_id = new_request_id()
            self._check_budget(project, now, request_id, op)
        total = self.config.timeouts.total_s if isinstance(timeout, NotGiven) else timeout
        plan = CallPlan(
            pool=self._pool,
            budget=self._budget,
            policy=self.config.retry,
            timeouts=self.config.timeouts,
            operation=operation,
            model=model,
            stream=stream,
            project=project,
            request_id=request_id,
            now=now,
            now_ns=time.monotonic_ns(),
            total_timeout=total,
            tags=tags,
            limits=self.config.limits,
            session=None if op is None else op.session,
            service_class=None if op is None else op.service_class,
            route=None if op is None else op_route(op),
        )
        span = self._telemetry.start(operation, model, project, stream)
        span.set_input(content)
        self._calls[plan] = (span, self._owner())
        return plan, span

    def _check_budget(self, project: str, now: float, request_id: str, op: Op[Any] | None) -> None:
        if op is None:
            self.usage.check(project, now, request_id=request_id)
        else:
            self.usage.check(project, now, request_id=request_id,
                             prompt_tokens=op.prompt_tokens, max_tokens=op.max_tokens)  # fmt: skip

    def _admit(self, op: Op[Any] | None, project: str | None,
               model: str | None = None) -> Steps[str]:  # fmt: skip
        """A budget shared through a database is checked in an ``Offload`` (a worker thread
        for the async driver: a round trip, or a wait for another process's lock, must not
        stall the event loop); the request id it admitted. Every call shape goes through it
        (``list``/``ps`` and model management too, with ``op`` None)."""
        if self._closed or self._closing:
            raise ClientClosed("client is closed", model=op.model if op is not None else model)
        request_id = new_request_id()
        check = partial(self._check_budget, project or self.project, time.monotonic(),
                        request_id, op)  # fmt: skip
        yield Offload(check)
        return request_id

    # -- the call shapes: step generators that both drivers run -------------------------
    def _calling(self, op: Op[T], project: str | None, timeout: float | NotGiven | None,
                 tags: Mapping[str, str] | None,
                 admitted: str | None = None) -> Steps[tuple[T, CallRecord]]:  # fmt: skip
        """A routed non-stream call, accounted: its result and its finished record
        (``admitted``: the request id ``_admit`` already checked the budget for)."""
        if self.usage.shared and admitted is None:
            return self._admitted_call(op, project, timeout, tags)
        plan, span = self._plan(op.operation, op.model, stream=False, project=project,
                                timeout=timeout, tags=tags, content=op.content, op=op,
                                admitted=admitted)  # fmt: skip
        body = steps.call(plan, op, span.headers(), self.config.hedging)
        return self._accounted(plan, span, body if self._started else self._first(body))

    def _admitted_call(self, op: Op[T], project: str | None, timeout: float | NotGiven | None,
                       tags: Mapping[str, str] | None) -> Steps[tuple[T, CallRecord]]:  # fmt: skip
        """``_calling`` with the budget checked first, in an ``Offload``."""
        request_id = yield from self._admit(op, project)
        return (yield from self._calling(op, project, timeout, tags, request_id))

    def _streaming(self, op: Op[Parsed], make: Callable[[CallRecord, Piece], Any],
                   project: str | None, timeout: float | NotGiven | None,
                   tags: Mapping[str, str] | None) -> Steps[None]:  # fmt: skip
        """A routed stream, accounted: yields ``Deliver(chunk)`` for each chunk."""
        if not self._started:
            yield from self._lazy_start()
        admitted = (yield from self._admit(op, project)) if self.usage.shared else None
        plan, span = self._plan(op.operation, op.model, stream=True, project=project,
                                timeout=timeout, tags=tags, content=op.content, op=op,
                                admitted=admitted)  # fmt: skip
        yield from self._accounted(plan, span, steps.stream(plan, op, span.headers(), make))

    def _listing(
        self, operation: str, project: str | None
    ) -> Steps[tuple[list[tuple[str, ListedModel]], CallRecord]]:
        """``list``/``ps`` across the pool, accounted as one call."""
        admitted = (yield from self._admit(None, project)) if self.usage.shared else None
        plan, span = self._plan(operation, None, stream=False, project=project,
                                timeout=NOT_GIVEN, tags=None, admitted=admitted)  # fmt: skip
        timeout = self.config.health.timeout_s
        body = steps.fan_out(plan, self._pool.endpoints, operation, timeout)
        return (
            yield from self._accounted(plan, span, body if self._started else self._first(body))
        )

    def _accounted(
        self, plan: CallPlan, span: CallSpan, body: Steps[T]
    ) -> Steps[tuple[T, CallRecord]]:
        """Run ``body``; whatever ends it, the call's record goes out exactly once. The
        plan is made before (``_plan``): a call refused at the door has no record."""
        error: BaseException | None = None
        try:
            return (yield from body), plan.record
        except BaseException as exc:
            error = self._annotate(plan, exc)
            raise
        finally:
            self._finish(plan, span, error)

    def _first(self, body: Steps[T]) -> Steps[T]:
        """``body`` after the start-up probes, on a client never started."""
        yield from self._lazy_start()
        return (yield from body)

    def _managing(self, operation: str, model: str, body: Mapping[str, Any], *,
                  endpoint: str | None, project: str | None,
                  timeout: float | NotGiven | None, stream: bool,
                  method: str = "POST") -> Steps[Any]:  # fmt: skip
        """A model-management call (``pull``, ``push``, ``create``, ``delete``, ``copy``) on
        ``endpoint`` (a URL or name) or on every Ollama endpoint, accounted as one call.

        A stream yields ``Deliver(ProgressResponse)``; otherwise the answer is a
        ``{endpoint url: final status}`` mapping.
        """
        if not self._started:
            yield from self._lazy_start()
        targets = self._ollama_targets(operation, endpoint)
        admitted = (yield from self._admit(None, project, model)) if self.usage.shared else None
        plan, span = self._plan(operation, model, stream=stream, project=project,
                                timeout=timeout, tags=None, admitted=admitted)  # fmt: skip
        wire = WireRequest(method, f"/api/{operation}", json=dict(body))
        make = _progress if stream else None
        answers, _ = yield from self._accounted(plan, span, steps.manage(plan, targets, wire, make))
        if stream:
            return None  # the end of the stream
        return {url: str(obj.get("status", "success")) for url, obj in answers}

    def _ollama_targets(self, operation: str, endpoint: str | None) -> list[EndpointState]:
        eps = self._pool.endpoints
        if endpoint is not None:
            chosen = [ep for ep in eps if endpoint in (ep.url, ep.name)]
            if not chosen:
                raise InvalidRequest(f"{operation}: no endpoint {endpoint!r} in the pool")
        else:
            chosen = [ep for ep in eps if ep.kind == "ollama"]
        wrong = [ep for ep in chosen if ep.kind != "ollama" or ep.codec is None]
        if not chosen or wrong:
            kinds = ", ".join(sorted({f"{ep.name}: {ep.kind or 'undetected'}" for ep in eps}))
            raise NotSupported(
                f"{operation} is an Ollama call; no Ollama endpoint can take it ({kinds})"
            )
        return chosen

    def _probe_steps(self) -> Steps[None]:
        """Start-up: every endpoint probed at once, models discovered."""
        health = self.config.health
        endpoints = self._pool.endpoints
        return steps.probe_all(endpoints, self.project, health.timeout_s, True, health.enabled)

    def _health_steps(self) -> Steps[None]:
        """Health probes, and beside them the load scrapes (``config.scrape``)."""
        cfg = self.config
        eps = self._pool.endpoints
        health = steps.health_loop(eps, self.project, cfg.health, self._pool.rng)
        if not cfg.scrape.enabled:
            return health
        scrapes = steps.scrape_loop(eps, self.project, cfg.scrape, cfg.health.timeout_s,
                                    cfg.limits)  # fmt: skip
        return _together(health, scrapes)

    @staticmethod
    def _show_response(model: str, record: CallRecord, fields: dict[str, Any]) -> ShowResponse:
        return ShowResponse(
            model=model,
            served_model=record.served_model or "",
            endpoint=record.endpoint or "",
            **fields,
        )

    def _owner(self) -> object:
        """Who runs a call: its asyncio task, or its thread (see the drivers)."""
        return None

    def _call_finished(self) -> None:
        """A call's record went out (the drivers wake a closing client)."""

    def _calls_of(self, owners: set[Any]) -> set[CallPlan]:
        """The open calls run by ``owners`` (tasks or threads a close has just cut off)."""
        return {plan for plan, (_, owner) in list(self._calls.items()) if owner in owners}

    def _finish_abandoned(self) -> None:
        """At close: calls no driver will finish now (a stream the caller stopped reading, a
        call between two sends) get their record here, ``ClientClosed``, exactly once."""
        for plan, (span, _) in list(self._calls.items()):
            error = self._annotate(plan, ClientClosed("the client was closed during the call"))
            self._finish(plan, span, error)

    def _finish(self, plan: CallPlan, span: CallSpan, error: BaseException | None) -> CallRecord:
        """Close the call's record and hand it to usage, telemetry and listeners, once."""
        with self._record_lock:  # a closing client and the call's own driver may race here
            if plan.finished:  # recorded at close: the driver's own finish is a no-op
                return plan.record
            self._calls.pop(plan, None)
            for att in list(plan.open):  # attempts still holding a slot (cancelled, hedges)
                plan.end(att, time.monotonic(), time.monotonic_ns(), error=error)
            record = plan.finish(time.monotonic_ns(), error)
        span.set_output(plan.output_text)
        sinks: list[CallListener] = [self.usage, span.end, *self._listeners]
        for sink in sinks:
            try:
                sink(record)
            except Exception:
                log.exception("call listener %r failed", sink)
        self._call_finished()
        return record

    def _annotate(self, plan: CallPlan, exc: BaseException) -> BaseException:
        if isinstance(exc, SharedOllamaError):
            plan.annotate(exc)
        return exc

    def _logical_models(
        self, listed: Sequence[tuple[str, ListedModel]], running: bool
    ) -> list[Any]:
        out: list[Any] = []
        for url, m in listed:
            ep = self._pool.by_url(url)
            logical = ep.logical_for(m.name) if ep else m.name
            fields: dict[str, Any] = {
                "model": logical,
                "served_model": m.name,
                "endpoint": url,
                "name": m.name,
                "size": m.size,
                "details": m.details,
            }
            if running:
                out.append(RunningModel(size_vram=m.size_vram, expires_at=m.expires_at, **fields))
            else:
                out.append(ModelInfo(digest=m.digest, modified_at=m.modified_at, **fields))
        return out

    def __repr__(self) -> str:
        eps = ", ".join(e.display_name for e in self.config.endpoints)
        return f"{type(self).__name__}(project={self.project!r}, endpoints=[{eps}])"


def _together(*loops: Steps[None]) -> Steps[None]:
    yield Gather(list(loops))


def op_route(op: Op[Any]) -> RouteRequest:
    """What the router is told of ``op``."""
    return RouteRequest(op.model, op.operation, op.route_key, op.prompt_tokens, op.max_tokens)


def _progress(url: str, obj: dict[str, Any]) -> ProgressResponse:
    return ProgressResponse.model_validate({**obj, "endpoint": url})


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors(include_input=False)[0]
            return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        except Exception:
            pass
    return type(exc).__name__
