"""One bench run end to end: pool and client, samplers, warm-up, phases, then the result.

Owns the wiring only; sending is the runner's, numbers are ``metrics``', the document is
``result``'s. ``run_scenario`` returns what was measured even when stopped early.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import platform
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from ..client import SharedClient
from ..config import Endpoint, PoolConfig
from ..records import CallRecord
from . import metrics
from .collector import Collector
from .result import BenchResult, PhaseResult, RunMetadata, Series
from .runner import PhaseRun, ProgressSink, Runner
from .scenario import (
    Scenario,
    SweepSpec,
    dedupe_names,
    phase_plans,
    public_scenario,
)
from .scheduler import ClosedLoop, OpenLoop, PhasePlan, achieved_rate, sweep_rates
from .simulate import SIM_MODEL, simulated_pool
from .workload import WorkloadMix

__all__ = ["RecordSink", "WarmupFailed", "run_scenario"]


class WarmupFailed(RuntimeError):
    """No warm-up request got an answer: the pool is not serving. The message names each
    endpoint's health, breaker and last error, and what the warm-up requests ended with."""


def _warmup_report(run: PhaseRun, client: SharedClient) -> str:
    ends = Counter(r.error_type or r.outcome for r in run.requests)
    lines = [
        f"warm-up: none of {len(run.requests)} requests got an answer ("
        + ", ".join(f"{name} x{count}" for name, count in ends.most_common())
        + "); not benchmarking a pool that does not serve"
    ]
    for st in client.pool_status():
        why = f", last error: {st.last_error}" if st.last_error else ""
        lines.append(
            f"  {st.name} ({st.kind}): health {st.health}, breaker {st.breaker}, "
            f"{st.failures} failures in {st.calls} calls{why}"
        )
    return "\n".join(lines)


log = logging.getLogger("shared_ollama.bench")

RecordSink = Callable[[CallRecord], None]


class _Samplers:
    """The samplers' ``SamplerSet`` when it can run; every failure becomes a note."""

    def __init__(self) -> None:
        self.set: Any = None
        self.gpus: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def start(self, scenario: Scenario, endpoints: Sequence[tuple[Endpoint, str]]) -> None:
        """Host always, NVML when asked, each endpoint's /metrics or /api/ps."""
        if not scenario.samplers.enabled:
            return
        try:
            from . import samplers as s
        except ImportError as exc:
            self.notes.append(f"samplers unavailable: {exc}")
            return
        chosen: list[Any] = [s.HostSampler()]
        if scenario.samplers.gpu:
            nvml = s.NVMLSampler()
            try:
                self.gpus = [dict(g) for g in nvml.gpu_info()]
            except s.SamplerUnavailable as exc:
                self.notes.append(f"gpu: {exc.reason}")
            chosen.append(nvml)
        if scenario.samplers.servers:
            chosen += [_server_sampler(s, ep, kind) for ep, kind in endpoints]
        self.set = s.SamplerSet([c for c in chosen if c is not None], scenario.samplers.interval_s)
        self.set.start()

    def mark(self) -> None:
        """A reading now (phase boundaries: energy needs readings at both ends)."""
        if self.set is not None:
            self.set.sample_now()

    def stop(self) -> list[Series]:
        """Stop sampling; the series in the result's own schema."""
        if self.set is None:
            return []
        return [Series.model_validate(x.model_dump()) for x in self.set.stop()]


def _server_sampler(s: Any, ep: Endpoint, kind: str) -> Any:
    headers = dict(ep.headers)
    if ep.api_key is not None:
        headers["Authorization"] = f"Bearer {ep.api_key.get_secret_value()}"
    if kind == "ollama":
        return s.OllamaPsSampler(ep.url, headers=headers)
    if kind in ("openai", "tgi"):
        return s.PrometheusSampler(ep.url, headers=headers)
    return None


