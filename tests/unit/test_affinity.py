"""Session/prefix affinity: routing keys, the hash ring and bounded loads (no I/O)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from shared_ollama import Endpoint, PoolConfig
from shared_ollama._core.plan import CallPlan, RetryBudget
from shared_ollama._core.requests import chat_op, generate_op
from shared_ollama.config import BreakerPolicy, RetryPolicy, Timeouts, load_config
from shared_ollama.errors import ConfigError
from shared_ollama.pool import (
    Affinity,
    Choice,
    EndpointState,
    Pool,
    RouteRequest,
    key_hash,
    routing_key,
)

EPS = 0.25


def ep(port: int, **kw: object) -> Endpoint:
    kw.setdefault("kind", "openai")
    kw.setdefault("models", ["m"])
    return Endpoint(f"http://127.0.0.1:{port}", **kw)


def states(*ports: int, **kw: object) -> list[EndpointState]:
    return [EndpointState(ep(p, **kw), BreakerPolicy()) for p in ports]


def keys(n: int) -> list[str]:
    return [key_hash(f"user-{i}") for i in range(n)]


def req(key: str | None) -> RouteRequest:
    return RouteRequest("m", "chat", key)


def test_routing_key_precedence_and_privacy() -> None:
    base = routing_key(session=None, options=None, system="sys", first_user="hello")
    assert base is not None and len(base) == 16
    # The same conversation start keys the same; another one does not.
    assert base == routing_key(session=None, options={}, system="sys", first_user="hello")
    assert base != routing_key(session=None, options=None, system="sys", first_user="bye")
    # OpenAI's fields win over the prefix, session= over both.
    by_user = routing_key(session=None, options={"user": "u1"}, system="sys", first_user="hello")
    by_cache = routing_key(
        session=None, options={"user": "u1", "prompt_cache_key": "p"}, system="s", first_user="h"
    )
    by_session = routing_key(session="s1", options={"user": "u1"}, system="sys", first_user="hello")
    assert len({base, by_user, by_cache, by_session}) == 4
    assert by_session == routing_key(session="s1", options=None, system=None, first_user=None)
    # Nothing to key on: no key. The key itself never shows: only its hash.
    assert routing_key(session=None, options=None, system=None, first_user=None) is None
    assert "s1" not in (by_session or "")


def test_ops_carry_key_session_and_sizes() -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x" * 40}]
    op = chat_op("m", msgs, tools=None, stream=False, think=None, format=None,
                 options={"num_predict": 7}, keep_alive=None, session="alice",
                 service_class="batch")  # fmt: skip
    assert op.session == "alice" and op.service_class == "batch"
    assert op.route_key == routing_key(session="alice", options=None, system=None, first_user=None)
    assert op.prompt_tokens == 12 and op.max_tokens == 7
    # Later turns of the same conversation keep its prefix key (no session given).
    first = chat_op("m", msgs, tools=None, stream=False, think=None, format=None,
                    options=None, keep_alive=None)  # fmt: skip
    later = chat_op("m", [*msgs, {"role": "assistant", "content": "ok"},
                          {"role": "user", "content": "more"}], tools=None, stream=False,
                    think=None, format=None, options=None, keep_alive=None)  # fmt: skip
    assert first.route_key is not None and first.route_key == later.route_key
    # A generate prompt is keyed on its first 512 characters.
    g1 = generate_op("m", "p" * 600 + "tail one", suffix=None, system=None, template=None,
                     context=None, stream=False, think=None, raw=None, format=None,
                     images=None, options=None, keep_alive=None)  # fmt: skip
    g2 = generate_op("m", "p" * 600 + "tail two", suffix=None, system=None, template=None,
                     context=None, stream=False, think=None, raw=None, format=None,
                     images=None, options=None, keep_alive=None)  # fmt: skip
    assert g1.route_key == g2.route_key is not None


def test_same_key_same_endpoint_while_loads_allow() -> None:
    eps = states(1, 2, 3, 4)
    strategy = Affinity(EPS)
    rng = random.Random(0)
    for key in keys(50):
        first = strategy.pick(eps, req(key), rng, 0.0)
        assert first.reason in ("affinity", "spill")  # placed within its share of sessions
        for _ in range(5):
            again = strategy.pick(eps, req(key), rng, 0.0)
            assert (again.endpoint, again.reason) == (first.endpoint, "affinity")
        assert strategy.home(key) == first.endpoint.url


def test_open_sessions_are_spread_within_their_bound() -> None:
    """Few calls in flight (each session pauses between turns) cannot keep the hash from
    piling sessions on one endpoint; the open-session bound does."""
    eps = states(1, 2)
    strategy = Affinity(EPS)
    rng = random.Random(0)
    homes = Counter(strategy.pick(eps, req(k), rng, 0.0).endpoint.url for k in keys(16))
    assert max(homes.values()) <= math.ceil((1 + EPS) * 16 / 2)
    # The hash alone (one fresh strategy per key: no memory of open sessions) does worse.
    plain = Counter(Affinity(EPS).pick(eps, req(k), rng, 0.0).endpoint.url for k in keys(16))
    assert max(plain.values()) > max(homes.values())


def test_forgotten_after_ttl_then_placed_anew() -> None:
    eps = states(1, 2, 3)
    strategy = Affinity(EPS, ttl_s=10.0)
    key = keys(1)[0]
    home = strategy.pick(eps, req(key), random.Random(0), 0.0).endpoint
    assert strategy.home(key) == home.url
    strategy.pick(eps, req(keys(2)[1]), random.Random(0), 10.5)  # any call expires old ones
    assert strategy.home(key) is None


def test_keys_spread_over_endpoints() -> None:
    eps = states(1, 2, 3, 4)
    strategy = Affinity(EPS)
    counts = Counter(strategy.pick(eps, req(k), random.Random(0), 0.0).endpoint.url
                     for k in keys(4000))  # fmt: skip
    assert len(counts) == 4
    assert min(counts.values()) > 4000 / 4 * 0.6  # virtual nodes: no endpoint starves


def test_bounded_loads_hold() -> None:
    """Every key hashed to one region: no endpoint ever goes over ceil((1+eps) x mean)."""
    eps = states(1, 2, 3, 4, 5)
    strategy = Affinity(EPS)
    rng = random.Random(0)
    hot = keys(1)[0]  # one very busy session: the worst case for affinity
    mixed = [hot] * 300 + keys(300)
    random.Random(1).shuffle(mixed)
    for key in mixed:
        pick = strategy.pick(eps, req(key), rng, 0.0)
        assert pick.endpoint.try_acquire()
        total = sum(e.in_flight for e in eps)
        bound = math.ceil((1 + EPS) * total / len(eps))
        assert max(e.in_flight for e in eps) <= bound


def test_spill_goes_to_the_next_ring_choice() -> None:
    eps = states(1, 2, 3, 4)
    strategy = Affinity(EPS)
    key = keys(1)[0]
    ring = strategy.ring(eps).walk(key)
    by_url = {e.url: e for e in eps}
    home, second, third = (by_url[u] for u in ring[:3])
    pick = strategy.pick(eps, req(key), random.Random(0), 0.0)
    assert (pick.endpoint, pick.reason) == (home, "affinity")  # placed on its ring's first
    home.in_flight = 3  # bound with this call: ceil(1.25 x 4/4) = 2 -> home is over it
    pick = strategy.pick(eps, req(key), random.Random(0), 0.0)
    assert (pick.endpoint, pick.reason) == (second, "spill")
    second.in_flight = 3
    pick = strategy.pick(eps, req(key), random.Random(0), 0.0)
    assert (pick.endpoint, pick.reason) == (third, "spill")
    home.in_flight = second.in_flight = 0
    pick = strategy.pick(eps, req(key), random.Random(0), 0.0)
    assert (pick.endpoint, pick.reason) == (home, "affinity")


def test_a_home_that_cannot_take_calls_moves_the_session_and_says_spill() -> None:
    """The pool leaves a home out of the candidates while it is at its max_in_flight (or
    its breaker is open): the call goes elsewhere as a spill, and the session follows it,
    since that server now holds its latest prompt."""
    eps = states(1, 2, 3)
    strategy = Affinity(EPS)
    key = keys(1)[0]
    home = strategy.pick(eps, req(key), random.Random(0), 0.0).endpoint
    others = [e for e in eps if e is not home]
    pick = strategy.pick(others, req(key), random.Random(0), 1.0)
    assert pick.reason == "spill"
    new_home = pick.endpoint
    assert strategy.home(key) == new_home.url
    pick = strategy.pick(eps, req(key), random.Random(0), 2.0)  # the old home is back
    assert (pick.endpoint, pick.reason) == (new_home, "affinity")


@pytest.mark.parametrize("change", ["add", "remove"])
def test_membership_change_moves_about_one_nth(change: str) -> None:
    """The ring: a key's first choice moves only to an added endpoint or away from a removed
    one, about 1/N of the keys."""
    before = states(*range(1, 11))
    after = [*before, *states(11)] if change == "add" else before[:-1]
    strategy = Affinity(EPS)
    ks = keys(3000)
    old = {k: strategy.ring(before).walk(k)[0] for k in ks}
    new = {k: strategy.ring(after).walk(k)[0] for k in ks}
    moved = sum(old[k] != new[k] for k in ks)
    n = len(after) if change == "add" else len(before)
    assert 0 < moved < 2 * len(ks) / n  # ~1/N move, never a reshuffle
    gone = before[-1].url
    for k in ks:  # a key moves only to the new endpoint, or away from the removed one
        if old[k] != new[k]:
            assert new[k] == after[-1].url if change == "add" else old[k] == gone


@pytest.mark.parametrize("change", ["add", "remove"])
def test_open_sessions_stay_home_when_membership_changes(change: str) -> None:
    """Live sessions: an added endpoint takes none of the open ones (their caches stay
    warm); a removed one's sessions, and only those, are placed anew."""
    before = states(*range(1, 6))
    after = [*before, *states(6)] if change == "add" else before[:-1]
    strategy = Affinity(EPS)
    rng = random.Random(0)
    ks = keys(200)
    old = {k: strategy.pick(before, req(k), rng, 0.0).endpoint.url for k in ks}
    new = {k: strategy.pick(after, req(k), rng, 1.0).endpoint.url for k in ks}
    gone = before[-1].url
    for k in ks:
        assert (old[k] != new[k]) == (change == "remove" and old[k] == gone)


