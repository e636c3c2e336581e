"""Every call's lifecycle written once, as generators that yield operations.

``call``, ``stream``, ``fan_out`` and ``probe_all`` hold the whole of a call: routing,
attempts, hedging, retries and their waits, deadlines, bounds and breaker bookkeeping. A
driver runs one by performing each yielded operation and sending the result back (or
throwing its typed error in): ``Send``/``Read``/``Close`` (HTTP), ``NOW``/``WALL`` (clocks),
``Sleep``, ``Race`` and ``Gather`` (other step generators run concurrently) and, for
streams, ``Deliver`` (hand one chunk to the caller). The async driver awaits, the sync
driver blocks; nothing here touches a socket, a loop, a thread or the clock.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeAlias, TypeVar

from ..config import Endpoint, HealthPolicy, Limits, ScrapePolicy
from ..errors import ClientClosed, NoEndpointAvailable, SharedOllamaError
from ..pool import AUTO_PROBES, EndpointState, detect_kind, next_probe_delay
from ..pool.admission import Ticket
from ..pool.signals import MAX_SCRAPE_BYTES, busy_slots, parse_prometheus, server_load
from ..protocols import Codec, ListedModel, Parsed, Piece, WireRequest, WireResponse
from ..protocols.decoders import NDJSONDecoder
from ..records import CallRecord
from .plan import Attempt, CallPlan
from .requests import Op
from .status import error_for_response, is_answer
from .streams import StreamState

__all__ = [
    "NOW",
    "WALL",
    "Close",
    "Deliver",
    "Offload",
    "Gather",
    "Head",
    "IOOp",
    "Opened",
    "Race",
    "Read",
    "Send",
    "Sleep",
    "Steps",
    "StreamAbandoned",
    "attempt",
    "call",
    "detect",
    "fan_out",
    "health_loop",
    "list_one",
    "manage",
    "open_stream",
    "probe",
    "probe_all",
    "read_more",
    "request_headers",
    "scrape",
    "scrape_loop",
    "stream",
]

T = TypeVar("T")
_PROBE_LIMITS = Limits()
Phase: TypeAlias = Literal["first_chunk", "between_chunks"]


@dataclass(frozen=True, slots=True)
class Head:
    """The status line and headers of a reply; ``handle`` is the driver's response."""

    status: int
    headers: Mapping[str, str]
    handle: Any
    t_ns: int


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``wire`` and return its ``Head``; the body is read separately."""

    endpoint: EndpointState
    wire: WireRequest
    headers: Mapping[str, str]
    #: Phase deadline in seconds (the driver shortens it to the call's total deadline).
    limit: float | None
    deadline: float | None = None
    model: str | None = None


# Not frozen: a frozen dataclass sets each field through object.__setattr__, and a stream
# makes a Read for every read and a Deliver for every chunk.
@dataclass(slots=True)
class Read:
    """Read the whole body (``whole``) or the next bytes of a stream (None at its end)."""

    head: Head
    endpoint: EndpointState
    phase: Phase
    limit: float | None
    deadline: float | None = None
    whole: bool = False
    model: str | None = None
    #: For ``whole``: the largest body accepted. Past it the driver raises ``ProtocolError``,
    #: or with ``truncate`` returns the first ``max_bytes`` (error bodies: only a message).
    max_bytes: int | None = None
    truncate: bool = False
    #: Streams: when the phase itself ends (the first chunk, or the next one, must be complete
    #: by then), so bytes trickled in without ever making a chunk do not reset the deadline.
    phase_deadline: float | None = None


@dataclass(frozen=True, slots=True)
class Close:
    """Release the reply's connection."""

    head: Head


class _Now:
    """Ask the driver for ``(monotonic seconds, monotonic ns)``."""


