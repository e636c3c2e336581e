"""Schedules: when requests are sent (arrival offsets in seconds), never how.

Pure: closed-loop concurrency (with ramp-up), open-loop constant or gamma/Poisson rates
(with ramp-up), sweep rate points and stop rules. The runner does the sleeping.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

__all__ = [
    "ClosedLoop",
    "OpenLoop",
    "PhasePlan",
    "Schedule",
    "Stop",
    "achieved_rate",
    "planned_arrivals",
    "sweep_rates",
]


@dataclass(frozen=True, slots=True)
class Stop:
    """When a phase ends: after ``requests`` sends or ``duration_s`` seconds, first wins."""

    requests: int | None = None
    duration_s: float | None = None

    def __post_init__(self) -> None:
        if self.requests is None and self.duration_s is None:
            raise ValueError("a phase needs a request count or a duration")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be at least 1")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("duration must be positive")


@dataclass(frozen=True, slots=True)
class ClosedLoop:
    """``concurrency`` workers, each sending its next request when the last one ends."""

    concurrency: int
    #: Workers start evenly spread over this many seconds.
    ramp_s: float = 0.0

    def start_offsets(self) -> list[float]:
        """When each worker starts, in seconds from the phase start."""
        step = self.ramp_s / self.concurrency
        return [i * step for i in range(self.concurrency)]

    def label(self) -> str:
        """Short name for tables and plots."""
        return f"c={self.concurrency}"


@dataclass(frozen=True, slots=True)
class OpenLoop:
    """Requests sent at planned times whatever the replies do (no coordinated omission).

    ``constant``: every 1/rate seconds. ``poisson``: gamma inter-arrivals with mean 1/rate
    and shape ``burstiness`` (1: exponential, i.e. Poisson; below 1: burstier, CV =
    1/sqrt(burstiness)). ``ramp_s``: the rate grows linearly from 0 to ``rate`` first.
    """

    rate: float
    arrival: Literal["constant", "poisson"] = "poisson"
    burstiness: float = 1.0
    ramp_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError("rate must be positive")
        if not self.burstiness > 0:
            raise ValueError("burstiness must be positive")

    def arrivals(self, rng: random.Random) -> Iterator[float]:
        """Arrival offsets in seconds, ascending, the first at 0 (an endless iterator)."""
        s, n = 0.0, 0  # time on the steady-rate clock; arrivals so far
        while True:
            yield self._ramped(s)
            n += 1
            if self.arrival == "constant":
                s = n / self.rate  # not a running sum: no drift from rounding
            else:
                s += rng.gammavariate(self.burstiness, 1.0 / (self.rate * self.burstiness))

    def _ramped(self, s: float) -> float:
        # Time rescaling: the steady clock's s holds rate*s expected arrivals; find the t at
        # which the ramped rate r*min(1, t/ramp) has accumulated as many.
        ramp = self.ramp_s
        if ramp <= 0:
            return s
        if s < ramp / 2:
            return math.sqrt(2 * s * ramp)
        return ramp + (s - ramp / 2)

    def label(self) -> str:
        """Short name for tables and plots."""
        return f"{self.rate:g}/s"


Schedule: TypeAlias = ClosedLoop | OpenLoop


@dataclass(frozen=True, slots=True)
class PhasePlan:
    """One measured phase: a schedule, a stop rule and a name."""

    name: str
    schedule: Schedule
    stop: Stop


def planned_arrivals(schedule: OpenLoop, stop: Stop, rng: random.Random) -> list[float]:
    """The open-loop send offsets of a phase: up to ``stop.requests``, before the duration."""
    out: list[float] = []
    limit = stop.requests if stop.requests is not None else math.inf
    for t in schedule.arrivals(rng):
        if len(out) >= limit or (stop.duration_s is not None and t >= stop.duration_s):
            break
        out.append(t)
    return out


def sweep_rates(sync_rate: float, max_rate: float, points: int) -> list[float]:
    """``points`` rates evenly spaced from the synchronous to the saturated rate.

    As guidellm's sweep: the ends were measured by a concurrency-1 and a saturating phase;
    the points in between are strictly inside, so they probe the curve's knee.
    """
    if points < 1:
        raise ValueError("a sweep needs at least one point")
    lo, hi = sorted((sync_rate, max_rate))
    if lo <= 0:
        raise ValueError("sweep ends must be positive rates")
    step = (hi - lo) / (points + 1)
    return [lo + step * (i + 1) for i in range(points)]


def achieved_rate(send_times_ns: Sequence[int]) -> float | None:
    """Sends per second over the span of the actual send times (None under two sends)."""
    if len(send_times_ns) < 2:
        return None
    span = (max(send_times_ns) - min(send_times_ns)) / 1e9
    return (len(send_times_ns) - 1) / span if span > 0 else None
