"""Session and prefix affinity: consistent hashing with bounded loads.

A call with a routing key goes to the same endpoint as the calls before it with that key,
where the server's prompt (KV) cache still holds their prefix, unless that endpoint is
over its share of the load. The ring has virtual nodes per endpoint (more for a higher
``weight``). A key seen for the first time (or not for ``ttl_s``) is placed on the first
endpoint clockwise from its hash that is within ``ceil((1 + eps) x`` its weighted share``)``
of both the calls in flight and the open sessions (keys placed within ``ttl_s``), then stays
there: Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads" (2018),
where the balls are the sessions. Sessions, not only calls in flight, are bounded because a
conversation keeps its prefix in its server's cache between turns: with a few calls in
flight at a time, bounding those alone lets the hash put most sessions on one server. A
call whose home is over its share of the calls in flight spills to the next ring endpoint
within it, and the session keeps its home. A session whose home cannot take calls at all
now (at its ``max_in_flight``, breaker open, removed) moves to where its call goes, which then
holds its latest prompt. Removing an endpoint moves only its own keys.

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


class _Homes:
    """Where each open session lives: key -> (endpoint URL, last seen), oldest first."""

    def __init__(self, ttl_s: float, cap: int) -> None:
        self.ttl_s = ttl_s
        self.cap = cap
        self.homes: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.open: dict[str, int] = {}

    def expire(self, now: float) -> None:
        """Forget sessions not seen for ``ttl_s`` (and the oldest past ``cap``)."""
        homes = self.homes
        while homes:
            key, (url, seen) = next(iter(homes.items()))
            if seen >= now - self.ttl_s and len(homes) <= self.cap:
                return
            del homes[key]
            self.open[url] -= 1

    def place(self, key: str, url: str, now: float) -> None:
        """``key`` lives at ``url`` from now on (seen now)."""
        old = self.homes.pop(key, None)
        if old is not None:
            self.open[old[0]] -= 1
        self.homes[key] = (url, now)
        self.open[url] = self.open.get(url, 0) + 1


class Affinity:
    """The ``affinity`` strategy: consistent hashing with bounded loads.

    A call without a key is routed least-loaded. Where some candidates have the model in
    memory and some do not (Ollama's ``/api/ps``; other engines hold what they serve), the
    loaded ones are walked first.
    """

    def __init__(
        self, eps: float = 0.25, *, ttl_s: float = 600.0, max_sessions: int = 100_000
    ) -> None:
        if eps <= 0:
            raise ValueError("affinity eps must be > 0")
        self.eps = eps
        self._rings: OrderedDict[tuple[tuple[str, float], ...], HashRing] = OrderedDict()
        self._homes = _Homes(ttl_s, max_sessions)
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

    def home(self, key: str) -> str | None:
        """The URL of the endpoint where the session ``key`` (a hash) lives, if open."""
        with self._lock:
            entry = self._homes.homes.get(key)
        return None if entry is None else entry[0]

    def pick(
        self,
        candidates: Sequence[EndpointState],
        request: RouteRequest,
        rng: random.Random,
        now: float,
    ) -> Pick:
        """The session's home, else the key's first ring endpoint within both bounds."""
        from .router import Pick

        key = request.key
        if key is None:
            return self._fallback.pick(candidates, request, rng, now)
        by_url = {ep.url: ep for ep in candidates}
        order = [by_url[u] for u in self.ring(candidates).walk(key)]
        loaded = [ep for ep in order if _in_memory(ep, request.model)]
        # Sessions are spread over the endpoints with the model in memory where only some
        # have it (loading it elsewhere costs more than a cold prompt cache).
        settled = order
        if loaded and len(loaded) < len(order):
            settled = loaded
            order = loaded + [ep for ep in order if ep not in loaded]
        loads = {ep.url: ep.load(now) for ep in order}
        total = sum(loads.values()) + 1  # this call included
        weights = sum(ep.config.weight for ep in order)

        def fits(ep: EndpointState) -> bool:
            return loads[ep.url] + 1 <= self.bound(total, weights, ep)

        with self._lock:
            homes = self._homes
            homes.expire(now)
            entry = homes.homes.get(key)
            home = None if entry is None else by_url.get(entry[0])
            if home is not None and home in settled:
                homes.place(key, home.url, now)
                if fits(home):
                    return Pick(home, "affinity")
                # Over its share of the calls in flight: this call spills, the session stays.
                spill = next((ep for ep in order if ep is not home and fits(ep)), home)
                return Pick(spill, "spill" if spill is not home else "affinity")
            # A new session (or one whose home is gone): the first ring endpoint within its
            # share of both the open sessions and the calls in flight, then the calls alone.
            open_ = homes.open
            sessions = sum(open_.get(ep.url, 0) for ep in settled) + 1
            share = sum(ep.config.weight for ep in settled)
            chosen = next(
                (ep for ep in settled
                 if fits(ep) and open_.get(ep.url, 0) + 1 <= self.bound(sessions, share, ep)),
                None,
            )  # fmt: skip
            if chosen is None:
                chosen = next((ep for ep in order if fits(ep)), None)
            if chosen is None:
                # Only loads read from the servers (fractions) can put everyone over.
                chosen = min(order, key=lambda ep: loads[ep.url] / ep.config.weight)
            homes.place(key, chosen.url, now)
        # A session whose home cannot take this call (at its max_in_flight, breaker open,
        # removed) moves, and says so: its next calls go where this one's prompt is cached.
        moved = entry is not None and entry[0] != chosen.url
        return Pick(chosen, "spill" if moved or chosen is not order[0] else "affinity")