def test_weight_scales_the_share() -> None:
    eps = [*states(1), *states(2, weight=3.0)]
    strategy = Affinity(EPS)
    counts = Counter(strategy.pick(eps, req(k), random.Random(0), 0.0).endpoint.url
                     for k in keys(4000))  # fmt: skip
    assert 2.0 < counts[eps[1].url] / counts[eps[0].url] < 4.5


def test_loaded_model_walked_first() -> None:
    eps = states(1, 2, 3, kind="ollama")
    strategy = Affinity(EPS)
    eps[2].set_loaded(["m"])
    for key in keys(30):
        assert strategy.pick(eps, req(key), random.Random(0), 0.0).endpoint is eps[2]
    # Over its bound, the loaded one spills to the others.
    eps[2].in_flight = 5
    assert strategy.pick(eps, req(keys(1)[0]), random.Random(0), 0.0).endpoint is not eps[2]


def test_no_key_is_least_loaded() -> None:
    eps = states(1, 2)
    eps[0].in_flight = 4
    pick = Affinity(EPS).pick(eps, req(None), random.Random(0), 0.0)
    assert pick.endpoint is eps[1] and pick.reason == "least_loaded"


def test_pool_records_reason_candidates_and_failover() -> None:
    cfg = PoolConfig(endpoints=[ep(1), ep(2), ep(3)], strategy="affinity", affinity_eps=EPS)
    pool = Pool(cfg, rng=random.Random(0))
    plan = CallPlan(pool=pool, budget=RetryBudget(RetryPolicy()), policy=RetryPolicy(),
                    timeouts=Timeouts(), operation="chat", model="m", stream=False,
                    project="p", request_id="r", now=0.0, now_ns=0, total_timeout=None,
                    session="s", service_class="batch",
                    route=RouteRequest("m", "chat", key_hash("k"), 10, 5))  # fmt: skip
    assert plan.session == "s" and plan.service_class == "batch"
    first = plan.choose(0.0)
    assert isinstance(first, Choice) and first.reason == "affinity"
    assert first.endpoint.in_flight_tokens == 15
    att = plan.begin(first, 0)
    routing = plan.record.routing
    assert routing is not None and routing.reason == "affinity" and routing.key == key_hash("k")
    assert set(routing.candidates) == {e.name for e in pool.endpoints}
    plan.end(att, 0.1, 1, error=None)
    assert first.endpoint.in_flight_tokens == 0
    second = plan.choose(0.2)  # a retry: the tried endpoint is avoided
    assert second.reason == "failover" and second.endpoint is not first.endpoint
    plan.begin(second, 2)
    assert plan.record.routing is not None and plan.record.routing.reason == "failover"


