"""The pool: endpoint states, eligibility for one call, strategy, and status.

``choose`` is the one place that decides where a call goes or why it cannot go anywhere;
it takes ``now`` and does no I/O.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from ..config import PoolConfig
from .adaptive import AdaptiveLimit
from .admission import Admission
from .endpoint import EndpointState, EndpointStatus
from .router import RouteRequest, Strategy, make_strategy

__all__ = ["Choice", "Pool", "Unavailable"]

# Hedging needs a latency distribution before it can pick "after the p95".
_HEDGE_MIN_SAMPLES = 20
_LATENCY_WINDOW = 500

# Served by every protocol: where there is no show route the model list answers it.
_EVERYWHERE = frozenset({"show"})

# Re-check interval when endpoints are only saturated (in-flight cap): a released slot
# wakes the waiters at once (EndpointState.on_release); this only bounds a missed wake-up.
_SATURATED_RECHECK_S = 1.0


@dataclass(frozen=True, slots=True)
class Choice:
    """Where a call goes."""

    endpoint: EndpointState
    served_model: str
    #: Why this endpoint (see ``records.RoutingDecision.reason``).
    reason: str = "only_candidate"
    #: The names of the endpoints the strategy chose among.
    candidates: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Why no endpoint can take the call now, and when one might."""

    reasons: dict[str, str]
    #: None when nothing will change by waiting (no endpoint serves the model at all).
    retry_in: float | None
    model_known: bool
    #: True when no endpoint of the pool can serve the operation at all (e.g. TGI embed).
    unsupported: bool = False
    #: True when every endpoint that may take the call later is only saturated (a queue to
    #: wait in), False when some are down, open or backing off (a pool to wait out).
    saturated: bool = False


class Pool:
    """All endpoints of a client, and the routing decision."""

    def __init__(
        self,
        config: PoolConfig,
        *,
        strategy: Strategy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        tau = config.scrape.tau_s
        self.endpoints = [
            EndpointState(ep, config.breaker, load_tau_s=tau) for ep in config.endpoints
        ]
        self.strategy = strategy or make_strategy(
            config.strategy, affinity_eps=config.affinity_eps, affinity_ttl_s=config.affinity_ttl_s
        )
        self.rng = rng or random.Random()
        self._latencies: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        #: The ordered wait for capacity (service classes, fair share, deadlines).
        self.admission = Admission(config.admission)
        for ep in self.endpoints:
            if ep.config.max_in_flight == "adaptive":
                ep.adaptive = AdaptiveLimit(config.adaptive)
        #: Whether calls can ever wait for a slot here: with no endpoint capped nobody does,
        #: so the calls skip admission's bookkeeping (the hot path pays nothing for it).
        self.capped = any(ep.config.max_in_flight is not None for ep in self.endpoints)

    def observe(self, operation: str, latency_s: float) -> None:
        """Remember a successful non-stream call's latency (for hedging)."""
        with self._lock:
            window = self._latencies.setdefault(operation, deque(maxlen=_LATENCY_WINDOW))
            window.append(latency_s)

    def p95(self, operation: str) -> float | None:
        """95th percentile of recent latencies, once there are enough samples."""
        with self._lock:
            window = sorted(self._latencies.get(operation, ()))
        if len(window) < _HEDGE_MIN_SAMPLES:
            return None
        return window[min(len(window) - 1, int(0.95 * len(window)))]

    def choose(
        self,
        model: str,
        operation: str,
        now: float,
        *,
        avoid: Collection[str] = (),
        request: RouteRequest | None = None,
    ) -> Choice | Unavailable:
        """Pick an endpoint for ``model``/``operation``; prefer ones not in ``avoid``
        (endpoint URLs a retry already tried). ``request`` tells the strategy more of the
        call (its routing key, its size)."""
        eligible: list[tuple[EndpointState, str]] = []
        reasons: dict[str, str] = {}
        waits: list[float] = []
        saturated = True
        known = False
        supported = False
        for ep in self.endpoints:
            supported = (
                supported
                or ep.codec is None
                or operation in ep.codec.operations
                or operation in _EVERYWHERE
            )
            why, wait, capped = self._ineligible(ep, model, operation, now)
            if why is None:
                served = ep.served_name(model)
                assert served is not None
                eligible.append((ep, served))
                known = True
                continue
            reasons[ep.name] = why
            if wait is not None:
                known = True
                waits.append(wait)
                saturated = saturated and capped
        if eligible:
            fresh = [(ep, s) for ep, s in eligible if ep.url not in avoid] or eligible
            served_by = {id(ep): s for ep, s in fresh}
            if request is None or request.model != model or request.operation != operation:
                request = RouteRequest(model, operation)
            candidates = [ep for ep, _ in fresh]
            pick = self.strategy.pick(candidates, request, self.rng, now)
            # A retry that could leave the endpoints it tried: the decision is the failover.
            failover = bool(avoid) and len(fresh) < len(eligible)
            return Choice(
                pick.endpoint,
                served_by[id(pick.endpoint)],
                "failover" if failover else pick.reason,
                tuple([ep.name for ep in candidates]),
            )
        waiting = min(waits) if waits else None
        return Unavailable(reasons, waiting, known, not supported, saturated and bool(waits))

    def _ineligible(
        self, ep: EndpointState, model: str, operation: str, now: float
    ) -> tuple[str | None, float | None, bool]:
        """(why not, seconds until it may change, whether only its in-flight cap stands in the
        way) — (None, None, False) when eligible."""
        if ep.codec is None:
            return f"protocol not detected yet ({ep.kind_error or 'probing'})", 1.0, False
        if operation not in ep.codec.operations and operation not in _EVERYWHERE:
            return f"{ep.kind} endpoints do not serve {operation}", None, False
        if ep.served_name(model) is None:
            return f"does not serve {model!r}", None, False
        if ep.health == "down" or ep.health == "wrong kind?":
            interval = self.config.health.interval_s
            return f"{ep.health} ({ep.last_error or 'health probe failed'})", interval, False
        admits, why = ep.breaker.admits(now)
        if not admits:
            return why, max(ep.breaker.seconds_until_probe(now), _SATURATED_RECHECK_S), False
        if ep.backoff_until > now:
            wait = ep.backoff_until - now
            return f"backing off {wait:.1f}s (server asked: Retry-After)", wait, False
        cap = ep.cap
        if cap is not None and ep.in_flight >= cap:
            return f"saturated ({ep.in_flight}/{cap} in flight)", _SATURATED_RECHECK_S, True
        return None, None, False

    def free_slots(self, model: str, operation: str, now: float) -> int | None:
        """Free in-flight slots for ``model`` across the endpoints that may take it now
        (None: one of them has no cap)."""
        free = 0
        for ep in self.endpoints:
            why, _, _ = self._ineligible(ep, model, operation, now)
            if why is not None:
                continue  # saturated (no slot free) or not usable now
            cap = ep.cap
            if cap is None:
                return None
            free += max(0, cap - ep.in_flight)
        return free

    def by_url(self, url: str) -> EndpointState | None:
        """The endpoint with this URL."""
        return next((ep for ep in self.endpoints if ep.url == url), None)

    def status(self, now: float) -> list[EndpointStatus]:
        """A snapshot of every endpoint."""
        return [ep.status(now) for ep in self.endpoints]