class _Wall:
    """Ask the driver for wall-clock epoch seconds (HTTP-date ``Retry-After``)."""


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait ``seconds``; with ``slot``, an endpoint giving a slot back ends the wait early.

    The sync driver also ends it when the client closes (raising ``ClientClosed``).
    """

    seconds: float
    slot: bool = False
    #: The call's place in admission's wait, if it has one: a release then wakes the best
    #: waiter (``Admission.sleeping``/``wake``), not every sleeping call.
    ticket: Ticket | None = None


@dataclass(frozen=True, slots=True)
class Race:
    """Run ``first``; if it has not finished after ``after`` seconds, start ``second()``.

    The first success is the result; when both fail, the last error. The loser is
    cancelled (async) or left to finish unseen in a worker thread (sync: a blocking request
    cannot be interrupted); either way its attempt ends with the call.
    """

    first: Steps[Any]
    second: Callable[[], Steps[Any]]
    after: float


@dataclass(frozen=True, slots=True)
class Gather:
    """Run ``parts`` concurrently: their results in order, a ``SharedOllamaError`` standing
    in for a part that failed with one (any other error is raised)."""

    parts: Sequence[Steps[Any]]


@dataclass(frozen=True, slots=True)
class Offload:
    """Run ``fn()`` (blocking work: a database round trip) and return its result; the async
    driver runs it in a worker thread, off the event loop."""

    fn: Callable[[], Any]


@dataclass(slots=True)
class Deliver:
    """Streams only: hand ``chunk`` to the caller; the steps resume when it asks for more
    (or get ``StreamAbandoned`` thrown in when it stops reading)."""

    chunk: Any


class StreamAbandoned(BaseException):
    """Thrown into stream steps when the caller stops reading (closes the iterator).

    Not ``GeneratorExit``: thrown into a ``yield from`` chain, that one closes the inner
    generators instead, and their cleanup could not yield the ``Close`` of the reply. The
    call is recorded as ``cancelled``.
    """


NOW = _Now()
WALL = _Wall()
IOOp: TypeAlias = Send | Read | Close | _Now | _Wall | Sleep | Race | Gather | Deliver | Offload
Steps: TypeAlias = Generator[IOOp, Any, T]


def request_headers(
    endpoint: Endpoint, request_id: str, project: str, extra: Mapping[str, str] | None
) -> dict[str, str]:
    """Headers of one attempt: endpoint's own, tracing, project and auth (added last)."""
    headers = dict(endpoint.headers)
    headers["x-request-id"] = request_id
    headers["x-shared-ollama-project"] = project
    if extra:
        headers.update(extra)
    if endpoint.api_key is not None:
        headers["authorization"] = f"Bearer {endpoint.api_key.get_secret_value()}"
    return headers


def _error(codec: Codec, reply: WireResponse, ep: EndpointState, plan: CallPlan | None,
           now_epoch: float = 0.0) -> SharedOllamaError:  # fmt: skip
    error = error_for_response(
        codec,
        reply,
        endpoint=ep.url,
        model=plan.model if plan else None,
        attempts=plan.attempts if plan else 0,
        request_id=plan.record.request_id if plan else None,
        now_epoch=now_epoch,
    )
    # A server that echoes the credentials it refused ("invalid key sk-...") must not put
    # them into the exception, the call's record or the endpoint's status.
    key = ep.config.api_key
    secret = key.get_secret_value() if key is not None else ""
    if secret and error.server_message and secret in error.server_message:
        error.server_message = error.server_message.replace(secret, "***")
    return error


def _send(plan: CallPlan, ep: EndpointState, wire: WireRequest,
          trace: Mapping[str, str]) -> Send:  # fmt: skip
    headers = request_headers(ep.config, plan.record.request_id, plan.record.project, trace)
    return Send(ep, wire, headers, plan.timeouts.first_chunk_s, plan.deadline, plan.model)


