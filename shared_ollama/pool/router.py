"""Routing strategies: pick one endpoint among the eligible ones.

A strategy sees only endpoints that serve the model and may take a call now (the pool
filters first); it never does I/O. Add one by implementing ``Strategy.pick``.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from typing import Protocol

from .endpoint import EndpointState

__all__ = [
    "LeastLoaded",
    "Priority",
    "RoundRobin",
    "Strategy",
    "Weighted",
    "make_strategy",
]

# Latency assumed for an endpoint with no sample yet: optimistic, so new endpoints get
# traffic and a sample.
_DEFAULT_LATENCY_S = 0.05


class Strategy(Protocol):
    """Chooses one of the eligible endpoints (``candidates`` is never empty)."""

    def pick(
        self, candidates: Sequence[EndpointState], model: str, rng: random.Random, now: float
    ) -> EndpointState: ...


def load_score(ep: EndpointState, model: str, now: float) -> float:
    """Lower is better: expected wait if we add one call, halved when the model is loaded."""
    estimate = ep.latency_estimate(now)
    latency = estimate if estimate is not None else _DEFAULT_LATENCY_S
    score = (ep.in_flight + 1) * latency / ep.config.weight
    return score * 0.5 if ep.is_loaded(model) else score


class LeastLoaded:
    """Power of two choices on in-flight x latency EWMA, preferring loaded models."""

    def pick(
        self, candidates: Sequence[EndpointState], model: str, rng: random.Random, now: float
    ) -> EndpointState:
        """Sample two, keep the lower score (ties: fewer in flight, then either)."""
        if len(candidates) == 1:
            return candidates[0]
        a, b = rng.sample(list(candidates), 2)
        sa, sb = load_score(a, model, now), load_score(b, model, now)
        if sa == sb:
            return a if a.in_flight <= b.in_flight else b
        return a if sa < sb else b


class RoundRobin:
    """Each eligible endpoint in turn."""

    def __init__(self) -> None:
        self._next = 0
        self._lock = threading.Lock()

    def pick(
        self, candidates: Sequence[EndpointState], model: str, rng: random.Random, now: float
    ) -> EndpointState:
        """The next one in order."""
        with self._lock:
            i = self._next
            self._next += 1
        return candidates[i % len(candidates)]


class Weighted:
    """Smooth weighted round robin (nginx's): deterministic shares by ``weight``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def pick(
        self, candidates: Sequence[EndpointState], model: str, rng: random.Random, now: float
    ) -> EndpointState:
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
            return best


class Priority:
    """Lowest ``priority`` tier first; the next tier only when the first has none eligible."""

    def __init__(self, within: Strategy | None = None) -> None:
        self._within = within or LeastLoaded()

    def pick(
        self, candidates: Sequence[EndpointState], model: str, rng: random.Random, now: float
    ) -> EndpointState:
        """Least loaded among the best tier present."""
        tier = min(ep.config.priority for ep in candidates)
        best = [ep for ep in candidates if ep.config.priority == tier]
        return self._within.pick(best, model, rng, now)


def make_strategy(name: str) -> Strategy:
    """Strategy by its config name."""
    table: dict[str, type[LeastLoaded] | type[RoundRobin] | type[Weighted] | type[Priority]]
    table = {
        "least_loaded": LeastLoaded,
        "round_robin": RoundRobin,
        "weighted": Weighted,
        "priority": Priority,
    }
    return table[name]()
