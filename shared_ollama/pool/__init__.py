"""The shared pool: endpoint state, routing strategies, breakers and health checks."""

from .affinity import Affinity, HashRing, key_hash, routing_key
from .breaker import BreakerState, EndpointBreaker
from .endpoint import EndpointState, EndpointStatus, Health
from .health import AUTO_PROBES, AutoProbe, detect_kind, next_probe_delay
from .pool import Choice, Pool, Unavailable
from .router import (
    LeastLoaded,
    Pick,
    Priority,
    RoundRobin,
    RouteRequest,
    Strategy,
    Weighted,
    make_strategy,
)
from .signals import ServerLoad, busy_slots, parse_prometheus, server_load

__all__ = [
    "AUTO_PROBES",
    "Affinity",
    "AutoProbe",
    "BreakerState",
    "Choice",
    "EndpointBreaker",
    "EndpointState",
    "EndpointStatus",
    "HashRing",
    "Health",
    "LeastLoaded",
    "Pick",
    "Pool",
    "Priority",
    "RoundRobin",
    "RouteRequest",
    "ServerLoad",
    "Strategy",
    "Unavailable",
    "Weighted",
    "busy_slots",
    "detect_kind",
    "key_hash",
    "make_strategy",
    "next_probe_delay",
    "parse_prometheus",
    "routing_key",
    "server_load",
]
