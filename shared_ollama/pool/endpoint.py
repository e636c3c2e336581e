"""The live state of one endpoint: kind, models, load, latency, breaker and health.

Mutated by the drivers through small methods that take ``now`` (monotonic seconds); read by
the router. Every mutation is under one lock, never held across I/O.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from ..config import BreakerPolicy, Endpoint
from ..protocols import Codec, codec_for
from .adaptive import AdaptiveLimit
from .breaker import BreakerState, EndpointBreaker
from .signals import ServerLoad

__all__ = ["EndpointState", "EndpointStatus", "Health"]

#: ``wrong kind?``: up, but not answering like the protocol it was declared with (an Ollama
#: server declared ``kind="openai"``, say); kept out of routing like ``down``.
Health: TypeAlias = Literal["unknown", "up", "down", "wrong kind?"]

_EWMA_ALPHA = 0.3
#: An idle endpoint's latency estimate decays toward zero with this time constant (as in
#: Finagle's peak EWMA), so one slow call cannot starve an endpoint of traffic forever:
#: least-loaded would otherwise never pick it again, and never learn it got faster.
LATENCY_DECAY_S = 5.0


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    """A snapshot of one endpoint for ``pool_status()``."""

    name: str
    url: str
    kind: str
    health: Health
    breaker: BreakerState
    in_flight: int
    max_in_flight: int | None
    latency_ewma_s: float | None
    models: tuple[str, ...]
    loaded: tuple[str, ...]
    last_error: str | None
    calls: int
    failures: int
    backoff_s: float = 0.0
    aliases: dict[str, str] = field(default_factory=dict)
    #: Tokens our calls in flight may hold there (estimated prompt + max output).
    in_flight_tokens: int = 0
    #: The fused load signal the router reads (see ``EndpointState.load``).
    load: float = 0.0
    #: The server's own last report: running/waiting requests, and its age in seconds.
    server_running: float | None = None
    server_waiting: float | None = None
    server_load_age_s: float | None = None
    server_load_source: str | None = None
    #: ``max_in_flight="adaptive"``: ``max_in_flight`` above is the limit learned now.
    adaptive: bool = False

    def as_dict(self) -> dict[str, object]:
        """Plain dict (for JSON and telemetry gauges)."""
        return {
            "name": self.name,
            "endpoint": self.url,
            "kind": self.kind,
            "health": self.health,
            "breaker": self.breaker,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "latency_ewma_s": self.latency_ewma_s,
            "models": list(self.models),
            "loaded": list(self.loaded),
            "last_error": self.last_error,
            "calls": self.calls,
            "failures": self.failures,
            "backoff_s": self.backoff_s,
            "in_flight_tokens": self.in_flight_tokens,
            "load": self.load,
            "server_running": self.server_running,
            "server_waiting": self.server_waiting,
            "server_load_age_s": self.server_load_age_s,
            "adaptive": self.adaptive,
        }


class EndpointState:
    """Everything the pool knows about one endpoint."""

    def __init__(
        self, config: Endpoint, breaker: BreakerPolicy, *, load_tau_s: float = 10.0
    ) -> None:
        self.config = config
        self.url = config.url
        self.name = config.display_name
        self.breaker = EndpointBreaker(config.url, breaker)
        self._lock = threading.Lock()
        self.kind: str | None = None if config.kind == "auto" else config.kind
        self.codec: Codec | None = codec_for(self.kind) if self.kind else None
        self.kind_error: str | None = None
        self.aliases: dict[str, str] = dict(config.models)
        self.discovered: frozenset[str] | None = None  # None: never listed successfully
        self.loaded: frozenset[str] = frozenset()
        self.health: Health = "unknown"
        self.in_flight = 0
        self.in_flight_tokens = 0
        #: The server's own last load report (None: never scraped, or nothing to scrape).
        self.server_load: ServerLoad | None = None
        self.load_tau_s = load_tau_s
        #: False once the server showed it has no load route (no further scrapes).
        self.scrapable = True
        self.latency_ewma_s: float | None = None
        self.latency_at = 0.0  # monotonic seconds of the last latency sample
        self.last_error: str | None = None
        self.backoff_until = 0.0
        self.calls = 0
        self.failures = 0
        self.rr_current = 0.0  # smooth weighted round robin bookkeeping
        #: Called after a slot is given back (the driver wakes calls waiting for one).
        self.on_release: Callable[[], None] | None = None
        #: ``max_in_flight="adaptive"``: the learned cap (set by the pool).
        self.adaptive: AdaptiveLimit | None = None
        #: The configured cap as a number (None: uncapped or adaptive); read on every call.
        self.fixed_cap: int | None = (
            None if config.max_in_flight == "adaptive" else config.max_in_flight
        )

    # -- models -----------------------------------------------------------------------
    def served_name(self, model: str) -> str | None:
        """The backend's name for logical ``model``, or None if this endpoint lacks it."""
        if model in self.aliases:
            return self.aliases[model]
        known = self.discovered
        if known is None:
            # Not listed yet: optimistic, the server will say 404 if it lacks the model.
            return model
        if model in known:
            return model
        if ":" not in model and f"{model}:latest" in known:
            return model  # Ollama resolves an untagged name to ":latest" itself
        return None

    def logical_names(self) -> list[str]:
        """Logical names this endpoint serves: aliases, then discovered names."""
        reverse = {served: logical for logical, served in self.aliases.items()}
        names = list(self.aliases)
        for served in sorted(self.discovered or ()):
            if served not in reverse and served not in names:
                names.append(served)
        return names

    def logical_for(self, served: str) -> str:
        """Map a backend name back to its logical name (alias) where one exists."""
        for logical, name in self.aliases.items():
            # Ollama lists an untagged name as "name:latest".
            if served in (name, f"{name}:latest"):
                return logical
        return served

    def is_loaded(self, model: str) -> bool:
        """Whether the model is known to be in memory (Ollama ``/api/ps``)."""
        served = self.served_name(model)
        return served is not None and (served in self.loaded or f"{served}:latest" in self.loaded)

    def set_kind(self, kind: str) -> None:
        """Record the auto-detected protocol."""
        with self._lock:
            self.kind = kind
            self.codec = codec_for(kind)
            self.kind_error = None

    def set_models(self, names: Iterable[str]) -> None:
        """Record the models the endpoint listed."""
        with self._lock:
            self.discovered = frozenset(names)

    def set_loaded(self, names: Iterable[str]) -> None:
        """Record the models the endpoint has in memory."""
        with self._lock:
            self.loaded = frozenset(names)

    # -- load -------------------------------------------------------------------------
    def try_acquire(self, tokens: int = 0) -> bool:
        """Take an in-flight slot (holding ``tokens``) if the cap allows."""
        cap = self.cap
        with self._lock:
            if cap is not None and self.in_flight >= cap:
                return False
            self.in_flight += 1
            self.in_flight_tokens += tokens
            self.calls += 1
            return True

    @property
    def cap(self) -> int | None:
        """The in-flight cap in force: the configured one, or the adaptive limit now."""
        if self.adaptive is not None:
            return self.adaptive.limit
        return self.fixed_cap

    def release(
        self,
        *,
        latency_s: float | None,
        error: str | None,
        now: float = 0.0,
        tokens: int = 0,
    ) -> None:
        """Give the slot (and its ``tokens``) back and fold the attempt's outcome in."""
        with self._lock:
            self.in_flight -= 1
            left = self.in_flight_tokens - tokens
            self.in_flight_tokens = left if left > 0 else 0
            if error is not None:
                self.failures += 1
                self.last_error = error
            if latency_s is not None:
                prev = self.latency_ewma_s
                self.latency_ewma_s = (
                    latency_s if prev is None else prev + _EWMA_ALPHA * (latency_s - prev)
                )
                self.latency_at = now
        if self.on_release is not None:
            self.on_release()

    def load(self, now: float) -> float:
        """The fused load signal: our calls in flight, plus other clients' requests its
        server last reported, faded by the report's age (``exp(-age / load_tau_s)``)."""
        report = self.server_load
        if report is None:
            return float(self.in_flight)
        return self.in_flight + report.others * report.weight(now, self.load_tau_s)

    def set_server_load(self, report: ServerLoad | None) -> None:
        """Record a scrape of the server's own load (None: it reported none of ours)."""
        with self._lock:
            self.server_load = report

    def latency_estimate(self, now: float) -> float | None:
        """The latency EWMA, decayed toward zero since its last sample."""
        ewma = self.latency_ewma_s
        if ewma is None:
            return None
        return ewma * math.exp(-max(0.0, now - self.latency_at) / LATENCY_DECAY_S)

    def back_off(self, until: float) -> None:
        """Keep calls away until ``until`` (the server's Retry-After)."""
        with self._lock:
            self.backoff_until = max(self.backoff_until, until)

    def set_health(self, health: Health, error: str | None = None) -> None:
        """Record an active probe's verdict."""
        with self._lock:
            self.health = health
            if error is not None:
                self.last_error = error

    def status(self, now: float) -> EndpointStatus:
        """Snapshot for ``pool_status()``."""
        report = self.server_load
        with self._lock:
            return EndpointStatus(
                name=self.name,
                url=self.url,
                kind=self.kind or f"auto ({self.kind_error or 'undetected'})",
                health=self.health,
                breaker=self.breaker.state,
                in_flight=self.in_flight,
                max_in_flight=self.cap,
                latency_ewma_s=self.latency_ewma_s,
                models=tuple(self.logical_names()),
                loaded=tuple(sorted(self.loaded)),
                last_error=self.last_error,
                calls=self.calls,
                failures=self.failures,
                backoff_s=max(0.0, self.backoff_until - now),
                aliases=dict(self.aliases),
                in_flight_tokens=self.in_flight_tokens,
                load=self.load(now),
                server_running=None if report is None else report.running,
                server_waiting=None if report is None else report.waiting,
                server_load_age_s=None if report is None else max(0.0, now - report.at),
                server_load_source=None if report is None else report.source,
                adaptive=self.adaptive is not None,
            )
