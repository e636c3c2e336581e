"""Active health checks and protocol auto-detection, as pure decisions.

The drivers send the requests these functions describe and feed the replies back; probes
run on a jittered interval so a fleet of clients does not probe in lockstep.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from ..config import HealthPolicy
from ..protocols import WireRequest, WireResponse
from ..protocols.decoders import JSON_ERRORS

__all__ = ["AUTO_PROBES", "AutoProbe", "detect_kind", "next_probe_delay"]


@dataclass(frozen=True, slots=True)
class AutoProbe:
    """One request that identifies a protocol when its reply has the expected shape."""

    kind: str
    request: WireRequest
    key: str  # a JSON key the reply must have


# Order matters: llama.cpp also answers /v1/models with an Ollama-like "models" list, so
# the Ollama probe uses /api/version, which only Ollama serves; TGI's /info has model_id.
AUTO_PROBES: tuple[AutoProbe, ...] = (
    AutoProbe("ollama", WireRequest("GET", "/api/version"), "version"),
    AutoProbe("tgi", WireRequest("GET", "/info"), "model_id"),
    AutoProbe("openai", WireRequest("GET", "/v1/models"), "data"),
)


def detect_kind(probe: AutoProbe, resp: WireResponse) -> str | None:
    """The protocol ``probe`` proves, if ``resp`` has the expected shape."""
    if resp.status != 200:
        return None
    try:
        body = json.loads(resp.body)
    except JSON_ERRORS:
        return None
    return probe.kind if isinstance(body, dict) and probe.key in body else None


def next_probe_delay(policy: HealthPolicy, rng: random.Random) -> float:
    """Interval with +-jitter, so many clients spread their probes."""
    spread = policy.interval_s * policy.jitter
    return max(0.0, policy.interval_s + rng.uniform(-spread, spread))