def _read(plan: CallPlan, head: Head, ep: EndpointState, *, whole: bool,
          phase_started: float | None = None) -> Read:  # fmt: skip
    first = plan.record.t_first_chunk_ns is None
    phase: Phase = "first_chunk" if first or whole else "between_chunks"
    t = plan.timeouts
    limit = t.first_chunk_s if phase == "first_chunk" else t.between_chunks_s
    if not whole:
        ends = None if limit is None or phase_started is None else phase_started + limit
        return Read(head, ep, phase, limit, plan.deadline, whole, plan.model, phase_deadline=ends)
    size, failed = _body_bound(plan.limits, head)
    return Read(head, ep, phase, limit, plan.deadline, whole, plan.model, size, failed)


def _body_bound(limits: Limits, head: Head) -> tuple[int, bool]:
    """(largest body to read, whether to truncate rather than fail): an error body is only a
    message, read up to ``max_error_bytes``; an answer fails past ``max_response_bytes``."""
    failed = not is_answer(head.status)
    return (limits.max_error_bytes if failed else limits.max_response_bytes), failed


def call(plan: CallPlan, op: Op[T], trace: Mapping[str, str], hedging: bool) -> Steps[T]:
    """A whole non-stream call: attempts (hedged where the pool allows), retries, waits."""
    once: Callable[[], Steps[T]] = (
        partial(_hedged, plan, op, trace) if hedging else partial(attempt, plan, op, trace)
    )
    return (yield from _retrying(plan, once))


def _hedged(plan: CallPlan, op: Op[T], trace: Mapping[str, str]) -> Steps[T]:
    """One attempt, or a hedged pair: a second copy after the p95, first answer wins."""
    delay = plan.hedge_after(True)
    if delay is None:
        return (yield from attempt(plan, op, trace))
    won: T = yield Race(attempt(plan, op, trace), partial(attempt, plan, op, trace), delay)
    return won


def _retrying(plan: CallPlan, once: Callable[[], Steps[T]]) -> Steps[T]:
    """Run ``once()`` until it succeeds or the plan's retry policy gives up.

    The policy is tenacity's retry/stop/wait strategies, asked only after a failure (see
    ``CallPlan.after_failure``); the waits are ``Sleep`` operations, so no clock or sleep is
    read here.
    """
    while True:
        try:
            return (yield from once())
        except SharedOllamaError as exc:
            now, _ = yield NOW
            wait = plan.after_failure(exc, now)
            if wait is None:
                raise
            if wait > 0:
                yield Sleep(wait, plan.slot_wait, plan.waiting_ticket())


def attempt(plan: CallPlan, op: Op[T], trace: Mapping[str, str]) -> Steps[T]:
    """One non-stream attempt: route, send, read, classify, parse."""
    now, now_ns = yield NOW
    choice = plan.choose(now)
    ep = choice.endpoint
    codec = ep.codec
    assert codec is not None
    att = plan.begin(choice, now_ns)
    status: int | None = None
    error: BaseException | None = None
    probe: bool | None = None
    try:
        probe = ep.breaker.admit(now)
        head: Head = yield _send(plan, ep, op.build(codec, choice.served_model), trace)
        status = head.status
        try:
            body: bytes = yield _read(plan, head, ep, whole=True)
        finally:
            yield Close(head)
        reply = WireResponse(head.status, head.headers, body)
        if not is_answer(status):
            raise _error(codec, reply, ep, plan, (yield WALL))
        result = op.parse(codec, reply)
        if isinstance(result, Parsed):
            result.server_timings.update(codec.response_timings(reply.headers))
            plan.use(att)
            plan.on_parsed(result, head.t_ns)
        return result
    except BaseException as exc:
        error = exc
        raise
    finally:
        now, now_ns = yield NOW
        if probe is not None:
            ep.breaker.settle(probe, error, now)
        plan.end(att, now, now_ns, error=error, status_code=status)


@dataclass(slots=True)
class Opened:
    """A stream with its first deliverable pieces (nothing delivered to the caller yet)."""

    head: Head
    attempt: Attempt
    state: StreamState
    pending: list[Piece] = field(default_factory=list)
    eof: bool = False
    #: When the current phase began (the attempt's start, then each chunk's arrival, or the
    #: moment the caller came back for more after taking chunks: its own time is not counted).
    phase_started: float | None = None

    @property
    def endpoint(self) -> EndpointState:
        """Where the stream comes from."""
        return self.attempt.choice.endpoint


