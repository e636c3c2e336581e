"""Adaptive concurrency (``max_in_flight="adaptive"``) against a simulated engine, with a
scripted clock: the learned limit follows the engine's slot count up and down."""

from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass, field

import pytest

from shared_ollama import ConfigError, Endpoint
from shared_ollama.config import AdaptivePolicy, PoolConfig, load_config
from shared_ollama.pool import Pool
from shared_ollama.pool.adaptive import AdaptiveLimit

PREFILL_S = 0.02  # time to first token once a slot is free
DECODE_S = 0.2  # the rest of a generation


@dataclass
class SimEngine:
    """``slots`` generations at once, the rest FIFO: a call's time to first chunk is its
    queue wait plus prefill (the engine model of the issue: service time x queue position
    over slots)."""

    slots: int
    busy_until: list[float] = field(default_factory=list)

    def admit(self, arrival: float) -> tuple[float, float]:
        """(time to first chunk, end) of a call arriving now (calls arrive in time order)."""
        self.busy_until.sort()
        if len(self.busy_until) < self.slots:
            start = arrival
        else:
            # FIFO: the call takes the slot that frees first among the last ``slots`` ends.
            start = max(arrival, self.busy_until[len(self.busy_until) - self.slots])
        end = start + PREFILL_S + DECODE_S
        self.busy_until.append(end)
        self.busy_until = [t for t in self.busy_until if t > arrival] or []
        return start + PREFILL_S - arrival, end


def run_phase(limiter: AdaptiveLimit, engine: SimEngine, start: float,
              calls: int) -> tuple[float, list[int]]:  # fmt: skip
    """A client with an endless backlog keeps ``limiter.limit`` calls in flight for
    ``calls`` completions; returns the clock at the end and the limit after each one."""
    now = start
    events: list[tuple[float, int, float, float]] = []  # (end, seq, started, ttft)
    seq = 0
    limits: list[int] = []
    while len(limits) < calls:
        while len(events) < limiter.limit:
            ttft, end = engine.admit(now)
            heapq.heappush(events, (end, seq, now, ttft))
            seq += 1
        end, _, started, ttft = heapq.heappop(events)
        now = end
        limiter.sample(ttft, started=started, now=now, in_flight=len(events) + 1)
        limits.append(limiter.limit)
    # The calls still in flight finish before the next phase (their samples are old news).
    for end, _, _, _ in events:
        now = max(now, end)
    return now, limits


def settled(limits: list[int]) -> float:
    """The limit's typical value over the last half of a phase."""
    return statistics.median(limits[len(limits) // 2 :])


def test_limit_follows_the_engine_slot_count_up_and_down() -> None:
    policy = AdaptivePolicy(min_limit=1, max_limit=64, initial_limit=4)
    limiter = AdaptiveLimit(policy)
    engine = SimEngine(slots=4)
    now, first = run_phase(limiter, engine, 0.0, 600)
    assert 3 <= settled(first) <= 7, first[-50:]
    engine.slots = 16  # the server got more parallel slots mid-run
    now, up = run_phase(limiter, engine, now, 1500)
    assert 13 <= settled(up) <= 20, up[-50:]
    engine.slots = 2  # ... and then far fewer
    now, down = run_phase(limiter, engine, now, 600)
    assert 1 <= settled(down) <= 4, down[-50:]
    assert limiter.congested > 0 and limiter.samples == 2700


def test_limit_stays_in_bounds_and_does_not_grow_while_unused() -> None:
    limiter = AdaptiveLimit(AdaptivePolicy(min_limit=2, max_limit=5, initial_limit=3))
    # A flood of queueing samples: never below min_limit.
    for i in range(200):
        limiter.sample(0.01, started=float(i), now=float(i) + 0.5, in_flight=1)
        limiter.sample(5.0, started=float(i), now=float(i) + 0.5, in_flight=3)
    assert limiter.limit == 2
    # Fast samples but only one call in flight: headroom unused, the limit does not grow.
    for i in range(200, 400):
        limiter.sample(0.01, started=float(i), now=float(i) + 0.1, in_flight=1)
    assert limiter.limit == 2
    # Used to the full: grows, but never past max_limit.
    for i in range(400, 2000):
        limiter.sample(0.01, started=float(i), now=float(i) + 0.1, in_flight=limiter.limit)
    assert limiter.limit == 5


def test_a_burst_of_late_samples_cuts_once_per_round_trip() -> None:
    limiter = AdaptiveLimit(AdaptivePolicy(initial_limit=10, max_limit=10))
    limiter.sample(0.01, started=0.0, now=0.1, in_flight=10)
    for _ in range(5):  # five calls sent before the cut, all late: one cut
        limiter.sample(1.0, started=0.2, now=2.0, in_flight=10)
    assert limiter.limit == 9
    limiter.overloaded(started=2.5, now=3.0)  # a 503 after the cut: cut again
    assert limiter.limit == 8


def test_server_queue_time_is_the_signal_where_reported() -> None:
    limiter = AdaptiveLimit(AdaptivePolicy(initial_limit=8, max_limit=8))
    # A long first chunk with no queue time (a long prompt) is not queueing.
    limiter.sample(0.05, started=0.0, now=1.0, in_flight=8, queue_s=0.0)
    limiter.sample(0.5, started=1.0, now=2.0, in_flight=8, queue_s=0.0)
    assert limiter.limit == 8 and limiter.congested == 0
    limiter.sample(0.5, started=2.0, now=3.0, in_flight=8, queue_s=0.4)
    assert limiter.limit == 7 and limiter.congested == 1


def test_adaptive_endpoint_caps_at_the_learned_limit_and_shows_it() -> None:
    ep = Endpoint("http://127.0.0.1:1", kind="ollama", models=["m"], max_in_flight="adaptive")
    cfg = PoolConfig(endpoints=[ep], adaptive=AdaptivePolicy(initial_limit=2))
    pool = Pool(cfg)
    state = pool.endpoints[0]
    assert state.adaptive is not None and state.cap == 2
    assert state.try_acquire() and state.try_acquire() and not state.try_acquire()
    assert pool.free_slots("m", "chat", 0.0) == 0
    status = pool.status(0.0)[0]
    assert status.adaptive and status.max_in_flight == 2
    assert status.as_dict()["adaptive"] is True


@pytest.mark.parametrize(
    "bad",
    [
        {"min_limit": 5, "initial_limit": 2},
        {"initial_limit": 100, "max_limit": 10},
        {"tolerance": 1.0},
        {"backoff": 1.5},
    ],
)
def test_bad_adaptive_policy_is_a_config_error(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        load_config(env={}, adaptive=bad)


@pytest.mark.parametrize("bad", ["auto", 0, -1, 1.5])
def test_bad_max_in_flight_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError):
        Endpoint("http://127.0.0.1:1", max_in_flight=bad)
