"""The circuit breaker of one endpoint: pybreaker's state machine plus a half-open gate.

pybreaker has no asyncio support and stamps its own ``datetime.now()``, so the call steps
drive it with ``admit(now)`` before an attempt and ``settle(probe, error, now)`` after it,
``now`` being the monotonic seconds the drivers read for the steps. Only
``SharedOllamaError``s marked ``breaker_failure`` count as failures, other
``SharedOllamaError``s as successes, and anything else (cancellation) not at all. The open
state's timeout is ours, on that clock: pybreaker's wall-clock stamp is never read.
"""

from __future__ import annotations

import threading
from typing import Any, Literal, TypeAlias

import pybreaker

from ..config import BreakerPolicy
from ..errors import CircuitOpen, ClientClosed, SharedOllamaError
from ..records import PoolEvent

__all__ = ["BreakerState", "EndpointBreaker"]

BreakerState: TypeAlias = Literal["closed", "open", "half_open"]

_NAMES: dict[str, BreakerState] = {
    pybreaker.STATE_CLOSED: "closed",
    pybreaker.STATE_OPEN: "open",
    pybreaker.STATE_HALF_OPEN: "half_open",
}


def _not_a_failure(exc: BaseException) -> bool:
    # pybreaker's `exclude`: anything that is not an endpoint fault (4xx, overload,
    # cancellation, bugs in the caller) must not trip the breaker.
    return not (isinstance(exc, SharedOllamaError) and exc.breaker_failure)


def _answered() -> None:
    """Stands for an attempt that got an answer, so pybreaker records a success."""


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: EndpointBreaker) -> None:
        self._owner = owner

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        old = _NAMES.get(old_state.name if old_state else "", "closed")
        self._owner._on_change(old, _NAMES.get(new_state.name, "closed"))


class EndpointBreaker:
    """Breaker for one endpoint; thread-safe; state changes become ``PoolEvent``s."""

    def __init__(self, endpoint: str, policy: BreakerPolicy) -> None:
        self.endpoint = endpoint
        self.policy = policy
        #: The time given with the operation in progress (stamps its state changes).
        self._now = 0.0
        self._lock = threading.Lock()
        self._events: list[PoolEvent] = []
        self._probing = False
        self._state: BreakerState = "closed"
        #: When the breaker last opened (monotonic seconds).
        self._opened_at: float | None = None
        self._cb = pybreaker.CircuitBreaker(
            fail_max=policy.failure_threshold,
            reset_timeout=policy.reset_timeout_s,
            exclude=[_not_a_failure],
            listeners=[_Listener(self)],
            name=endpoint,
            # Let the real error surface; the pool reports the open state separately.
            throw_new_error_on_trip=False,
        )

    # -- state ------------------------------------------------------------------------
    @property
    def state(self) -> BreakerState:
        """Current state (``open`` stays ``open`` until a probe is admitted)."""
        # Kept by the listener at each transition: read on every routing decision.
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures counted so far."""
        return int(self._cb.fail_counter)

    def seconds_until_probe(self, now: float) -> float:
        """Seconds until an open breaker admits a probe (0 when it would now)."""
        if self.state != "open" or self._opened_at is None:
            return 0.0
        # On the monotonic clock, not pybreaker's ``datetime.now()`` stamp: a wall clock
        # stepped back an hour would otherwise keep the breaker open for an hour more.
        return max(0.0, self.policy.reset_timeout_s - (now - self._opened_at))

    def admits(self, now: float) -> tuple[bool, str | None]:
        """Whether a call may be sent at ``now``, and if not, why."""
        with self._lock:
            why = self._refusal(self.state, now)
        return why is None, why

    def _refusal(self, state: BreakerState, now: float) -> str | None:
        """Why no attempt may be sent in ``state`` now (None: one may); hold ``_lock``."""
        if state == "open" and (wait := self.seconds_until_probe(now)) > 0:
            return f"circuit open (probe in {wait:.1f}s)"
        if state != "closed" and self._probing:
            return "circuit half-open, probe in flight"
        return None

    # -- calls ------------------------------------------------------------------------
    def admit(self, now: float) -> bool:
        """Admit an attempt or raise ``CircuitOpen``; True when it is the half-open probe.

        Every admitted attempt is then ``settle``d, once.
        """
        with self._lock:
            self._now = now
            state = self.state
            if (why := self._refusal(state, now)) is not None:
                raise CircuitOpen(why, endpoint=self.endpoint)
            if state == "closed":
                return False
            self._probing = True
        if state == "open":
            self._cb.half_open()  # outside our lock: the listener takes it to record the event
        return True

    def settle(self, probe: bool, error: BaseException | None, now: float) -> None:
        """Judge an admitted attempt's outcome.

        Judged here, not by pybreaker's ``calling()``: pybreaker has only success and
        failure, so a cancelled attempt (a hedging loser, a caller giving up) would count as
        a success, reset the failure count and close a half-open breaker on no evidence. Here
        it changes nothing, and a half-open breaker admits the next probe. Our own close
        (``ClientClosed``) proves nothing about the endpoint either.
        """
        try:
            if error is None:
                self._record_success(probe, now)
            elif isinstance(error, SharedOllamaError) and not isinstance(error, ClientClosed):
                if error.breaker_failure:
                    self.record_failure(error, now)
                else:  # the endpoint answered (4xx, 429): it is alive
                    self._record_success(probe, now)
        finally:
            if probe:
                with self._lock:
                    self._probing = False

    def _record_success(self, probe: bool, now: float) -> None:
        # Only the probe may close a half-open breaker; a call admitted before the breaker
        # opened proves less about now. An open breaker stays open until its probe.
        # Under pybreaker's (reentrant) lock, so the state cannot change between the check
        # and the record: an open breaker would otherwise raise, or take this for its probe.
        with self._cb._lock:
            self._now = now
            state = self.state
            if state == "closed" or (probe and state == "half_open"):
                self._cb.call(_answered)

    def record_failure(self, exc: SharedOllamaError, now: float) -> None:
        """Count a failure (also one seen after the attempt, e.g. a stream cut mid-way)."""
        with self._lock:
            self._now = now
            if self.state == "open":
                # Already open; pybreaker's open state would judge its timeout on its wall
                # clock here (and might go half-open): ours is the only timeout.
                return
        try:
            with self._cb.calling():
                raise exc
        except BaseException:
            pass

    def drain_events(self) -> list[PoolEvent]:
        """Take the state changes recorded since the last call."""
        with self._lock:
            events, self._events = self._events, []
        return events

    def _on_change(self, old: BreakerState, new: BreakerState) -> None:
        self._state = new
        if old == new:
            return
        now = self._now
        if new == "open":
            self._opened_at = now
        event = PoolEvent("breaker", self.endpoint, old, new, int(now * 1e9))
        with self._lock:
            self._events.append(event)