def stream(plan: CallPlan, op: Op[Parsed], trace: Mapping[str, str],
           make: Callable[[CallRecord, Piece], Any]) -> Steps[None]:  # fmt: skip
    """A whole stream: opened and retried like a call until its first chunk, then each chunk
    ``Deliver``ed as it comes. Once one reached the caller the call is never retried: a
    failure then is ``StreamInterrupted``."""
    opened = yield from _retrying(plan, partial(open_stream, plan, op, trace))
    try:
        while True:
            pending, opened.pending = opened.pending, []
            for piece in pending:
                plan.delivered_chunk(piece.text)
                yield Deliver(make(plan.record, piece))
            if opened.eof:
                return
            if pending:  # the caller's own time between chunks is not the server's
                opened.phase_started, _ = yield NOW
            try:
                yield from read_more(plan, opened)
            except SharedOllamaError as exc:
                now, _ = yield NOW
                raise interrupted(plan, opened, exc, now) from exc
    finally:
        yield Close(opened.head)


def open_stream(plan: CallPlan, op: Op[Parsed], trace: Mapping[str, str]) -> Steps[Opened]:
    """Connect and read until the first deliverable chunk; the whole of it is retryable."""
    now, now_ns = yield NOW
    choice = plan.choose(now)
    ep = choice.endpoint
    codec = ep.codec
    assert codec is not None
    att = plan.begin(choice, now_ns)
    head: Head | None = None
    probe: bool | None = None
    try:
        probe = ep.breaker.admit(now)
        head = yield _send(plan, ep, op.build(codec, choice.served_model), trace)
        if not is_answer(head.status):
            body: bytes = yield _read(plan, head, ep, whole=True)
            reply = WireResponse(head.status, head.headers, body)
            raise _error(codec, reply, ep, plan, (yield WALL))
        plan.record.server_timings.update(codec.response_timings(head.headers))
        kind: Literal["chat", "generate"] = "chat" if op.operation == "chat" else "generate"
        opened = Opened(head, att, StreamState(plan, codec.stream_parser(kind)))
        opened.phase_started = now
        while not opened.pending and not opened.eof:
            yield from read_more(plan, opened)
    except BaseException as exc:
        if head is not None:
            yield Close(head)
        now, now_ns = yield NOW
        if probe is not None:
            ep.breaker.settle(probe, exc, now)
        plan.end(att, now, now_ns, error=exc, status_code=head.status if head else None)
        raise
    now, _ = yield NOW
    ep.breaker.settle(bool(probe), None, now)  # it answered: a chunk, or a whole short stream
    return opened


def read_more(plan: CallPlan, opened: Opened) -> Steps[None]:
    """Read the next bytes of an open stream into ``opened.pending``."""
    read = _read(plan, opened.head, opened.endpoint, whole=False,
                 phase_started=opened.phase_started)  # fmt: skip
    data: bytes | None = yield read
    now, now_ns = yield NOW
    if data is None:
        opened.eof = True
        opened.pending.extend(opened.state.end(now_ns))
        plan.end(opened.attempt, now, now_ns, status_code=opened.head.status)
    else:
        pieces = opened.state.feed(data, now_ns)
        if pieces:
            opened.phase_started = now
        opened.pending.extend(pieces)


def interrupted(plan: CallPlan, opened: Opened, cause: SharedOllamaError,
                now: float) -> SharedOllamaError:  # fmt: skip
    """A stream broke after delivery: count it against the endpoint, never retry it.

    A stream ended by closing the client is no fault of the endpoint: ``ClientClosed`` as is.
    """
    if isinstance(cause, ClientClosed):
        return cause
    opened.endpoint.breaker.record_failure(cause, now)
    return plan.interrupted(cause)


