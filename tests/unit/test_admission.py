"""The admission scheduler with scripted arrivals and a scripted clock: fair share between
projects, sheddable classes refused first, earliest deadline first, bounded waits."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shared_ollama import ConfigError, Endpoint, InvalidRequest, NoEndpointAvailable, Overloaded
from shared_ollama._core.plan import CallPlan, RetryBudget, WaitingForEndpoint
from shared_ollama.config import (
    AdmissionPolicy,
    PoolConfig,
    RetryPolicy,
    ServiceClass,
    Timeouts,
    load_config,
)
from shared_ollama.pool import Choice, Pool
from shared_ollama.pool.admission import Admission, Decision, Ticket

SERVICE_S = 1.0
TOKENS = 100


@dataclass
class Sim:
    """``slots`` calls served at once for ``SERVICE_S`` each; waiters are woken in a
    scripted order (worst-first by default) after every change, as a release wakes all."""

    adm: Admission
    slots: int
    #: The reference: no admission order, the longest-waiting call first (plain FIFO).
    fifo: bool = False
    running: list[tuple[float, Ticket]] = field(default_factory=list)
    waiting: list[Ticket] = field(default_factory=list)
    admitted: list[tuple[float, Ticket]] = field(default_factory=list)
    refused: list[tuple[Ticket, str]] = field(default_factory=list)
    arrived_at: dict[int, float] = field(default_factory=dict)

    def arrive(self, t: Ticket, now: float) -> None:
        self.arrived_at[t.seq] = now
        self.waiting.append(t)

    def step(self, now: float, wake: random.Random | None = None) -> None:
        for end, t in [r for r in self.running if r[0] <= now]:
            self.running.remove((end, t))
            self.adm.finished(t, TOKENS, end)
        changed = True
        while changed:
            changed = False
            order = list(reversed(self.waiting))
            if wake is not None:
                wake.shuffle(order)
            if self.fifo:
                order = self.waiting[: self.slots - len(self.running)]
            for t in order:
                free = self.slots - len(self.running)
                d = Decision("try") if self.fifo else self.adm.decide(t, now, free)
                if d.verdict == "refuse":
                    self.waiting.remove(t)
                    self.refused.append((t, d.reason))
                    changed = True
                elif d.verdict == "try" and free > 0:
                    self.adm.granted(t, now)
                    self.waiting.remove(t)
                    self.running.append((now + SERVICE_S, t))
                    self.admitted.append((now, t))
                    changed = True

    def waits(self, project: str) -> list[float]:
        return [at - self.arrived_at[t.seq] for at, t in self.admitted if t.project == project]


def run_flood(adm: Admission, rates: dict[str, int], seconds: int, slots: int = 2,
              service_class: str = "standard", wake: random.Random | None = None,
              fifo: bool = False) -> Sim:  # fmt: skip
    """Each project sends ``rate`` calls a second, evenly spread; time moves in 0.1 s steps."""
    sim = Sim(adm, slots, fifo)
    for tick in range(seconds * 10):
        now = tick / 10
        for project, rate in rates.items():
            per_tick, every = (rate // 10, 1) if rate >= 10 else (1, 10 // rate)
            if tick % every == 0:
                for _ in range(per_tick):
                    sim.arrive(adm.ticket(project, service_class, key="m", deadline=None), now)
        sim.step(now, wake)
    return sim


def test_a_tenfold_flood_is_not_admitted_ahead_of_the_quiet_projects_fair_share() -> None:
    # Capacity: 2 calls a second. quiet asks 1/s (under its half), flood 10/s (5x over).
    sim = run_flood(Admission(AdmissionPolicy()), {"quiet": 1, "flood": 10}, seconds=60)
    quiet = sim.waits("quiet")
    assert len(quiet) == 60  # every quiet call got in ...
    assert max(quiet) <= SERVICE_S  # ... within one service time: the next freed slot
    flood = sim.waits("flood")
    assert len(flood) >= 55 and max(flood) > 20  # the flood queues behind its own calls


def test_without_fair_share_the_quiet_project_waits_behind_the_flood() -> None:
    # The reference the test above could fail against: arrival order alone.
    sim = run_flood(Admission(AdmissionPolicy()), {"quiet": 1, "flood": 10}, seconds=60,
                    fifo=True)  # fmt: skip
    assert max(sim.waits("quiet")) > 10 * SERVICE_S


def test_two_floods_share_capacity_by_tokens_whatever_their_rates() -> None:
    sim = run_flood(Admission(AdmissionPolicy()), {"a": 10, "b": 3}, seconds=60,
                    wake=random.Random(7))  # fmt: skip
    a, b = len(sim.waits("a")), len(sim.waits("b"))
    assert abs(a - b) <= 2, (a, b)  # equal shares of 2 calls/s, not 10:3


def test_project_weights_scale_the_share() -> None:
    policy = AdmissionPolicy(project_weights={"a": 3.0})
    sim = run_flood(Admission(policy), {"a": 10, "b": 10}, seconds=60)
    a, b = len(sim.waits("a")), len(sim.waits("b"))
    assert 2.5 <= a / b <= 3.5, (a, b)


def test_wake_order_does_not_matter() -> None:
    for seed in range(5):
        sim = run_flood(Admission(AdmissionPolicy()), {"quiet": 1, "flood": 10}, seconds=20,
                        wake=random.Random(seed))  # fmt: skip
        assert max(sim.waits("quiet")) <= SERVICE_S


def test_sheddable_classes_are_refused_first_under_overload() -> None:
    adm = Admission(AdmissionPolicy())
    sim = Sim(adm, slots=1)
    tickets = {name: adm.ticket("p", cls, key="m", deadline=None)
               for name, cls in [("b1", "batch"), ("b2", "batch"), ("s", "standard"),
                                 ("i", "interactive")]}  # fmt: skip
    sim.arrive(tickets["b1"], 0.0)
    sim.step(0.0)
    sim.arrive(tickets["b2"], 0.1)  # capacity full, only batch waits: it waits
    sim.step(0.1)
    assert not sim.refused and tickets["b2"].waiting
    sim.arrive(tickets["s"], 0.2)
    sim.arrive(tickets["i"], 0.2)
    sim.step(0.2)
    # Work that may not be shed waits now: the waiting batch call is refused, nothing else.
    assert [t for t, _ in sim.refused] == [tickets["b2"]]
    assert sim.refused[0][1].startswith("shed: class batch under overload")
    sim.step(1.0)
    sim.step(2.0)
    assert [t for _, t in sim.admitted] == [tickets["b1"], tickets["i"], tickets["s"]]
    assert adm.shed_count == 1


def test_earliest_deadline_first_within_a_class_and_project() -> None:
    adm = Admission(AdmissionPolicy())
    sim = Sim(adm, slots=1)
    first = adm.ticket("p", None, key="m", deadline=100.0)
    sim.arrive(first, 0.0)
    sim.step(0.0)
    late = adm.ticket("p", None, key="m", deadline=30.0)
    early = adm.ticket("p", None, key="m", deadline=10.0)
    none = adm.ticket("p", None, key="m", deadline=None)
    mid = adm.ticket("p", None, key="m", deadline=20.0)
    urgent_class = adm.ticket("p", "interactive", key="m", deadline=None)
    for t in (late, early, none, mid, urgent_class):
        sim.arrive(t, 0.5)
    sim.step(0.5)
    for now in (1.0, 2.0, 3.0, 4.0, 5.0):
        sim.step(now)
    order = [t for _, t in sim.admitted]
    assert order == [first, urgent_class, early, mid, late, none]


def test_other_models_waiters_do_not_hold_a_call_back() -> None:
    adm = Admission(AdmissionPolicy())
    a = adm.ticket("p", "interactive", key="a", deadline=None)
    b = adm.ticket("p", "batch", key="b", deadline=None)
    assert adm.decide(a, 0.0, 0).verdict == "try"  # no slot for a: it waits on the pool
    assert adm.decide(b, 0.0, 1).verdict == "try"  # b's capacity is free: a is no rival


def test_a_bounded_wait_ends_in_a_refusal_naming_why() -> None:
    classes = {"standard": ServiceClass(rank=1), "quick": ServiceClass(rank=0, max_wait_s=2.0)}
    adm = Admission(AdmissionPolicy(classes=classes))
    ahead = [adm.ticket("p", "quick", key="m", deadline=5.0) for _ in range(2)]
    me = adm.ticket("p", "quick", key="m", deadline=9.0)
    for t in (*ahead, me):
        assert adm.decide(t, 0.0, 1).verdict in ("try", "wait")
    assert adm.decide(me, 1.9, 1).verdict == "wait"
    d = adm.decide(me, 2.0, 1)
    assert d.verdict == "refuse"
    assert "waited 2s" in d.reason and "class quick" in d.reason and "2 of 3" in d.reason
    assert not me.waiting and adm.expired_count == 1


def test_a_full_queue_sheds_the_worst_sheddable_waiter_then_refuses_newcomers() -> None:
    adm = Admission(AdmissionPolicy(max_queue=2))
    batch = adm.ticket("p", "batch", key="m", deadline=None)
    std = [adm.ticket("p", "standard", key="m", deadline=None) for _ in range(3)]
    # Slots free for all (nobody is short of capacity): only the queue's bound refuses.
    assert adm.decide(batch, 0.0, 5).verdict == "try"
    assert adm.decide(std[0], 0.0, 5).verdict == "try"
    assert adm.decide(std[1], 0.0, 5).verdict == "try"  # over: the batch call is shed
    refused = adm.decide(batch, 0.1, 5)
    assert refused.verdict == "refuse" and "queue for 'm' full" in refused.reason
    newcomer = adm.decide(std[2], 0.2, 5)
    assert newcomer.verdict == "refuse" and newcomer.reason.startswith("queue full")


def test_unknown_class_is_invalid_request_and_bad_policy_a_config_error() -> None:
    adm = Admission(AdmissionPolicy())
    with pytest.raises(InvalidRequest, match="unknown service_class 'vip'"):
        adm.ticket("p", "vip", key="m", deadline=None)
    with pytest.raises(ConfigError):
        load_config(env={}, admission={"default_class": "nope"})
    with pytest.raises(ConfigError):
        load_config(env={}, admission={"project_weights": {"a": 0}})


def test_usage_decays_and_real_tokens_replace_the_estimate() -> None:
    adm = Admission(AdmissionPolicy(fair_share_half_life_s=10.0, estimate_tokens=500))
    t = adm.ticket("p", None, key="m", deadline=None)
    adm.granted(t, 0.0)
    assert adm.usage("p", 0.0) == pytest.approx(500)
    adm.finished(t, 100, 0.0)
    assert adm.usage("p", 0.0) == pytest.approx(100)
    assert adm.usage("p", 10.0) == pytest.approx(50)
    assert adm.estimate("p") == 100


# -- the gate in CallPlan -------------------------------------------------------------------
def make_plan(pool: Pool, service_class: str | None, now: float = 0.0,
              timeout: float | None = 60.0) -> CallPlan:  # fmt: skip
    return CallPlan(pool=pool, budget=RetryBudget(RetryPolicy()), policy=RetryPolicy(),
                    timeouts=Timeouts(), operation="chat", model="m", stream=False,
                    project="p", request_id="r", now=now, now_ns=int(now * 1e9),
                    total_timeout=timeout, service_class=service_class)  # fmt: skip


def one_slot_pool() -> Pool:
    ep = Endpoint("http://127.0.0.1:1", kind="ollama", models=["m"], max_in_flight=1)
    return Pool(PoolConfig(endpoints=[ep]))


def test_plan_gives_a_freed_slot_to_the_better_class_whoever_looks_first() -> None:
    pool = one_slot_pool()
    holder = make_plan(pool, None)
    held = holder.choose(0.0)
    standard, interactive = make_plan(pool, "standard"), make_plan(pool, "interactive")
    for plan in (standard, interactive):
        with pytest.raises(WaitingForEndpoint) as waiting:
            plan.choose(0.1)
        assert waiting.value.saturated
    held.endpoint.release(latency_s=0.1, error=None, now=1.0)
    with pytest.raises(WaitingForEndpoint) as behind:
        standard.choose(1.0)  # woken first, but a better waiter stands before it
    assert "1 of 2 waiting calls go first" in str(behind.value)
    assert isinstance(interactive.choose(1.0), Choice)


def test_plan_sheds_with_a_non_retryable_overloaded() -> None:
    pool = one_slot_pool()
    make_plan(pool, None).choose(0.0)
    batch, standard = make_plan(pool, "batch"), make_plan(pool, "standard")
    with pytest.raises(WaitingForEndpoint):
        batch.choose(0.1)
    with pytest.raises(WaitingForEndpoint):
        standard.choose(0.1)
    with pytest.raises(Overloaded, match="shed: class batch") as shed:
        batch.choose(0.2)
    assert not shed.value.retryable
    assert batch.after_failure(shed.value, 0.2) is None


def test_plan_unknown_class_and_a_wait_past_the_deadline() -> None:
    pool = one_slot_pool()
    with pytest.raises(InvalidRequest):
        make_plan(pool, "nope")
    held = make_plan(pool, None).choose(0.0)
    ahead = make_plan(pool, "standard", timeout=100.0)
    late = make_plan(pool, "standard", timeout=200.0)
    for plan in (ahead, late):
        with pytest.raises(WaitingForEndpoint):
            plan.choose(0.1)
    held.endpoint.release(latency_s=None, error=None, now=0.5)
    # A free slot, a better waiter before it, and its own deadline gone: the typed error.
    with pytest.raises(NoEndpointAvailable) as gone:
        late.choose(250.0)
    assert not isinstance(gone.value, WaitingForEndpoint)
    assert not late.ticket.waiting


def test_headroom_leaves_the_last_slots_to_better_classes() -> None:
    classes = {"interactive": ServiceClass(rank=0), "batch": ServiceClass(rank=2, headroom=1)}
    adm = Admission(AdmissionPolicy(classes=classes, default_class="interactive"))
    sim = Sim(adm, slots=3)
    floods = [adm.ticket("flood", "batch", key="m", deadline=None) for _ in range(5)]
    for t in floods:
        sim.arrive(t, 0.0)
    sim.step(0.0)
    assert len(sim.running) == 2  # one slot stays free ...
    quiet = adm.ticket("quiet", "interactive", key="m", deadline=None)
    sim.arrive(quiet, 0.5)
    sim.step(0.5)
    assert sim.admitted[-1] == (0.5, quiet)  # ... so the interactive call starts at once


def test_the_docs_pool_file_loads(tmp_path: Path) -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "admission.md"
    match = re.search(r"```toml\n(.*?)```", docs.read_text(encoding="utf-8"), re.S)
    assert match is not None
    path = tmp_path / "pool.toml"
    path.write_text(match.group(1), encoding="utf-8")
    cfg = load_config(path, env={})
    assert [e.max_in_flight for e in cfg.endpoints] == ["adaptive", 8]
    batch = cfg.admission.classes["batch"]
    assert batch.sheddable and batch.headroom == 1 and batch.max_wait_s == 30.0
    assert cfg.admission.project_weights == {"search": 2.0} and cfg.adaptive.window == 200
    pool = Pool(cfg)
    assert pool.endpoints[0].cap == 4 and pool.endpoints[1].cap == 8


# -- waking: one sleeping waiter per release, the best-ordered ------------------------------
class Wakes:
    """Sleeping tickets' wakers: which were called, in order."""

    def __init__(self, adm: Admission) -> None:
        self.adm = adm
        self.woken: list[int] = []

    def sleep(self, t: Ticket) -> None:
        self.adm.sleeping(t, lambda: self.woken.append(t.seq))