def test_affinity_eps_is_validated() -> None:
    with pytest.raises(ValueError):
        Affinity(0.0)
    with pytest.raises(ConfigError):
        load_config(env={}, endpoints=[{"url": "http://127.0.0.1:1"}], affinity_eps=-1)


@pytest.mark.parametrize(
    ("strategy", "reason"),
    [("round_robin", "round_robin"), ("weighted", "weighted"), ("priority", "priority")],
)
def test_every_strategy_says_why(strategy: str, reason: str) -> None:
    cfg = PoolConfig(endpoints=[ep(1), ep(2)], strategy=strategy)
    pool = Pool(cfg, rng=random.Random(0))
    choice = pool.choose("m", "chat", 0.0, request=req(key_hash("k")))
    assert isinstance(choice, Choice) and choice.reason == reason
    lone = Pool(PoolConfig(endpoints=[ep(1)], strategy=strategy), rng=random.Random(0))
    only = lone.choose("m", "chat", 0.0)
    assert isinstance(only, Choice) and only.reason in {reason, "only_candidate"}


def test_least_loaded_says_when_the_loaded_model_won() -> None:
    pool = Pool(PoolConfig(endpoints=[ep(1, kind="ollama"), ep(2, kind="ollama")]))
    pool.endpoints[0].set_loaded(["m"])
    reasons: Counter[str] = Counter()
    for _ in range(50):
        choice = pool.choose("m", "chat", 0.0)
        assert isinstance(choice, Choice)
        reasons[choice.reason] += 1
        assert choice.endpoint is pool.endpoints[0]
    assert reasons == {"loaded_model": 50}
    single = Pool(PoolConfig(endpoints=[ep(1)])).choose("m", "chat", 0.0)
    assert isinstance(single, Choice) and single.reason == "only_candidate"
