"""The per-call plan: route, classify, retry or fail over, and record — free of I/O.

The call steps (``steps.py``) go through the same plan: ``choose`` -> ``begin`` -> (send)
-> ``end``, with ``after_failure`` (tenacity's retry/stop/wait strategies) between
attempts; ``finish`` builds the one CallRecord of the call. Time comes in as arguments
(monotonic seconds / ns).
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from tenacity import Future, RetryCallState

from ..config import Limits, RetryPolicy, Timeouts
from ..errors import (
    CircuitOpen,
    InvalidRequest,
    ModelNotFound,
    NoEndpointAvailable,
    Overloaded,
    RateLimited,
    SharedOllamaError,
    StreamInterrupted,
    Timeout,
)
from ..pool import Choice, Pool, RouteRequest, Unavailable
from ..pool.admission import Ticket
from ..protocols import Parsed, Piece
from ..records import AttemptRecord, CallRecord, Outcome, RoutingDecision

__all__ = ["Attempt", "CallPlan", "RetryBudget", "WaitingForEndpoint", "full_jitter"]

_DEFAULT_LIMITS = Limits()
# With no total deadline, waiting for an endpoint to recover is still bounded.
_MAX_WAIT_WITHOUT_DEADLINE_S = 60.0
# A waiter whom a better-ordered one stands before looks again this often at the latest (a
# release or a grant normally wakes it first).
_ADMISSION_RECHECK_S = 1.0


class WaitingForEndpoint(NoEndpointAvailable):
    """Internal: nothing can take the call yet; tenacity waits ``retry_in`` and re-routes.

    It is a NoEndpointAvailable so that, when the deadline ends the wait, the caller gets
    the typed error naming each endpoint and why.
    """

    def __init__(self, message: str, *, retry_in: float, saturated: bool = False,
                 **kw: Any) -> None:  # fmt: skip
        super().__init__(message, **kw)
        self.retry_in = retry_in
        #: Waiting for a slot on a saturated endpoint: a release may end the wait early.
        self.saturated = saturated


@dataclass(eq=False, slots=True)
class Attempt:
    """One send of the call: where it went and its record."""

    choice: Choice
    record: AttemptRecord


class RetryBudget:
    """Retries may be at most ``ratio`` x calls (+ ``budget_min``) in a sliding window.

    Shared by every call of a client, so a sick pool is not hammered by retries.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()
        self._lock = threading.Lock()
        self.denied = 0

    def _trim(self, now: float) -> None:
        horizon = now - self.policy.budget_window_s
        for q in (self._calls, self._retries):
            while q and q[0] < horizon:
                q.popleft()

    def note_call(self, now: float) -> None:
        """Count a new call."""
        with self._lock:
            self._trim(now)
            self._calls.append(now)

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget if it has one."""
        with self._lock:
            self._trim(now)
            allowed = self.policy.budget_min + self.policy.budget_ratio * len(self._calls)
            if len(self._retries) + 1 > allowed:
                self.denied += 1
                return False
            self._retries.append(now)
            return True

    def snapshot(self, now: float) -> tuple[int, int]:
        """(calls, retries) in the current window."""
        with self._lock:
            self._trim(now)
            return len(self._calls), len(self._retries)


def full_jitter(retry_number: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform(0, min(max, initial * 2**(n-1)))."""
    ceiling = min(policy.backoff_max_s, policy.backoff_initial_s * 2 ** (retry_number - 1))
    return rng.uniform(0.0, ceiling)


