"""Budgets: sliding windows driven by an injected clock; limits, reset times, threads."""

from __future__ import annotations

import threading

import pytest

from shared_ollama.config import Budget, UsageConfig
from shared_ollama.errors import BudgetExceeded, SharedOllamaError
from shared_ollama.records import CallRecord
from shared_ollama.usage import BudgetGate, UsageTracker

from ._helpers import make_record

S = 1_000_000_000


def _tokens(
    project: str, at_s: float, tokens_in: int | None, tokens_out: int | None = 0
) -> CallRecord:
    # The gate reads the record's end time (monotonic ns) as "now".
    return make_record(
        "r",
        project=project,
        t_start_ns=int(at_s * S),
        duration_ms=0,
        input_tokens=tokens_in,
        output_tokens=tokens_out,
    )


def test_requests_per_minute_limit_and_reset() -> None:
    gate = BudgetGate({"search": Budget(requests_per_minute=3)})
    for t in (0.0, 10.0, 20.0):
        gate.admit("search", t)
    with pytest.raises(BudgetExceeded) as info:
        gate.admit("search", 30.0)
    err = info.value
    assert isinstance(err, SharedOllamaError)
    assert (err.project, err.limit, err.resets_in) == ("search", "requests_per_minute", 30.0)
    assert "requests_per_minute" in str(err) and "search" in str(err)
    # A refused call is not counted: at 60 the first admit has expired, one slot is free.
    gate.admit("search", 60.0)
    with pytest.raises(BudgetExceeded) as info:
        gate.admit("search", 60.0)
    assert info.value.resets_in == pytest.approx(10.0)  # the admit at 10 s expires at 70 s
    gate.check("other-project", 60.0)  # no budget: never limited


def test_check_does_not_count() -> None:
    gate = BudgetGate({"p": Budget(requests_per_minute=1)})
    for _ in range(5):
        gate.check("p", 0.0)
    gate.admit("p", 0.0)
    with pytest.raises(BudgetExceeded):
        gate.check("p", 1.0)
    assert gate.usage("p", 1.0)["requests_per_minute"] == 1


def test_tokens_per_minute_counts_server_tokens() -> None:
    gate = BudgetGate({"p": Budget(tokens_per_minute=1000)})
    gate.commit(_tokens("p", 5.0, 300, 200))  # 500
    gate.commit(_tokens("p", 20.0, 100, 100))  # 700
    gate.commit(_tokens("p", 30.0, None, None))  # no usage reported
    gate.admit("p", 30.0)  # 700 < 1000: allowed
    gate.commit(_tokens("p", 40.0, 250, 50))  # 1000: used up
    with pytest.raises(BudgetExceeded) as info:
        gate.admit("p", 41.0)
    # Dropping below the limit needs the 5 s entry to expire (at 65 s).
    assert (info.value.limit, info.value.resets_in) == ("tokens_per_minute", 24.0)
    gate.admit("p", 65.0)
    assert gate.usage("p", 65.0)["tokens_per_minute"] == 500


def test_tokens_reset_waits_for_enough_entries() -> None:
    gate = BudgetGate({"p": Budget(tokens_per_minute=100)})
    for t in (1.0, 2.0, 3.0):
        gate.commit(_tokens("p", t, 60))  # 180 in all
    with pytest.raises(BudgetExceeded) as info:
        gate.check("p", 10.0)
    # 180 -> 120 at 61 s is still >= 100; 60 at 62 s is below.
    assert info.value.resets_in == pytest.approx(52.0)


def test_tokens_per_day_in_minute_buckets() -> None:
    day = 86400.0
    gate = BudgetGate({"p": Budget(tokens_per_day=1000, tokens_per_minute=10**9)})
    gate.commit(_tokens("p", 100.0, 600))  # minute bucket [60, 120)
    gate.commit(_tokens("p", 5000.0, 400))  # bucket [4980, 5040)
    with pytest.raises(BudgetExceeded) as info:
        gate.check("p", 6000.0)
    assert info.value.limit == "tokens_per_day"
    # The first bucket expires a whole day after its end: 120 + 86400.
    assert info.value.resets_in == pytest.approx(120 + day - 6000)
    with pytest.raises(BudgetExceeded):
        gate.check("p", day + 119.0)
    gate.check("p", day + 120.0)
    assert gate.usage("p", day + 120.0)["tokens_per_day"] == 400


def test_out_of_order_records_stay_conservative() -> None:
    gate = BudgetGate({"p": Budget(tokens_per_minute=100)})
    gate.commit(_tokens("p", 30.0, 60))
    gate.commit(_tokens("p", 10.0, 60))  # ended earlier, reported later
    with pytest.raises(BudgetExceeded) as info:
        gate.check("p", 31.0)
    assert info.value.resets_in == pytest.approx(59.0)  # both held until 90 s
    gate.check("p", 90.0)


def test_default_budget_applies_to_each_project_separately() -> None:
    gate = BudgetGate({"*": Budget(requests_per_minute=1), "vip": Budget(requests_per_minute=3)})
    gate.admit("a", 0.0)
    gate.admit("b", 0.0)
    with pytest.raises(BudgetExceeded):
        gate.admit("a", 1.0)
    for _ in range(3):
        gate.admit("vip", 1.0)
    with pytest.raises(BudgetExceeded):
        gate.admit("vip", 1.0)


def test_admit_is_atomic_across_threads() -> None:
    gate = BudgetGate({"p": Budget(requests_per_minute=500)})
    admitted: list[int] = []
    refused: list[int] = []
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for _ in range(200):
            try:
                gate.admit("p", 1.0)
            except BudgetExceeded:
                refused.append(1)
            else:
                admitted.append(1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert (len(admitted), len(refused)) == (500, 1100)


def test_tracker_checks_and_commits() -> None:
    tracker = UsageTracker(
        UsageConfig(enabled=False), {"p": Budget(requests_per_minute=2, tokens_per_minute=50)}
    )
    tracker.check("p", 0.0)
    tracker(_tokens("p", 1.0, 30, 20))  # the listener commits tokens: 50, used up
    with pytest.raises(BudgetExceeded) as info:
        tracker.check("p", 2.0)
    assert info.value.limit == "tokens_per_minute"
    tracker.close()
