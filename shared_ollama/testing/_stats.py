"""Counters of a FakeEngine: written by the server thread, read as frozen snapshots anywhere.
Waiting on a condition of the counters replaces sleeps in tests."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

__all__ = ["EngineStats", "StatsRecorder"]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of a FakeEngine's counters since start or ``reset_stats()``.

    Calling a snapshot returns itself, so ``engine.stats.x`` and ``engine.stats().x`` agree.
    """

    requests: Mapping[str, int] = field(default_factory=dict)  # by URL path
    responses: Mapping[int, int] = field(default_factory=dict)  # by HTTP status
    in_flight: int = 0  # generations holding a slot now
    max_in_flight: int = 0
    queued: int = 0  # generations waiting for a slot now
    max_queued: int = 0
    overloaded: int = 0  # requests refused because the queue was full
    prompt_tokens: int = 0
    #: Prompt tokens the prefix cache served, and tokens it evicted (see ``TimingModel``).
    cached_tokens: int = 0
    cache_evicted_tokens: int = 0
    tokens_generated: int = 0
    generations: int = 0  # generations (and embeddings) that ran to their end
    streams_aborted: int = 0  # streaming requests whose client went away before the end
    requests_aborted: int = 0  # any request whose client went away before the end
    faults_fired: Mapping[str, int] = field(default_factory=dict)  # by fault action

    def __call__(self) -> EngineStats:
        return self

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def total_faults(self) -> int:
        return sum(self.faults_fired.values())

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (status keys become strings)."""
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        data["requests"] = dict(self.requests)
        data["responses"] = {str(k): v for k, v in self.responses.items()}
        data["faults_fired"] = dict(self.faults_fired)
        return data


class StatsRecorder:
    """Thread-safe counters behind ``EngineStats``, with a condition to wait on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._requests: Counter[str] = Counter()
        self._responses: Counter[int] = Counter()
        self._faults: Counter[str] = Counter()
        self._n: Counter[str] = Counter()
        self._in_flight = 0
        self._queued = 0

    def request(self, path: str) -> None:
        with self._cond:
            self._requests[path] += 1
            self._cond.notify_all()

    def response(self, status: int) -> None:
        with self._cond:
            self._responses[status] += 1
            self._cond.notify_all()

    def fault(self, action: str) -> None:
        with self._cond:
            self._faults[action] += 1
            self._cond.notify_all()

    def add(self, name: str, n: int = 1) -> None:
        """Bump a plain counter: prompt_tokens, cached_tokens, tokens_generated, ..."""
        with self._cond:
            self._n[name] += n
            self._cond.notify_all()

    def slots(self, in_flight: int, queued: int) -> None:
        """Record the slot gauges; maxima follow."""
        with self._cond:
            self._in_flight, self._queued = in_flight, queued
            self._n["max_in_flight"] = max(self._n["max_in_flight"], in_flight)
            self._n["max_queued"] = max(self._n["max_queued"], queued)
            self._cond.notify_all()

    def reset(self) -> None:
        """Zero the counters; gauges keep their live values and maxima restart from them."""
        with self._cond:
            self._requests.clear()
            self._responses.clear()
            self._faults.clear()
            self._n.clear()
            self._n["max_in_flight"], self._n["max_queued"] = self._in_flight, self._queued
            self._cond.notify_all()

    def snapshot(self) -> EngineStats:
        with self._cond:
            return self._snapshot()

    def wait(self, predicate: Callable[[EngineStats], bool], timeout: float) -> EngineStats:
        """Block until ``predicate(snapshot)`` holds; ``TimeoutError`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(snap := self._snapshot()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"engine stats never matched; last: {snap}")
                self._cond.wait(left)
            return snap

    def _snapshot(self) -> EngineStats:
        n = self._n
        return EngineStats(
            requests=MappingProxyType(dict(self._requests)),
            responses=MappingProxyType(dict(self._responses)),
            in_flight=self._in_flight,
            max_in_flight=n["max_in_flight"],
            queued=self._queued,
            max_queued=n["max_queued"],
            overloaded=n["overloaded"],
            prompt_tokens=n["prompt_tokens"],
            cached_tokens=n["cached_tokens"],
            cache_evicted_tokens=n["cache_evicted_tokens"],
            tokens_generated=n["tokens_generated"],
            generations=n["generations"],
            streams_aborted=n["streams_aborted"],
            requests_aborted=n["requests_aborted"],
            faults_fired=MappingProxyType(dict(self._faults)),
        )