def _simple(ep: EndpointState, wire: WireRequest, project: str,
            timeout: float) -> Steps[WireResponse]:  # fmt: skip
    headers = request_headers(ep.config, "probe", project, None)
    head: Head = yield Send(ep, wire, headers, timeout)
    # Probes and listings keep the default bounds (a model list is far below them).
    size, failed = _body_bound(_PROBE_LIMITS, head)
    try:
        body: bytes = yield Read(
            head, ep, "first_chunk", timeout, whole=True, max_bytes=size, truncate=failed
        )
    finally:
        yield Close(head)
    return WireResponse(head.status, head.headers, body)


def detect(ep: EndpointState, project: str, timeout: float) -> Steps[None]:
    """Find which protocol an ``auto`` endpoint speaks."""
    for candidate in AUTO_PROBES:
        try:
            reply = yield from _simple(ep, candidate.request, project, timeout)
        except SharedOllamaError as exc:
            ep.kind_error = exc.message
            return
        if kind := detect_kind(candidate, reply):
            ep.set_kind(kind)
            return
    ep.kind_error = "no known protocol answered"


def probe(ep: EndpointState, project: str, timeout: float, refresh_models: bool,
          health: bool = True) -> Steps[None]:  # fmt: skip
    """Health check through the breaker (a half-open probe), then model discovery.

    With ``health=False`` (health checks disabled) only the protocol and the models are
    discovered: nothing would ever mark the endpoint up again, so it is never marked down.
    """
    try:
        if ep.codec is None:
            yield from detect(ep, project, timeout)
        codec = ep.codec
        if codec is None:
            return
        if health:
            yield from _health_check(ep, codec, project, timeout)
            verify = refresh_models and ep.config.kind != "auto"
            if verify and (wrong := (yield from _wrong_kind(ep, project, timeout))) is not None:
                ep.set_health("wrong kind?", wrong)
                return
            ep.set_health("up")
        if refresh_models:
            listed = yield from _simple(ep, codec.list_models(), project, timeout)
            if listed.status == 200:
                ep.set_models(m.name for m in codec.parse_list(listed))
            if (ps := codec.ps()) is not None:
                loaded = yield from _simple(ep, ps, project, timeout)
                if loaded.status == 200:
                    ep.set_loaded(m.name for m in codec.parse_ps(loaded))
    except SharedOllamaError as exc:
        if health:
            ep.set_health("down", exc.message)


def _wrong_kind(ep: EndpointState, project: str, timeout: float) -> Steps[str | None]:
    """Why a declared kind looks wrong (its identifying route answers otherwise), or None.

    The same cheap probe that auto-detection uses, for the declared kind only: a server
    whose health route answers but that speaks another protocol would otherwise show "up"
    until a real call failed.
    """
    probe = next((p for p in AUTO_PROBES if p.kind == ep.config.kind), None)
    if probe is None:
        return None
    reply = yield from _simple(ep, probe.request, project, timeout)
    if detect_kind(probe, reply) == probe.kind:
        return None
    return (
        f"declared kind={ep.config.kind!r}, but {probe.request.path} did not answer like "
        f"{probe.kind} (status {reply.status})"
    )


def _health_check(ep: EndpointState, codec: Codec, project: str,
                  timeout: float) -> Steps[None]:  # fmt: skip
    now, _ = yield NOW
    probe = ep.breaker.admit(now)
    error: BaseException | None = None
    try:
        reply = yield from _simple(ep, codec.health(), project, timeout)
        if reply.status >= 500:
            raise _error(codec, reply, ep, None)
    except BaseException as exc:
        error = exc
        raise
    finally:
        now, _ = yield NOW
        ep.breaker.settle(probe, error, now)


def probe_all(endpoints: Sequence[EndpointState], project: str, timeout: float,
              refresh_models: bool, health: bool) -> Steps[None]:  # fmt: skip
    """Probe every endpoint at once (one slow endpoint does not hold up the others)."""
    yield Gather([probe(ep, project, timeout, refresh_models, health) for ep in endpoints])


