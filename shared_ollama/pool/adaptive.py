"""Adaptive concurrency for one endpoint (``max_in_flight="adaptive"``) — free of I/O.

AIMD on queueing delay: the signal is each call's time to first chunk (or the server's own
queue time where it reports one), never whole-call latency, which swings with output
length. While first chunks come within ``tolerance`` x the no-queue baseline and the limit
is in use, it grows by one per limit's worth of samples; a later first chunk means calls
queue inside the server, and the limit shrinks by ``backoff`` — at most once per round
trip, so one burst of late samples counts once. The baseline is the fastest sample seen,
drifting up (x2 per ``window`` samples none as fast) so that it follows a server grown
slower for good, yet never so fast that a queue that stays becomes the new normal. Time
comes in as arguments.
"""

from __future__ import annotations

import math
import threading

from ..config import AdaptivePolicy

__all__ = ["AdaptiveLimit"]


class AdaptiveLimit:
    """The learned in-flight cap of one endpoint."""

    def __init__(self, policy: AdaptivePolicy) -> None:
        self.policy = policy
        self._limit = float(policy.initial_limit)
        self._baseline: float | None = None
        self._drift = 2.0 ** (1.0 / policy.window)
        self._decreased_at = -math.inf
        self._lock = threading.Lock()
        #: Samples taken, and how many of them found the server queueing.
        self.samples = 0
        self.congested = 0

    @property
    def limit(self) -> int:
        """The current cap, within the policy's bounds."""
        p = self.policy
        return max(p.min_limit, min(p.max_limit, math.floor(self._limit)))

    @property
    def baseline_s(self) -> float | None:
        """The no-queue first-chunk latency (least recent sample), once there is one."""
        return self._baseline

    def sample(
        self,
        ttft_s: float,
        *,
        started: float,
        now: float,
        in_flight: int,
        queue_s: float | None = None,
    ) -> None:
        """Learn from one call: its first chunk came ``ttft_s`` after it was sent at
        ``started``; ``in_flight`` calls (itself included) held slots as it ended;
        ``queue_s`` is the server's own queue time where it reports one."""
        if not math.isfinite(ttft_s) or ttft_s < 0:
            return
        p = self.policy
        with self._lock:
            self.samples += 1
            unqueued = ttft_s if queue_s is None else max(0.0, ttft_s - queue_s)
            prev = self._baseline
            baseline = unqueued if prev is None else min(unqueued, prev * self._drift)
            self._baseline = baseline
            allowed = (p.tolerance - 1.0) * baseline + p.slack_s
            delay = ttft_s - baseline if queue_s is None else queue_s
            if delay > allowed:
                self.congested += 1
                self._cut(started, now)
            elif in_flight >= self.limit:
                # Grow only when the limit is what held calls back, not idle headroom.
                self._limit = min(float(p.max_limit), self._limit + 1.0 / max(1.0, self._limit))

    def overloaded(self, *, started: float, now: float) -> None:
        """The server refused a call as overloaded (a 503 queue full, a 429): cut now."""
        with self._lock:
            self.congested += 1
            self._cut(started, now)

    def _cut(self, started: float, now: float) -> None:
        # Calls sent before the last cut saw the old limit: they say nothing new.
        if started >= self._decreased_at:
            self._limit = max(float(self.policy.min_limit), self._limit * self.policy.backoff)
            self._decreased_at = now
