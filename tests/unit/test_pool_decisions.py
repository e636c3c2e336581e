"""Pure routing, breaker, retry-budget and plan decisions, with time passed in."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tenacity import RetryCallState, Retrying

from shared_ollama import (
    BreakerPolicy,
    CircuitOpen,
    ConnectError,
    Endpoint,
    InvalidRequest,
    ModelNotFound,
    NoEndpointAvailable,
    PoolConfig,
    RateLimited,
    RetryPolicy,
    ServerError,
    Timeouts,
)
from shared_ollama._core.plan import CallPlan, RetryBudget, WaitingForEndpoint, full_jitter
from shared_ollama.pool import Choice, Pool, Unavailable


def make_pool(*endpoints: Endpoint, strategy: str = "least_loaded", seed: int = 1) -> Pool:
    cfg = PoolConfig(
        endpoints=list(endpoints),
        strategy=strategy,  # type: ignore[arg-type]
        breaker=BreakerPolicy(failure_threshold=3, reset_timeout_s=10),
    )
    return Pool(cfg, rng=random.Random(seed))


def ep(port: int, **kw: object) -> Endpoint:
    kw.setdefault("kind", "ollama")
    kw.setdefault("models", ["m"])
    return Endpoint(f"http://127.0.0.1:{port}", **kw)  # type: ignore[arg-type]


def picks(pool: Pool, n: int, model: str = "m") -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(n):
        choice = pool.choose(model, "chat", now=0.0)
        assert isinstance(choice, Choice)
        out[choice.endpoint.url.rsplit(":", 1)[1]] += 1
    return out


def test_round_robin_spreads_evenly() -> None:
    pool = make_pool(ep(1), ep(2), ep(3), strategy="round_robin")
    assert picks(pool, 300) == {"1": 100, "2": 100, "3": 100}


def test_weighted_follows_weights_exactly() -> None:
    pool = make_pool(ep(1, weight=1), ep(2, weight=3), strategy="weighted")
    assert picks(pool, 400) == {"1": 100, "2": 300}


def test_priority_uses_next_tier_only_when_first_is_unavailable() -> None:
    pool = make_pool(ep(1, priority=0), ep(2, priority=1), strategy="priority")
    assert picks(pool, 50) == {"1": 50}
    primary = pool.endpoints[0]
    for _ in range(3):
        primary.breaker.record_failure(ConnectError("down"), 0.0)
    assert primary.breaker.state == "open"
    assert picks(pool, 50) == {"2": 50}


def test_least_loaded_prefers_idle_and_loaded_model() -> None:
    pool = make_pool(ep(1), ep(2))
    busy, idle = pool.endpoints
    busy.in_flight = 10
    assert picks(pool, 100) == {"2": 100}
    busy.in_flight = idle.in_flight = 0
    busy.set_loaded(["m"])
    assert picks(pool, 100) == {"1": 100}


def test_least_loaded_balances_equal_endpoints() -> None:
    pool = make_pool(ep(1), ep(2), ep(3), ep(4))
    counts = picks(pool, 4000)
    assert set(counts) == {"1", "2", "3", "4"}
    assert min(counts.values()) > 600  # random pairs: every endpoint gets a fair share


def test_model_aliases_and_discovery() -> None:
    pool = make_pool(
        ep(1, models={"llama": "meta/Llama-3"}), ep(2, models={}), ep(3, kind="tgi", models={})
    )
    a, b, c = pool.endpoints
    a.set_models([])  # listed: only its alias
    b.set_models(["llama:latest", "other"])
    c.set_models(["tgi-model"])
    assert a.served_name("llama") == "meta/Llama-3"
    assert b.served_name("llama") == "llama"
    assert c.served_name("llama") is None
    assert a.logical_for("meta/Llama-3") == "llama"
    result = pool.choose("nope", "chat", 0.0)
    assert isinstance(result, Unavailable) and not result.model_known
    assert "does not serve" in result.reasons[c.name]


def test_operation_support_filters_endpoints() -> None:
    pool = make_pool(ep(1, kind="tgi"), ep(2, kind="ollama"))
    for _ in range(20):
        choice = pool.choose("m", "embed", 0.0)
        assert isinstance(choice, Choice) and choice.endpoint.kind == "ollama"


def test_in_flight_cap_saturates_and_reports_why() -> None:
    pool = make_pool(ep(1, max_in_flight=2))
    state = pool.endpoints[0]
    assert state.try_acquire() and state.try_acquire()
    assert not state.try_acquire()
    result = pool.choose("m", "chat", 0.0)
    assert isinstance(result, Unavailable) and result.retry_in is not None
    assert "saturated (2/2" in result.reasons[state.name]
    state.release(latency_s=0.1, error=None)
    assert isinstance(pool.choose("m", "chat", 0.0), Choice)


def test_retry_after_keeps_endpoint_out_until_then() -> None:
    pool = make_pool(ep(1), ep(2))
    a = pool.endpoints[0]
    a.back_off(until=5.0)
    assert picks(pool, 20) == {"2": 20}
    result = make_pool(ep(1)).choose("m", "chat", 0.0)
    assert isinstance(result, Choice)
    lone = make_pool(ep(1))
    lone.endpoints[0].back_off(until=5.0)
    waiting = lone.choose("m", "chat", 1.0)
    assert isinstance(waiting, Unavailable) and waiting.retry_in == pytest.approx(4.0)


# -- breaker ---------------------------------------------------------------------------
def test_breaker_counts_only_endpoint_faults() -> None:
    state = make_pool(ep(1)).endpoints[0]
    br = state.breaker
    for exc in (InvalidRequest("bad"), RateLimited("slow down"), ModelNotFound("x")):
        br.record_failure(exc, 0.0)  # type: ignore[arg-type]
    assert br.state == "closed" and br.failures == 0
    br.record_failure(ServerError("boom"), 0.0)
    br.record_failure(ConnectError("refused"), 0.0)
    assert br.failures == 2 and br.state == "closed"
    br.record_failure(ServerError("boom"), 0.0)
    assert br.state == "open"
    events = br.drain_events()
    assert [(e.old, e.new) for e in events] == [("closed", "open")]


def _age_open_breaker(br: object, seconds: float) -> None:
    # Move the opening time into the past instead of passing a later ``now`` everywhere.
    br._opened_at -= seconds  # type: ignore[attr-defined]


@contextmanager
def calling(br: Any, now: float = 0.0) -> Iterator[None]:
    """What the call steps do around one attempt: ``admit``, then ``settle`` its outcome."""
    probe = br.admit(now)
    try:
        yield
    except BaseException as exc:
        br.settle(probe, exc, now)
        raise
    br.settle(probe, None, now)


def test_breaker_waits_on_the_monotonic_clock_not_the_wall_clock() -> None:
    """A wall clock stepped back an hour (pybreaker's stamp now lies in the future) changes
    nothing: the breaker admits its probe after ``reset_timeout_s`` of monotonic time."""
    from shared_ollama.config import BreakerPolicy
    from shared_ollama.pool.breaker import EndpointBreaker

    br = EndpointBreaker("http://a", BreakerPolicy(failure_threshold=1, reset_timeout_s=10))
    br.record_failure(ServerError("boom"), 1000.0)
    assert br.state == "open"
    storage = br._cb._state_storage
    storage.opened_at = datetime.now(UTC) + timedelta(hours=1)  # the wall clock went back 1 h
    assert br.admits(1000.0)[0] is False and br.seconds_until_probe(1000.0) == pytest.approx(10)
    assert br.seconds_until_probe(1009.0) == pytest.approx(1.0)
    assert br.admits(1010.0) == (True, None)
    # A failure reported while it is open changes nothing (pybreaker would judge its own
    # wall-clock timeout here).
    br.record_failure(ServerError("boom"), 1010.0)
    assert br.state == "open" and br.admits(1010.0) == (True, None)


def test_breaker_half_open_admits_one_probe_then_closes() -> None:
    state = make_pool(ep(1)).endpoints[0]
    br = state.breaker
    for _ in range(3):
        br.record_failure(ServerError("boom"), 0.0)
    ok, why = br.admits(0.0)
    assert not ok and why is not None and "circuit open" in why
    _age_open_breaker(br, 11)
    assert br.admits(0.0) == (True, None)
    with calling(br):
        # While the probe is in flight nobody else is admitted.
        assert br.admits(0.0)[0] is False
        with pytest.raises(CircuitOpen), calling(br):
            pass
    assert br.state == "closed"
    assert [(e.old, e.new) for e in br.drain_events()][-2:] == [
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


def test_breaker_failed_probe_reopens() -> None:
    br = make_pool(ep(1)).endpoints[0].breaker
    for _ in range(3):
        br.record_failure(ServerError("boom"), 0.0)
    _age_open_breaker(br, 11)
    with pytest.raises(ServerError), calling(br):
        raise ServerError("still down")
    assert br.state == "open"


def test_breaker_cancelled_probe_changes_nothing() -> None:
    br = make_pool(ep(1)).endpoints[0].breaker
    for _ in range(3):
        br.record_failure(ServerError("boom"), 0.0)
    _age_open_breaker(br, 11)
    br.drain_events()
    # pybreaker alone would count the cancellation as a success and close the breaker.
    with pytest.raises(asyncio.CancelledError), calling(br):
        raise asyncio.CancelledError
    assert br.state == "half_open"
    assert [(e.old, e.new) for e in br.drain_events()] == [("open", "half_open")]
    assert br.admits(0.0) == (True, None)  # the gate is free for the next probe
    with calling(br):
        pass
    assert br.state == "closed"


def test_breaker_cancellation_keeps_the_failure_count() -> None:
    br = make_pool(ep(1)).endpoints[0].breaker
    br.record_failure(ServerError("boom"), 0.0)
    br.record_failure(ServerError("boom"), 0.0)
    for exc in (asyncio.CancelledError(), GeneratorExit(), KeyboardInterrupt()):
        with pytest.raises(type(exc)), calling(br):
            raise exc
    assert br.failures == 2 and br.state == "closed"
    with pytest.raises(RateLimited), calling(br):
        raise RateLimited("slow down")  # an answer from the endpoint: it is alive
    assert br.failures == 0


def test_breaker_only_the_probe_closes_a_half_open_breaker() -> None:
    br = make_pool(ep(1)).endpoints[0].breaker
    early = br.admit(0.0)  # admitted while closed, still in flight when the breaker opens
    for _ in range(3):
        br.record_failure(ServerError("boom"), 0.0)
    _age_open_breaker(br, 11)
    probe = br.admit(0.0)
    br.settle(early, None, 0.0)  # succeeds late: proves less than the probe will
    assert br.state == "half_open"
    br.settle(probe, None, 0.0)
    assert br.state == "closed"


# -- retry budget and backoff ----------------------------------------------------------
def test_retry_budget_caps_retries_to_share_of_calls() -> None:
    budget = RetryBudget(RetryPolicy(budget_ratio=0.2, budget_min=0, budget_window_s=10))
    for i in range(100):
        budget.note_call(i * 0.01)
    granted = sum(budget.try_spend(1.0) for _ in range(100))
    assert granted == 20
    assert budget.denied == 80
    # The window slides: old calls no longer buy retries.
    assert not budget.try_spend(30.0)


def test_full_jitter_stays_within_exponential_ceiling() -> None:
    policy = RetryPolicy(backoff_initial_s=0.1, backoff_max_s=1.0)
    rng = random.Random(3)
    for n, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (5, 1.0), (10, 1.0)):
        values = [full_jitter(n, policy, rng) for _ in range(200)]
        assert min(values) >= 0 and max(values) <= ceiling
        assert max(values) > ceiling * 0.8  # full jitter spans the whole range


# -- the plan --------------------------------------------------------------------------
def make_plan(
    pool: Pool, *, total: float | None = 30.0, policy: RetryPolicy | None = None, now: float = 0.0
) -> CallPlan:
    return CallPlan(
        pool=pool,
        budget=RetryBudget(policy or RetryPolicy(budget_min=100)),
        policy=policy or RetryPolicy(budget_min=100),
        timeouts=Timeouts(),
        operation="chat",
        model="m",
        stream=False,
        project="p",
        request_id="r1",
        now=now,
        now_ns=0,
        total_timeout=total,
    )


def state_for(exc: BaseException, now: float) -> RetryCallState:
    rs = RetryCallState(Retrying(), fn=None, args=(), kwargs={})
    rs.set_exception((type(exc), exc, None))
    rs.outcome_timestamp = now
    return rs


def test_plan_fails_over_to_an_untried_endpoint() -> None:
    pool = make_pool(ep(1), ep(2))
    plan = make_plan(pool)
    first = plan.choose(0.0)
    att = plan.begin(first, 0)
    plan.end(att, 0.1, 100, error=ServerError("boom"))
    assert plan.should_retry(state_for(ServerError("boom"), 0.1))
    second = plan.choose(0.2)
    assert second.endpoint is not first.endpoint
    assert first.endpoint.in_flight == 0 and second.endpoint.in_flight == 1


def test_plan_never_retries_after_delivery_or_request_errors() -> None:
    plan = make_plan(make_pool(ep(1), ep(2)))
    plan.begin(plan.choose(0.0), 0)
    assert not plan.should_retry(state_for(InvalidRequest("bad"), 0.1))
    plan.delivered_chunk("hello")
    assert not plan.should_retry(state_for(ServerError("boom"), 0.1))


def test_plan_stops_at_max_attempts_and_deadline() -> None:
    policy = RetryPolicy(max_attempts=2, budget_min=100)
    plan = make_plan(make_pool(ep(1), ep(2)), policy=policy, total=5.0)
    for t in (0.0, 0.1):
        att = plan.begin(plan.choose(t), 0)
        plan.end(att, t, 0, error=ServerError("boom"))
    assert not plan.should_retry(state_for(ServerError("boom"), 0.2))
    late = make_plan(make_pool(ep(1)), total=5.0)
    att = late.begin(late.choose(0.0), 0)
    late.end(att, 0.0, 0, error=ServerError("boom"))
    assert not late.should_retry(state_for(ServerError("boom"), 6.0))


def test_plan_waits_for_recovery_then_names_every_endpoint() -> None:
    pool = make_pool(ep(1), ep(2))
    for state in pool.endpoints:
        for _ in range(3):
            state.breaker.record_failure(ConnectError("refused"), 0.0)
    plan = make_plan(pool, total=30.0)
    with pytest.raises(WaitingForEndpoint) as waiting:
        plan.choose(0.0)
    assert 9.0 < waiting.value.retry_in <= 10.0
    assert plan.should_retry(state_for(waiting.value, 0.0))
    assert plan.wait_seconds(state_for(waiting.value, 0.0)) == waiting.value.retry_in
    short = make_plan(pool, total=1.0)
    with pytest.raises(NoEndpointAvailable) as final:
        short.choose(0.0)
    assert not isinstance(final.value, WaitingForEndpoint)
    assert set(final.value.reasons) == {s.name for s in pool.endpoints}
    assert all("circuit open" in why for why in final.value.reasons.values())


def test_plan_unknown_model_is_model_not_found() -> None:
    pool = make_pool(ep(1))
    pool.endpoints[0].set_models(["m"])
    plan = make_plan(pool)
    plan.model = "missing"
    with pytest.raises(ModelNotFound):
        plan.choose(0.0)


def test_plan_record_outcomes() -> None:
    plan = make_plan(make_pool(ep(1)))
    att = plan.begin(plan.choose(0.0), 10)
    plan.end(att, 0.5, 500_000_010, error=None, status_code=200)
    rec = plan.finish(600_000_000)
    assert rec.outcome == "ok" and len(rec.attempts) == 1
    assert rec.attempts[0].status_code == 200
    failed = make_plan(make_pool(ep(1)))
    att = failed.begin(failed.choose(0.0), 10)
    failed.end(att, 0.5, 20, error=ServerError("boom"))
    rec = failed.finish(30, ServerError("boom"))
    assert rec.outcome == "error" and rec.error_type == "ServerError"
    assert rec.attempts[0].error_type == "ServerError"


def test_least_loaded_does_not_starve_a_once_slow_endpoint() -> None:
    pool = make_pool(ep(1), ep(2))
    slow, fast = pool.endpoints
    for state, latency in ((slow, 2.0), (fast, 0.01)):
        assert state.try_acquire()
        state.release(latency_s=latency, error=None, now=100.0)

    def share_of_slow(now: float) -> int:
        return sum(pool.choose("m", "chat", now).endpoint is slow for _ in range(200))  # type: ignore[union-attr]

    assert share_of_slow(100.0) == 0  # right after the slow call: avoided
    # The fast one keeps getting fresh samples; the slow one's estimate decays while it gets
    # no traffic (peak-EWMA style), until it is tried again and can show it recovered.
    assert fast.try_acquire()
    fast.release(latency_s=0.01, error=None, now=160.0)
    assert share_of_slow(160.0) > 50
