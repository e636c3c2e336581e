"""Schedules are pure: arrival offsets, stop rules, sweep points, achieved rates."""

from __future__ import annotations

import random
import statistics

import numpy as np
import pytest
from scipy import stats as sps

from shared_ollama.bench.scheduler import (
    ClosedLoop,
    OpenLoop,
    Stop,
    achieved_rate,
    planned_arrivals,
    sweep_rates,
)


def _gaps(schedule: OpenLoop, n: int, seed: int = 0) -> np.ndarray:
    times = planned_arrivals(schedule, Stop(requests=n + 1), random.Random(seed))
    return np.diff(times)


def test_closed_loop_ramp_offsets() -> None:
    assert ClosedLoop(4).start_offsets() == [0, 0, 0, 0]
    assert ClosedLoop(4, ramp_s=2.0).start_offsets() == [0.0, 0.5, 1.0, 1.5]


def test_constant_rate() -> None:
    times = planned_arrivals(OpenLoop(4.0, "constant"), Stop(requests=5), random.Random(0))
    assert times == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_poisson_inter_arrivals_are_exponential() -> None:
    rate = 20.0
    gaps = _gaps(OpenLoop(rate, "poisson"), 5000, seed=42)
    result = sps.kstest(gaps, "expon", args=(0, 1 / rate))
    assert result.pvalue > 0.01, result
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 1.0, 4.0])
def test_gamma_burstiness_sets_the_cv(burstiness: float) -> None:
    gaps = _gaps(OpenLoop(10.0, "poisson", burstiness=burstiness), 20000, seed=1)
    cv = gaps.std() / gaps.mean()
    assert cv == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)  # the rate does not change
    shape = sps.kstest(gaps, "gamma", args=(burstiness, 0, 1 / (10.0 * burstiness)))
    assert shape.pvalue > 0.01


def test_burstier_means_larger_cv() -> None:
    cvs = [
        statistics.pstdev(g) / statistics.mean(g)
        for g in (_gaps(OpenLoop(5.0, burstiness=b), 5000, 3).tolist() for b in (4, 1, 0.25))
    ]
    assert cvs == sorted(cvs)


def test_stop_by_count_or_duration() -> None:
    sched = OpenLoop(10.0, "constant")
    assert len(planned_arrivals(sched, Stop(requests=7), random.Random(0))) == 7
    by_time = planned_arrivals(sched, Stop(duration_s=1.0), random.Random(0))
    assert len(by_time) == 10 and by_time[-1] < 1.0
    both = planned_arrivals(sched, Stop(requests=100, duration_s=0.5), random.Random(0))
    assert len(both) == 5  # whichever comes first


def test_stop_needs_a_bound() -> None:
    with pytest.raises(ValueError):
        Stop()
    with pytest.raises(ValueError):
        Stop(requests=0)


def test_ramp_up_grows_the_rate_linearly() -> None:
    sched = OpenLoop(100.0, "constant", ramp_s=2.0)
    times = np.array(planned_arrivals(sched, Stop(duration_s=4.0), random.Random(0)))
    # Expected arrivals by t: r*t^2/(2*ramp) during the ramp, then r per second.
    assert np.sum(times < 1.0) == pytest.approx(25, abs=1)
    assert np.sum(times < 2.0) == pytest.approx(100, abs=1)
    assert np.sum((times >= 3.0) & (times < 4.0)) == pytest.approx(100, abs=1)


def test_same_seed_same_arrivals() -> None:
    a = planned_arrivals(OpenLoop(5.0), Stop(requests=50), random.Random(9))
    b = planned_arrivals(OpenLoop(5.0), Stop(requests=50), random.Random(9))
    assert a == b


def test_open_loop_validation() -> None:
    with pytest.raises(ValueError):
        OpenLoop(0.0)
    with pytest.raises(ValueError):
        OpenLoop(1.0, burstiness=0)


def test_sweep_rates_lie_strictly_between_the_ends() -> None:
    assert sweep_rates(1.0, 5.0, 3) == pytest.approx([2.0, 3.0, 4.0])
    assert sweep_rates(5.0, 1.0, 1) == pytest.approx([3.0])
    with pytest.raises(ValueError):
        sweep_rates(0.0, 5.0, 3)


def test_achieved_rate() -> None:
    assert achieved_rate([0, 250_000_000, 500_000_000, 750_000_000, 1_000_000_000]) == 4.0
    assert achieved_rate([5]) is None