def health_loop(endpoints: Sequence[EndpointState], project: str, policy: HealthPolicy,
                rng: Any) -> Steps[None]:  # fmt: skip
    """Probe the pool every ``interval_s`` (jittered), refreshing model lists now and then."""
    last_models, _ = yield NOW
    while True:
        yield Sleep(next_probe_delay(policy, rng))
        now, _ = yield NOW
        refresh = now - last_models >= policy.models_refresh_s
        if refresh:
            last_models = now
        yield from probe_all(endpoints, project, policy.timeout_s, refresh, True)


#: Where each kind reports its own load, in the order tried: vLLM and llama.cpp (with
#: ``--metrics``) at ``/metrics``, llama.cpp without it at ``/slots``; TGI at ``/metrics``.
SCRAPE_ROUTES: dict[str, tuple[str, ...]] = {"openai": ("/metrics", "/slots"), "tgi": ("/metrics",)}
#: Answers that say the route is not there (llama.cpp answers 501 without ``--metrics``).
_NO_ROUTE = frozenset({400, 404, 405, 501})


def scrape(ep: EndpointState, project: str, timeout: float, limits: Limits) -> Steps[None]:
    """Read one server's own load into ``ep`` (Ollama: its loaded models).

    A server that answers no load route at all is not scraped again (``ep.scrapable``);
    a failed scrape keeps the last report, which fades with its age.
    """
    codec = ep.codec
    if codec is None or not ep.scrapable:
        return
    try:
        if ep.kind == "ollama":
            if (ps := codec.ps()) is None:
                ep.scrapable = False
                return
            reply = yield from _simple(ep, ps, project, timeout)
            if reply.status == 200:
                ep.set_loaded(m.name for m in codec.parse_ps(reply))
            return
        bound = min(MAX_SCRAPE_BYTES, limits.max_response_bytes)
        for path in SCRAPE_ROUTES.get(ep.kind or "", ()):
            headers = request_headers(ep.config, "scrape", project, None)
            head: Head = yield Send(ep, WireRequest("GET", path), headers, timeout)
            try:
                body: bytes = yield Read(head, ep, "first_chunk", timeout, whole=True,
                                         max_bytes=bound, truncate=True)  # fmt: skip
            finally:
                yield Close(head)
            if head.status in _NO_ROUTE:
                continue
            if head.status != 200:
                return  # a server in trouble: try again next time
            if path == "/slots":
                gauges = {"llamacpp:requests_processing": float(busy_slots(body))}
            else:
                gauges = parse_prometheus(body, truncated=len(body) >= bound)
            # The server counted what ran when it answered: our own in flight then.
            now, _ = yield NOW
            report = server_load(gauges, at=now, own_in_flight=ep.in_flight, source=path)
            if report is not None:
                ep.set_server_load(report)
                return
        ep.scrapable = False
    except SharedOllamaError:
        return


def scrape_loop(endpoints: Sequence[EndpointState], project: str, policy: ScrapePolicy,
                timeout: float, limits: Limits) -> Steps[None]:  # fmt: skip
    """Scrape every endpoint's own load every ``interval_s``, all at once."""
    while True:
        yield Sleep(policy.interval_s)
        due = [ep for ep in endpoints if ep.scrapable and ep.codec is not None]
        if due:
            yield Gather([scrape(ep, project, timeout, limits) for ep in due])


def fan_out(plan: CallPlan, endpoints: Sequence[EndpointState], operation: str,
            timeout: float) -> Steps[list[tuple[str, ListedModel]]]:  # fmt: skip
    """``list``/``ps`` across the pool; fails only when every endpoint failed."""
    parts = [list_one(ep, operation, plan.record.project, timeout) for ep in endpoints]
    results = yield Gather(parts)
    out: list[tuple[str, ListedModel]] = []
    reasons: dict[str, str] = {}
    for ep, res in zip(endpoints, results, strict=True):
        if isinstance(res, SharedOllamaError):
            reasons[ep.name] = res.message
        else:
            out.extend(res)
    if reasons and len(reasons) == len(endpoints):
        raise NoEndpointAvailable(f"no endpoint answered {operation}", reasons=reasons)
    return out


