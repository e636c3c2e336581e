"""The shared pool: endpoint state, routing strategies, breakers and health checks."""

from .breaker import BreakerState, EndpointBreaker
from .endpoint import EndpointState, EndpointStatus, Health
from .health import AUTO_PROBES, AutoProbe, detect_kind, next_probe_delay
from .pool import Choice, Pool, Unavailable
from .router import LeastLoaded, Priority, RoundRobin, Strategy, Weighted, make_strategy

__all__ = [
    "AUTO_PROBES",
    "AutoProbe",
    "BreakerState",
    "Choice",
    "EndpointBreaker",
    "EndpointState",
    "EndpointStatus",
    "Health",
    "LeastLoaded",
    "Pool",
    "Priority",
    "RoundRobin",
    "Strategy",
    "Unavailable",
    "Weighted",
    "detect_kind",
    "make_strategy",
    "next_probe_delay",
]
