"""Routing strategies: pick one endpoint among the eligible ones, and say why.

A strategy sees only endpoints that serve the model and may take a call now (the pool
filters first) and the request being routed (``RouteRequest``); it never does I/O. Add one
by implementing ``Strategy.pick``, returning a ``Pick`` (the endpoint and the reason).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .affinity import Affinity
from .endpoint import EndpointState

__all__ = [
    "Affinity",
    "LeastLoaded",
    "Pick",
    "Priority",
    "RoundRobin",
    "RouteRequest",
    "Strategy",
    "Weighted",
    "load_score",
    "make_strategy",
]

# Latency assumed for an endpoint with no sample yet: optimistic, so new endpoints get
# traffic and a sample.
_DEFAULT_LATENCY_S = 0.05


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What a strategy knows of the call it routes.

    ``key`` is the short hash of the routing key (``session=``, OpenAI's ``user`` or
    ``prompt_cache_key``, else the system prompt and first user message), or None.
    """

    model: str
    operation: str = "chat"
    key: str | None = None
    #: A rough count (characters / 4): enough to weigh calls against each other.
    prompt_tokens: int = 0
    max_tokens: int | None = None

    @property
    def tokens(self) -> int:
        """Tokens this call may hold on an endpoint: prompt plus the output allowed."""
        return self.prompt_tokens + (self.max_tokens or 0)


@dataclass(frozen=True, slots=True)
class Pick:
    """The endpoint a strategy chose and why (see ``records.RoutingDecision.reason``)."""

    endpoint: EndpointState
    reason: str


class Strategy(Protocol):
    """Chooses one of the eligible endpoints (``candidates`` is never empty)."""

    def pick(
        self,
        candidates: Sequence[EndpointState],
        request: RouteRequest,
        rng: random.Random,
        now: float,
    ) -> Pick: ...


def load_score(ep: EndpointState, model: str, now: float) -> float:
    """Lower is better: expected wait if we add one call, halved when the model is loaded.

    The load is the endpoint's fused signal (our own calls in flight plus what its server
    last said other clients run, faded by age), plus this call.
    """
    return _score(ep, ep.is_loaded(model), now)


def _score(ep: EndpointState, loaded: bool, now: float) -> float:
    estimate = ep.latency_estimate(now)
    latency = estimate if estimate is not None else _DEFAULT_LATENCY_S
    # Our own count alone where no server report is kept (the common case: no call).
    load = ep.in_flight if ep.server_load is None else ep.load(now)
    score = (load + 1) * latency / ep.config.weight
    return score * 0.5 if loaded else score


class LeastLoaded:
    """Power of two choices on load x latency EWMA, preferring loaded models."""

    def pick(
        self,
        candidates: Sequence[EndpointState],
        request: RouteRequest,
        rng: random.Random,
        now: float,
    ) -> Pick:
        """Sample two, keep the lower score (ties: fewer tokens in flight, then either)."""
        if len(candidates) == 1:
            return Pick(candidates[0], "only_candidate")
        a, b = rng.sample(list(candidates), 2)
        model = request.model
        la, lb = a.is_loaded(model), b.is_loaded(model)
        sa, sb = _score(a, la, now), _score(b, lb, now)
        if sa == sb:
            a_first = (a.in_flight, a.in_flight_tokens) <= (b.in_flight, b.in_flight_tokens)
        else:
            a_first = sa < sb
        won, loaded = (a, la and not lb) if a_first else (b, lb and not la)
        return Pick(won, "loaded_model" if loaded else "least_loaded")


class RoundRobin:
    """Each eligible endpoint in turn."""

    def __init__(self) -> None:
        self._next = 0
        self._lock = threading.Lock()

    def pick(
        self,
        candidates: Sequence[EndpointState],
        request: RouteRequest,
        rng: random.Random,
        now: float,
    ) -> Pick:
        """The next one in order."""
        with self._lock:
            i = self._next
            self._next += 1
        return Pick(candidates[i % len(candidates)], "round_robin")


class Weighted:
    """Smooth weighted round robin (nginx's): deterministic shares by ``weight``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def pick(
        self,
        candidates: Sequence[EndpointState],
        request: RouteRequest,
        rng: random.Random,
        now: float,
    ) -> Pick:
        """Raise every current weight by its weight, take the max, lower it by the total."""
        with self._lock:
            total = 0.0
            best = candidates[0]
            for ep in candidates:
                ep.rr_current += ep.config.weight
                total += ep.config.weight
                if ep.rr_current > best.rr_current:
                    best = ep
            best.rr_current -= total
            return Pick(best, "weighted")


class Priority:
    """Lowest ``priority`` tier first; the next tier only when the first has none eligible."""

    def __init__(self, within: Strategy | None = None) -> None:
        self._within = within or LeastLoaded()

    def pick(
        self,
        candidates: Sequence[EndpointState],
        request: RouteRequest,
        rng: random.Random,
        now: float,
    ) -> Pick:
        """Least loaded among the best tier present."""
        tier = min(ep.config.priority for ep in candidates)
        best = [ep for ep in candidates if ep.config.priority == tier]
        return Pick(self._within.pick(best, request, rng, now).endpoint, "priority")


def make_strategy(
    name: str, *, affinity_eps: float = 0.25, affinity_ttl_s: float = 600.0
) -> Strategy:
    """Strategy by its config name."""
    if name == "affinity":
        return Affinity(eps=affinity_eps, ttl_s=affinity_ttl_s)
    table: dict[str, type[LeastLoaded] | type[RoundRobin] | type[Weighted] | type[Priority]]
    table = {
        "least_loaded": LeastLoaded,
        "round_robin": RoundRobin,
        "weighted": Weighted,
        "priority": Priority,
    }
    return table[name]()