def list_one(ep: EndpointState, operation: str, project: str,
             timeout: float) -> Steps[list[tuple[str, ListedModel]]]:  # fmt: skip
    """One endpoint's models (``list``) or loaded models (``ps``)."""
    if ep.codec is None:
        yield from detect(ep, project, timeout)
    codec = ep.codec
    if codec is None:
        raise NoEndpointAvailable("protocol not detected", endpoint=ep.url)
    ps = codec.ps() if operation == "ps" else None
    reply = yield from _simple(ep, ps or codec.list_models(), project, timeout)
    if not is_answer(reply.status):
        raise _error(codec, reply, ep, None)
    models = codec.parse_ps(reply) if ps else codec.parse_list(reply)
    if operation == "list":
        ep.set_models(m.name for m in models)
    return [(ep.url, m) for m in models]


# -- model management (Ollama endpoints) -------------------------------------------------
Progress = Callable[[str, dict[str, Any]], Any]


def manage(plan: CallPlan, targets: Sequence[EndpointState], wire: WireRequest,
           make: Progress | None) -> Steps[list[tuple[str, Any]]]:  # fmt: skip
    """``pull``/``push``/``create``/``delete``/``copy`` on every target endpoint.

    Without ``make``: all targets at once, each answer's last status object; with ``make``
    (a stream), one target after the other, each progress object ``Deliver``ed as
    ``make(endpoint_url, obj)``. A failure on any target is raised (typed, with its
    endpoint); the targets' model lists are read again afterwards either way.
    """
    try:
        if make is None:
            parts = [_managed(plan, ep, wire, None) for ep in targets]
            results = yield Gather(parts)
            for res in results:
                if isinstance(res, SharedOllamaError):
                    raise res
            return [(ep.url, res) for ep, res in zip(targets, results, strict=True)]
        for ep in targets:
            yield from _managed(plan, ep, wire, make)
        return []
    finally:
        project, timeout = plan.record.project, plan.timeouts.first_chunk_s or 30.0
        yield Gather([list_one(ep, "list", project, timeout) for ep in targets])


def _managed(plan: CallPlan, ep: EndpointState, wire: WireRequest,
             make: Progress | None) -> Steps[dict[str, Any]]:  # fmt: skip
    codec = ep.codec
    assert codec is not None
    headers = request_headers(ep.config, plan.record.request_id, plan.record.project, None)
    # No phase deadline: a pull takes as long as the download; the call's total one holds.
    head: Head = yield Send(ep, wire, headers, None, plan.deadline, plan.model)
    last: dict[str, Any] = {}
    try:
        if not is_answer(head.status):
            size, failed = _body_bound(plan.limits, head)
            body: bytes = yield Read(head, ep, "first_chunk", None, plan.deadline, True,
                                     plan.model, size, failed)  # fmt: skip
            reply = WireResponse(head.status, head.headers, body)
            raise _error(codec, reply, ep, plan, (yield WALL))
        what = f"Ollama {wire.path} progress"
        decoder = NDJSONDecoder(what=what)
        while True:
            data: bytes | None = yield Read(head, ep, "between_chunks", None, plan.deadline,
                                            model=plan.model)  # fmt: skip
            objects = decoder.feed(data) if data is not None else decoder.flush()
            for obj in objects:
                if not isinstance(obj, dict):
                    continue
                if isinstance(obj.get("error"), str):  # Ollama reports a failed pull in-band
                    reply = WireResponse(500, head.headers, json.dumps(obj).encode())
                    raise _error(codec, reply, ep, plan, (yield WALL))
                last = obj
                if make is not None:
                    yield Deliver(make(ep.url, obj))
            if data is None:
                return last or {"status": "success"}  # delete and copy answer an empty 200
    finally:
        yield Close(head)
