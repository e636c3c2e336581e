"""Session and prefix affinity: consistent hashing with bounded loads.

A call with a routing key goes to the same endpoint as the calls before it with that key,
where the server's prompt (KV) cache still holds their prefix, unless that endpoint is
over its share of the load. The ring has virtual nodes per endpoint (more for a higher
``weight``); a key takes the first endpoint clockwise from its hash whose load, with this
call, is at most ``ceil((1 + eps) x`` its weighted share of the candidates' load``)``, else
spills to the next one on the ring (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing
with Bounded Loads", 2018). Removing an endpoint moves only its own keys; adding one takes
about 1/N of them.

Only a short hash of a key is ever kept: a session name or a prompt can be user data.
"""

from __future__ import annotations

import bisect
import math
import random
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

from .endpoint import EndpointState

if TYPE_CHECKING:
    from .router import Pick, RouteRequest

__all__ = ["Affinity", "HashRing", "key_hash", "routing_key"]

#: Virtual nodes of an endpoint of weight 1: enough for an even split of the ring.
VNODES = 160
_MAX_VNODES = 2000
#: Rings kept, by candidate set (the eligible subset changes as endpoints come and go).
_RING_CACHE = 32
#: A generate prompt is keyed on its start: later calls share the prefix, not the end.
PROMPT_PREFIX_CHARS = 512


def key_hash(key: str) -> str:
    """A short, stable hash of a routing key (16 hex digits): what is recorded."""
    data = key.encode("utf-8", "surrogatepass")
    return blake2b(data, digest_size=8, person=b"so-route").hexdigest()


def routing_key(
    *,
    session: str | None,
    options: Mapping[str, Any] | None,
    system: str | None,
    first_user: str | None,
) -> str | None:
    """The routing key's hash: ``session``, else OpenAI's ``prompt_cache_key`` or ``user``
    passed in ``options``, else the system prompt with the first user message (or prompt
    prefix); None when there is nothing to key on."""
    if session:
        return key_hash("session\x00" + session)
    if options:
        for name in ("prompt_cache_key", "user"):
            value = options.get(name)
            if isinstance(value, str) and value:
                return key_hash(f"{name}\x00{value}")
    system = system if isinstance(system, str) else ""
    first_user = first_user if isinstance(first_user, str) else ""
    if not system and not first_user:
        return None
    return key_hash(f"prefix\x00{system}\x00{first_user}")


def _point(text: str) -> int:
    return int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Sorted virtual-node points of some endpoints (by URL)."""

    def __init__(self, members: Sequence[tuple[str, float]]) -> None:
        points: list[tuple[int, str]] = []
        for url, weight in members:
            count = min(_MAX_VNODES, max(1, round(VNODES * weight)))
            points.extend((_point(f"{url}#{i}"), url) for i in range(count))
        points.sort()
        self._hashes = [h for h, _ in points]
        self._urls = [u for _, u in points]
        self.size = len({u for u, _ in members})

    def walk(self, key: str) -> list[str]:
        """Every member once, in ring order clockwise from ``key``'s point."""
        if not self._urls:
            return []
        start = bisect.bisect(self._hashes, int(key, 16))
        order: dict[str, None] = {}
        n = len(self._urls)
        for i in range(n):
            order.setdefault(self._urls[(start + i) % n], None)
            if len(order) == self.size:
                break
        return list(order)


def _in_memory(ep: EndpointState, model: str) -> bool:
    # Engines with no loaded-model list (vLLM, llama.cpp, TGI) hold what they serve.
    return ep.is_loaded(model) or (ep.codec is not None and ep.codec.ps() is None)


class Affinity:
    """The ``affinity`` strategy: consistent hashing with bounded loads.

    A call without a key is routed least-loaded. Where some candidates have the model in
    memory and some do not (Ollama's ``/api/ps``; other engines hold what they serve), the
    loaded ones are walked first.
    """

    def __init__(self, eps: float = 0.25) -> None:
        if eps <= 0:
            raise ValueError("affinity eps must be > 0")
        self.eps = eps
        self._rings: OrderedDict[tuple[tuple[str, float], ...], HashRing] = OrderedDict()
        self._lock = threading.Lock()
        from .router import LeastLoaded

        self._fallback = LeastLoaded()

    def ring(self, candidates: Sequence[EndpointState]) -> HashRing:
        """The ring of these candidates (cached)."""
        members = tuple(sorted((ep.url, ep.config.weight) for ep in candidates))
        with self._lock:
            ring = self._rings.get(members)
            if ring is not None:
                self._rings.move_to_end(members)
                return ring
        ring = HashRing(members)
        with self._lock:
            self._rings[members] = ring
            while len(self._rings) > _RING_CACHE:
                self._rings.popitem(last=False)
        return ring

    def bound(self, total: float, weights: float, ep: EndpointState) -> float:
        """The most load ``ep`` may carry: ceil((1+eps) x its weighted share of ``total``)
        (the candidates' load with this call; ``weights`` is the sum of their weights)."""
        return math.ceil((1 + self.eps) * total * ep.config.weight / weights)

    def pick(
        self,
        candidates: Sequence[EndpointState],
        request: RouteRequest,
        rng: random.Random,
        now: float,
    ) -> Pick:
        """The key's first ring endpoint within its load bound, loaded models first."""
        from .router import Pick

        if request.key is None:
            return self._fallback.pick(candidates, request, rng, now)
        by_url = {ep.url: ep for ep in candidates}
        order = [by_url[u] for u in self.ring(candidates).walk(request.key)]
        loaded = [ep for ep in order if _in_memory(ep, request.model)]
        if loaded and len(loaded) < len(order):
            order = loaded + [ep for ep in order if ep not in loaded]
        loads = {ep.url: ep.load(now) for ep in order}
        total = sum(loads.values()) + 1  # this call included
        weights = sum(ep.config.weight for ep in order)
        for i, ep in enumerate(order):
            if loads[ep.url] + 1 <= self.bound(total, weights, ep):
                return Pick(ep, "affinity" if i == 0 else "spill")
        # Only loads read from the servers (fractions) can put everyone over: least loaded.
        best = min(order, key=lambda ep: loads[ep.url] / ep.config.weight)
        return Pick(best, "affinity" if best is order[0] else "spill")