@contextlib.contextmanager
def _quiet_gc() -> Iterator[None]:
    """Freeze what exists before measuring: full collections then skip the startup heap.

    A gen-2 collection over every object the process holds stalls the event loop for tens
    of milliseconds, which lands in whatever latency is being measured at that moment.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("shared-ollama", "httpx", "pydantic", "numpy", "matplotlib", "nvidia-ml-py"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def _host() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_implementation(),
    }
    try:
        import psutil

        info["cpu_count_logical"] = psutil.cpu_count(logical=True)
        info["cpu_count_physical"] = psutil.cpu_count(logical=False)
        info["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:
        import os

        info["cpu_count_logical"] = os.cpu_count()
    return info


async def _run_sweep(runner: Runner, spec: SweepSpec) -> list[PhaseRun]:
    stop = spec.stop()
    sync = PhasePlan("sweep-sync", ClosedLoop(1), stop)
    top = PhasePlan(f"sweep-max(c={spec.max_concurrency})", ClosedLoop(spec.max_concurrency), stop)

    def rate_of(run: PhaseRun) -> float:
        # The same definition as the phase's reported throughput (over the phase's duration,
        # not the requests' span), so the planned rates lie between the two reported ends.
        duration = (run.t_end_ns - run.t_start_ns) / 1e9
        return metrics.summarize(run.requests, duration_s=duration).request_throughput

    def make(lo: float, hi: float) -> list[PhasePlan]:
        return [
            PhasePlan(f"sweep-{r:.3g}/s", OpenLoop(r, spec.arrival, spec.burstiness), stop)
            for r in sweep_rates(lo, hi, spec.points)
        ]

    return await runner.sweep_points(sync, top, rate_of, make)


async def _run_phases(runner: Runner, scenario: Scenario, samplers: _Samplers) -> list[PhaseRun]:
    items: list[PhasePlan | SweepSpec] = []
    for spec in scenario.schedules:
        items += [spec] if isinstance(spec, SweepSpec) else phase_plans(spec)
    runs: list[PhaseRun] = []
    for item in dedupe_names(items):
        if runner.stopping:
            break
        await asyncio.to_thread(samplers.mark)
        if isinstance(item, SweepSpec):
            runs += await _run_sweep(runner, item)
        else:
            runs.append(await runner.run(item))
    await asyncio.to_thread(samplers.mark)
    # A phase cut before its first request says nothing.
    return [r for r in runs if r.requests or r.stop_reason != "interrupted"]


def _phase_result(run: PhaseRun, slo: dict[str, float], series: Sequence[Series]) -> PhaseResult:
    energy = _energy(series, run.t_start_ns, run.t_end_ns)
    duration = (run.t_end_ns - run.t_start_ns) / 1e9
    summary = metrics.summarize(run.requests, slo=slo, duration_s=duration, energy_j=energy)
    sched = run.plan.schedule
    base: dict[str, Any] = {
        "name": run.plan.name,
        "planned_requests": run.plan.stop.requests,
        "planned_duration_s": run.plan.stop.duration_s,
        "stop_reason": run.stop_reason,
        "t_start_ns": run.t_start_ns,
        "t_end_ns": run.t_end_ns,
        "summary": summary,
        "achieved_rate": achieved_rate([r.t_start_ns for r in run.requests]),
    }
    if isinstance(sched, ClosedLoop):
        return PhaseResult(
            mode="closed", concurrency=sched.concurrency, ramp_s=sched.ramp_s, **base
        )
    return PhaseResult(
        mode="open",
        requested_rate=sched.rate,
        arrival=sched.arrival,
        burstiness=sched.burstiness,
        ramp_s=sched.ramp_s,
        **base,
    )


def _energy(series: Sequence[Series], t0: int, t1: int) -> float | None:
    try:
        from . import samplers as s
    except ImportError:
        return None
    total: float | None = None
    for x in series:
        if x.available and any(k.startswith("gpu") for k in x.values):
            joules = s.energy_joules(s.SampleSeries.model_validate(x.model_dump()), t0, t1)
            if joules is not None:
                total = (total or 0.0) + joules
    return total


def _sample_summary(series: Sequence[Series]) -> dict[str, dict[str, dict[str, float]]]:
    try:
        from . import samplers as s
    except ImportError:
        return {}
    return {x.name: s.summarize(s.SampleSeries.model_validate(x.model_dump())) for x in series}


async def run_scenario(
    scenario: Scenario,
    *,
    progress: ProgressSink | None = None,
    on_record: RecordSink | None = None,
    on_runner: Callable[[Runner], None] | None = None,
) -> BenchResult:
    """Run every phase of ``scenario`` and return the result document.

    ``on_runner`` receives the runner before the first request (the CLI hooks Ctrl-C to
    ``runner.stop``); ``on_record`` sees every bench CallRecord as it ends.
    """
    with contextlib.ExitStack() as stack:
        pool = scenario.pool
        if scenario.simulate:
            pool = pool.model_copy(update={"endpoints": stack.enter_context(simulated_pool())})
        result = await _run(scenario, pool, progress, on_record, on_runner)
    return result


async def _run(
    scenario: Scenario,
    pool: PoolConfig,
    progress: ProgressSink | None,
    on_record: RecordSink | None,
    on_runner: Callable[[Runner], None] | None,
) -> BenchResult:
    started, t0 = datetime.now(UTC), time.monotonic_ns()
    model = scenario.model or (SIM_MODEL if scenario.simulate else None)
    mix = WorkloadMix(scenario.workloads, model, scenario.seed)
    collector = Collector(on_record)
    usage = None if "usage" in pool.model_fields_set else False  # keep the user's ledger clean
    client = SharedClient(config=pool, project="bench", usage=usage, listeners=[collector])
    samplers = _Samplers()
    runs: list[PhaseRun] = []
    notes: list[str] = []
    async with client:
        kinds = {st.url: st.kind for st in client.pool_status()}
        eps = [(ep, kinds.get(ep.url, ep.kind)) for ep in pool.endpoints]
        await asyncio.to_thread(samplers.start, scenario, eps)
        runner = Runner(client, mix, collector, seed=scenario.seed, progress=progress)
        if on_runner is not None:
            on_runner(runner)
        try:
            warm = await runner.warmup(scenario.warmup.requests, scenario.warmup.concurrency)
            answered = warm is None or any(r.outcome == "ok" for r in warm.requests)
            if warm is not None and not answered and not runner.stopping:
                raise WarmupFailed(_warmup_report(warm, client))
            with _quiet_gc():
                runs = await _run_phases(runner, scenario, samplers)
        finally:
            series = await asyncio.to_thread(samplers.stop)
        interrupted = runner.stopping
    notes += samplers.notes
    notes += [f"{r.plan.name}: {r.unrecorded} sends without a record" for r in runs if r.unrecorded]
    meta = RunMetadata(
        started_at=started.isoformat(),
        finished_at=datetime.now(UTC).isoformat(),
        wall_duration_s=(time.monotonic_ns() - t0) / 1e9,
        monotonic_origin_ns=t0,
        versions=_versions(),
        host=_host(),
        gpus=samplers.gpus,
        endpoints=[{"url": ep.url, "kind": kind, "name": ep.display_name} for ep, kind in eps],
        scenario=public_scenario(scenario),
        seed=scenario.seed,
        simulate=scenario.simulate,
        interrupted=interrupted,
        notes=notes,
    )
    return build_result(meta, runs, scenario.slo.as_dict(), series)


def build_result(
    meta: RunMetadata, runs: Sequence[PhaseRun], slo: dict[str, float], series: Sequence[Series]
) -> BenchResult:
    """Assemble the document from phase runs and sampled series."""
    phases = [_phase_result(r, slo, series) for r in runs]
    requests = [q for r in runs for q in r.requests]
    energies = [p.summary.energy_j for p in phases if p.summary.energy_j is not None]
    overall = metrics.summarize(
        requests,
        slo=slo,
        duration_s=sum(p.summary.duration_s for p in phases),
        energy_j=sum(energies) if energies else None,
    )
    return BenchResult(
        metadata=meta,
        definitions=dict(metrics.DEFINITIONS),
        slo=slo,
        phases=phases,
        summary=overall,
        requests=requests,
        samples=list(series),
        sample_summary=_sample_summary(series),
    )