class CallPlan:
    """The decisions of one call, from routing to its CallRecord."""

    def __init__(
        self,
        *,
        pool: Pool,
        budget: RetryBudget,
        policy: RetryPolicy,
        timeouts: Timeouts,
        operation: str,
        model: str | None,
        stream: bool,
        project: str,
        request_id: str,
        now: float,
        now_ns: int,
        total_timeout: float | None,
        tags: Mapping[str, str] | None = None,
        limits: Limits | None = None,
        session: str | None = None,
        service_class: str | None = None,
        route: RouteRequest | None = None,
    ) -> None:
        self.limits = limits if limits is not None else _DEFAULT_LIMITS
        #: The caller's routing key as given (never recorded: only its hash, in ``route``).
        self.session = session
        #: The admission class the caller named (None: the default class).
        self.service_class = service_class
        #: What the strategy is told about the call.
        self.route = route or RouteRequest(model or "", operation)
        self._tokens = self.route.tokens
        self._text_room = self.limits.max_stream_text_chars
        self.pool = pool
        self.budget = budget
        self.policy = policy
        self.timeouts = timeouts
        self.operation = operation
        self.model = model
        self.stream = stream
        self.rng = pool.rng
        self.deadline = None if total_timeout is None else now + total_timeout
        self._wait_deadline = (
            self.deadline if self.deadline is not None else now + _MAX_WAIT_WITHOUT_DEADLINE_S
        )
        # A pool with nothing able to take the call is waited out for a short while only: a
        # dead pool must answer NoEndpointAvailable in seconds, not at the total deadline.
        self._recover_deadline = min(self._wait_deadline, now + timeouts.no_endpoint_s)
        self.record = CallRecord(
            request_id=request_id,
            project=project,
            operation=operation,
            model=model,
            stream=stream,
            t_start_ns=now_ns,
            tags=dict(tags or {}),
        )
        #: Attempts sent and not yet ended (two while a hedge races the first).
        self.open: list[Attempt] = []
        self.delivered = 0
        #: The coming wait is for a free slot (a release wakes it); else a plain backoff.
        self.slot_wait = False
        self.delivered_text: list[str] = []
        self.finished = False
        self._parsed_text: str | None = None
        self._retries = 0
        #: The call's place in the wait for capacity (an unknown class: InvalidRequest).
        #: None where no endpoint is capped: nobody ever waits for a slot there, so there is
        #: no order to keep (an unknown class name is still refused).
        self.ticket: Ticket | None = None
        if pool.capped and pool.admission.enabled:
            self.ticket = pool.admission.ticket(project, service_class, key=model or "",
                                                deadline=self.deadline)  # fmt: skip
        elif service_class is not None:
            pool.admission.resolve(service_class)
        budget.note_call(now)

    # -- routing ----------------------------------------------------------------------
    @property
    def attempts(self) -> int:
        """Attempts sent so far."""
        return len(self.record.attempts)

    def remaining(self, now: float) -> float | None:
        """Seconds left before the total deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - now

    def choose(self, now: float) -> Choice:
        """Pick an endpoint and take its in-flight slot, or raise why none can be taken."""
        assert self.model is not None
        self._admit(now)
        tried = [a.endpoint for a in self.record.attempts]
        route = self.route
        result = self.pool.choose(self.model, self.operation, now, avoid=tried, request=route)
        if isinstance(result, Choice):
            if result.endpoint.try_acquire(self._tokens):
                self._admitted(now)
                if self.open and result.reason == "failover":
                    result = replace(result, reason="hedge")  # the first copy still runs
                return result
            # Lost a race for the last slot: behave as saturated.
            result = Unavailable({result.endpoint.name: "saturated"}, 0.01, True, saturated=True)
        return self._unavailable(result, now)

    def _unavailable(self, result: Unavailable, now: float) -> Choice:
        kw = self._error_kw()
        if result.unsupported:
            what = (
                "a chat with no messages (it loads or unloads the model: Ollama endpoints only)"
                if self.operation == "load"
                else self.operation
            )
            raise InvalidRequest(
                f"no endpoint of the pool serves {what}",
                server_message="; ".join(result.reasons.values()),
                **kw,
            )
        if not result.model_known:
            raise ModelNotFound(
                f"no endpoint serves model {self.model!r}",
                status_code=404,  # what the server itself would have answered
                server_message="; ".join(f"{k}: {v}" for k, v in result.reasons.items()),
                **kw,
            )
        limit = self._wait_deadline if result.saturated else self._recover_deadline
        if result.saturated and self.ticket is not None:
            # The class's bounded wait ends it sooner (then Overloaded).
            limit = min(limit, max(now + 0.001, self.ticket.wait_bound()))
        # Waiting past the deadline would only delay the same error: fail now instead. A slot
        # on a saturated endpoint, though, may free up any moment (a release wakes the wait).
        hopeless = not result.saturated and now + (result.retry_in or 0) >= self._wait_deadline
        if result.retry_in is None or now >= limit or hopeless:
            raise NoEndpointAvailable(
                f"no endpoint available for {self.model!r}", reasons=result.reasons, **kw
            )
        raise WaitingForEndpoint(
            f"no endpoint available for {self.model!r}",
            reasons=result.reasons,
            retry_in=min(result.retry_in, limit - now),
            saturated=result.saturated,
            **kw,
        )

    # -- admission: the ordered wait for capacity (pool/admission.py) -------------------
    def _admit(self, now: float) -> None:
        """Let the call try for a slot only when no better-ordered waiter could take it;
        else wait (``Sleep(slot=True)``), or be refused: shed, or waited too long."""
        ticket = self.ticket
        if ticket is None or self.open:  # a hedge rides on its first copy's admission
            return
        adm = self.pool.admission
        assert self.model is not None
        free = self.pool.free_slots(self.model, self.operation, now)
        spare = free is None or free > ticket.cls.headroom
        if spare and adm.idle and not ticket.waiting:
            return  # nobody waits and a slot is free: the common case costs no lock
        decision = adm.decide(ticket, now, free)
        if decision.verdict == "try":
            return
        kw = self._error_kw()
        if decision.verdict == "refuse":
            err = Overloaded(decision.reason, **kw)
            err.retryable = False  # refused here, by policy: no retry would fare better
            raise err
        why = {"admission": f"{decision.ahead} of {decision.waiting} waiting calls go first"}
        if now >= self._wait_deadline:
            adm.withdraw(ticket)
            raise NoEndpointAvailable(f"no endpoint available for {self.model!r}",
                                      reasons=why, **kw)  # fmt: skip
        until = min(self._wait_deadline, max(now + 0.001, ticket.wait_bound()))
        raise WaitingForEndpoint(f"waiting for capacity for {self.model!r}", reasons=why,
                                 retry_in=min(_ADMISSION_RECHECK_S, until - now),
                                 saturated=True, **kw)  # fmt: skip

    def waiting_ticket(self) -> Ticket | None:
        """The call's admission ticket while it waits in admission for a slot, else None."""
        t = self.ticket
        return t if self.slot_wait and t is not None and t.waiting else None

    def _admitted(self, now: float) -> None:
        """The call took a slot: it leaves the wait (a hedge's copy was admitted already)."""
        if self.ticket is not None and len(self.open) == 0:
            self.pool.admission.granted(self.ticket, now)

    def _learn_limit(self, att: Attempt, now: float, error: BaseException | None) -> None:
        """Feed an adaptive endpoint its signal: time to first chunk, or the server's queue
        time (never whole-call latency); a server saying it is overloaded is one too."""
        ep = att.choice.endpoint
        limit = ep.adaptive
        if limit is None:
            return
        started = att.record.t_start_ns / 1e9
        if isinstance(error, RateLimited):
            limit.overloaded(started=started, now=now)
            return
        if error is not None or att.record.endpoint != self.record.endpoint:
            return
        timings = self.record.server_timings
        queue_ms = timings.get("queue_time_ms")
        queue_s = None if queue_ms is None else queue_ms / 1e3
        ttft: float | None = None
        if self.stream and self.record.t_first_chunk_ns is not None:
            ttft = (self.record.t_first_chunk_ns - att.record.t_start_ns) / 1e9
        elif "total_duration_ns" in timings and "eval_duration_ns" in timings:
            # Ollama's total counts its own queue, load and prefill before the first token.
            ttft = (timings["total_duration_ns"] - timings["eval_duration_ns"]) / 1e9
        elif queue_s is not None:
            ttft = queue_s + timings.get("time_per_token_ms", 0.0) / 1e3
        if ttft is not None:
            limit.sample(ttft, started=started, now=now, in_flight=ep.in_flight, queue_s=queue_s)

    def begin(self, choice: Choice, now_ns: int) -> Attempt:
        """An attempt is about to be sent to ``choice`` (which holds its in-flight slot)."""
        ep = choice.endpoint
        record = AttemptRecord(endpoint=ep.url, t_start_ns=now_ns)
        self.record.attempts.append(record)
        att = Attempt(choice, record)
        self.open.append(att)
        self.use(att)
        return att

    def use(self, att: Attempt) -> None:
        """Make ``att`` the attempt the call's record describes (the one that answered)."""
        if self.finished:
            return
        ep = att.choice.endpoint
        self.record.endpoint = ep.url
        self.record.endpoint_name = ep.name
        self.record.protocol = ep.kind
        self.record.served_model = att.choice.served_model
        choice = att.choice
        self.record.routing = RoutingDecision(
            ep.name, choice.reason, choice.candidates, self.route.key
        )

    def end(
        self,
        att: Attempt,
        now: float,
        now_ns: int,
        *,
        error: BaseException | None = None,
        status_code: int | None = None,
    ) -> None:
        """The attempt is over: release the slot, learn latency, note backpressure."""
        if att not in self.open:
            return  # already ended by the call's own end (an abandoned sync hedge)
        self.open.remove(att)
        choice = att.choice
        attempt = att.record
        attempt.t_end_ns = now_ns
        attempt.status_code = status_code
        ep = choice.endpoint
        failed = isinstance(error, SharedOllamaError) and error.breaker_failure
        if error is not None:
            attempt.error_type = type(error).__name__
            attempt.error_message = str(error)[:300]
            if isinstance(error, SharedOllamaError):
                attempt.status_code = attempt.status_code or error.status_code
        if isinstance(error, RateLimited):
            ep.back_off(now + self._retry_after(error))
        latency = None if error is not None else (now_ns - attempt.t_start_ns) / 1e9
        self._learn_limit(att, now, error)
        ep.release(
            latency_s=latency,
            error=attempt.error_message if failed else None,
            now=now,
            tokens=self._tokens,
        )
        if latency is not None and not self.stream:
            self.pool.observe(self.operation, latency)
        self.record.events.extend(ep.breaker.drain_events())

    def _retry_after(self, error: RateLimited) -> float:
        hint = error.retry_after
        if hint is None:
            return full_jitter(max(1, self.attempts), self.policy, self.rng)
        return min(hint, self.policy.retry_after_cap_s)

    def hedge_after(self, enabled: bool) -> float | None:
        """Seconds after which a second copy goes to another endpoint (None: no hedge)."""
        if not enabled or self.stream or len(self.pool.endpoints) < 2:
            return None
        return self.pool.p95(self.operation)

    # -- retry policy: tenacity strategies, asked only after a failure ------------------
    def after_failure(self, exc: BaseException, now: float) -> float | None:
        """Seconds to wait before the next attempt, or None: give up and raise ``exc``.

        ``should_retry``/``should_stop``/``wait_seconds`` are tenacity retry/stop/wait
        strategies, judged in tenacity's order on a ``RetryCallState`` filled in here with
        the time the steps read. tenacity's own ``Retrying`` loop is not used: it sleeps and
        reads the clock itself, and its objects would cost every call, retried or not.
        """
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = max(1, self.attempts)
        outcome = Future(state.attempt_number)
        outcome.set_exception(exc)
        state.outcome, state.outcome_timestamp = outcome, now
        if not self.should_retry(state) or self.should_stop(state):
            return None
        return self.wait_seconds(state)

    def should_retry(self, rs: RetryCallState) -> bool:
        """Retry only retryable errors, before any chunk reached the caller, in budget."""
        if rs.outcome is None or not rs.outcome.failed:
            return False
        exc = rs.outcome.exception()
        now = rs.outcome_timestamp or 0.0
        if isinstance(exc, WaitingForEndpoint):
            return now < self._wait_deadline
        if not isinstance(exc, SharedOllamaError) or not exc.retryable:
            return False
        if isinstance(exc, Timeout) and exc.phase == "total":
            return False
        if self.delivered or self.attempts >= self.policy.max_attempts:
            return False
        if self.deadline is not None and now >= self.deadline:
            return False
        if isinstance(exc, CircuitOpen):
            return True  # nothing was sent: re-routing costs no budget
        if not self.budget.try_spend(now):
            return False
        self._retries += 1
        return True

    def wait_seconds(self, rs: RetryCallState) -> float:
        """Backoff before the next attempt, never past the deadline."""
        exc = rs.outcome.exception() if rs.outcome is not None else None
        now = rs.outcome_timestamp or 0.0
        self.slot_wait = isinstance(exc, WaitingForEndpoint) and exc.saturated
        if isinstance(exc, WaitingForEndpoint):
            wait = exc.retry_in
        elif isinstance(exc, CircuitOpen):
            wait = 0.0
        else:
            # Retry-After is honoured per endpoint (it is kept out of routing until
            # then); another endpoint can be tried after the usual backoff.
            wait = full_jitter(max(1, self._retries), self.policy, self.rng)
        return max(0.0, min(wait, self._wait_deadline - now))

    def should_stop(self, rs: RetryCallState) -> bool:
        """Stop once the deadline has passed."""
        now = rs.outcome_timestamp or 0.0
        return now >= self._wait_deadline

    # -- results ----------------------------------------------------------------------
    def _error_kw(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "attempts": self.attempts,
            "request_id": self.record.request_id,
        }

    def annotate(self, exc: SharedOllamaError) -> SharedOllamaError:
        """Fill in what the error should say about the call."""
        exc.model = exc.model or self.model
        exc.attempts = self.attempts
        exc.request_id = self.record.request_id
        if exc.endpoint is None and self.record.endpoint:
            exc.endpoint = self.record.endpoint
        return exc

    def on_parsed(self, parsed: Parsed, now_ns: int) -> None:
        """A complete non-stream reply arrived."""
        if self.finished:
            return  # a losing hedge that ended after the call: the record is out already
        rec = self.record
        rec.t_first_chunk_ns = rec.t_first_chunk_ns or now_ns
        rec.t_last_token_ns = now_ns
        self._parsed_text = parsed.text
        rec.input_tokens = parsed.input_tokens
        rec.output_tokens = parsed.output_tokens
        rec.finish_reason = parsed.done_reason
        rec.served_model = parsed.served_model or rec.served_model
        rec.server_timings.update(parsed.server_timings)
        rec.cached_tokens = parsed.cached_tokens

    def on_piece(self, piece: Piece, now_ns: int) -> bool:
        """A stream event arrived; True when it is a chunk to deliver to the caller."""
        rec = self.record
        if piece.input_tokens is not None:
            rec.input_tokens = piece.input_tokens
        if piece.output_tokens is not None:
            rec.output_tokens = piece.output_tokens
        if piece.done_reason is not None:
            rec.finish_reason = piece.done_reason
        if piece.served_model:
            rec.served_model = piece.served_model
        if piece.cached_tokens is not None:
            rec.cached_tokens = piece.cached_tokens
        if piece.server_timings:
            rec.server_timings.update(piece.server_timings)
        deliver = bool(piece.text or piece.thinking or piece.tool_calls or piece.done)
        if deliver:
            if rec.t_first_chunk_ns is None:
                rec.t_first_chunk_ns = now_ns
            rec.chunk_times_ns.append(now_ns)
            # A chunk with no content (Ollama's final object, an empty finish chunk) carries
            # no token, whatever the protocol says about the others.
            has_content = piece.has_content
            rec.chunk_tokens.append(piece.tokens if has_content else 0)
            if has_content:
                rec.t_last_token_ns = now_ns
        return deliver

    @property
    def output_text(self) -> str | None:
        """What the caller received (a full reply, or the chunks delivered so far)."""
        if self._parsed_text is not None:
            return self._parsed_text
        return "".join(self.delivered_text) if self.delivered else None

    def delivered_chunk(self, text: str) -> None:
        """A chunk reached the caller: from now on the call is never retried.

        Its text is kept (for ``StreamInterrupted.partial_text`` and span content) only up to
        ``Limits.max_stream_text_chars``: an endless stream costs counts and timings, not text.
        """
        self.delivered += 1
        if text and self._text_room > 0:
            kept = text[: self._text_room]
            self._text_room -= len(kept)
            self.delivered_text.append(kept)

    def interrupted(self, cause: SharedOllamaError) -> StreamInterrupted:
        """The error to raise when a stream breaks after delivery."""
        err = StreamInterrupted(
            f"stream interrupted after {self.delivered} chunks: {cause.message}",
            partial_text="".join(self.delivered_text),
            chunks=self.delivered,
            endpoint=cause.endpoint or self.record.endpoint,
            status_code=cause.status_code,
            server_message=cause.server_message,
        )
        err.__cause__ = cause
        return self.annotate(err)  # type: ignore[return-value]

    def finish(self, now_ns: int, error: BaseException | None = None) -> CallRecord:
        """Close the record: outcome, error type, end time."""
        self.finished = True
        rec = self.record
        if self.ticket is not None:
            # Fair share learns what the call really cost (it leaves any wait it was in).
            used = None if rec.input_tokens is None and rec.output_tokens is None else (
                (rec.input_tokens or 0) + (rec.output_tokens or 0))  # fmt: skip
            self.pool.admission.finished(self.ticket, used, now_ns / 1e9)
        rec.t_end_ns = now_ns
        outcome: Outcome = "ok"
        if error is not None:
            if isinstance(error, StreamInterrupted):
                outcome = "interrupted"
            elif isinstance(error, SharedOllamaError):
                outcome = "error"
            else:
                outcome = "cancelled"
            rec.error_type = type(error).__name__
            rec.error_message = str(error)[:500]
        rec.outcome = outcome
        return rec