def test_a_release_wakes_only_the_best_ordered_sleeping_waiter() -> None:
    adm = Admission(AdmissionPolicy())
    wakes = Wakes(adm)
    quiet, *flood = [adm.ticket("quiet", None, key="m", deadline=None)] + [
        adm.ticket("flood", None, key="m", deadline=None) for _ in range(20)
    ]
    adm._charge("flood", 10_000, 0.0)  # the flooding project has used far more
    for t in [*flood, quiet]:  # the quiet project arrives last
        assert adm.decide(t, 0.0, 0).verdict == "try"  # no free slot: the pool says why
        wakes.sleep(t)
    adm.wake(0.0)
    assert wakes.woken == [quiet.seq]  # one wake-up, the fair share's choice, not 21
    adm.wake(0.0)  # the next release: the next in order (the first flood call to arrive)
    assert wakes.woken == [quiet.seq, flood[0].seq]
    for t in (quiet, flood[0]):
        adm.awake(t)


def test_a_waiter_that_finds_free_slots_wakes_those_entitled_to_them() -> None:
    adm = Admission(AdmissionPolicy())
    wakes = Wakes(adm)
    tickets = [adm.ticket("p", None, key="m", deadline=None) for _ in range(6)]
    for t in tickets:
        adm.decide(t, 0.0, 0)
        wakes.sleep(t)
    last = tickets[-1]
    adm.awake(last)
    # The last in order looks while three slots are free: the first three are woken, it waits.
    assert adm.decide(last, 0.0, 3).verdict == "wait"
    assert wakes.woken == [t.seq for t in tickets[:3]]


def test_a_shed_waiter_is_woken_to_be_refused_now() -> None:
    adm = Admission(AdmissionPolicy())
    wakes = Wakes(adm)
    batch = adm.ticket("p", "batch", key="m", deadline=None)
    adm.decide(batch, 0.0, 0)
    wakes.sleep(batch)
    standard = adm.ticket("q", "standard", key="m", deadline=None)
    adm.decide(standard, 0.0, 0)  # must wait: the batch call ordered after it is shed
    assert wakes.woken == [batch.seq]
    adm.awake(batch)
    decision = adm.decide(batch, 0.0, 0)
    assert decision.verdict == "refuse" and "shed: class batch" in decision.reason


def test_a_ticket_that_left_the_wait_is_never_woken() -> None:
    adm = Admission(AdmissionPolicy())
    wakes = Wakes(adm)
    t = adm.ticket("p", None, key="m", deadline=None)
    adm.decide(t, 0.0, 0)
    wakes.sleep(t)
    adm.withdraw(t)
    adm.wake(0.0)
    assert wakes.woken == [] and t.waker is None
    wakes.sleep(t)  # sleeping while not waiting registers nothing
    assert t.waker is None
