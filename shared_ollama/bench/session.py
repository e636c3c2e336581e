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
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from ..client import SharedClient
from ..config import Endpoint, PoolConfig
from ..records import CallRecord
from . import findings, metrics
from .calibrate import (
    CalibrationFailed,
    RunCalibration,
    calibrate_run,
    context_points,
    max_output_tokens,
    prompt_token_report,
)
from .collector import Collector
from .result import BenchResult, PhaseResult, RunMetadata, SamplingInfo, Series, Summary
from .runner import PhaseRun, ProgressSink, Runner
from .scenario import (
    ContextSweepSpec,
    RunItem,
    Scenario,
    SweepSpec,
    dedupe_names,
    phase_plans,
    public_scenario,
)
from .scheduler import ClosedLoop, OpenLoop, PhasePlan, achieved_rate, sweep_rates
from .simulate import SIM_MODEL, simulated_pool
from .workload import WorkloadMix

__all__ = [
    "CalibrationFailed",
    "PhaseDriver",
    "RecordSink",
    "RunPhase",
    "WarmupFailed",
    "run_scenario",
]


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
#: Runs one phase (None once the run is stopping); the run keeps every phase it ran.
RunPhase = Callable[[PhasePlan], Awaitable[PhaseRun | None]]
#: Chooses its phases as it goes (``capacity``'s search) instead of the scenario's schedules.
PhaseDriver = Callable[[RunPhase], Awaitable[None]]


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
        spec = scenario.samplers
        if spec.servers:
            every = spec.server_interval_s
            chosen += [_server_sampler(s, ep, kind, every) for ep, kind in endpoints]
        chosen = [c for c in chosen if c is not None]
        self.set = s.SamplerSet(chosen, spec.interval_s, process=spec.process)
        self.set.start()
        if self.set.fallback:
            self.notes.append(f"samplers ran on a thread of the bench: {self.set.fallback}")

    def info(self, scenario: Scenario) -> SamplingInfo:
        """The cadences and where the samplers ran, for the result's metadata."""
        spec = scenario.samplers
        if not spec.enabled:
            return SamplingInfo(enabled=False)
        info = SamplingInfo(enabled=True, interval_s=spec.interval_s)
        if spec.servers:
            info.server_interval_s = spec.server_interval_s
        if self.set is not None:
            info.where = self.set.mode
            info.process_cpu_s = self.set.process_cpu_s
            info.fallback = self.set.fallback
        return info

    def mark(self) -> None:
        """A reading now (phase boundaries: energy needs readings at both ends)."""
        if self.set is not None:
            self.set.sample_now()

    def stop(self) -> list[Series]:
        """Stop sampling; the series in the result's own schema."""
        if self.set is None:
            return []
        return [Series.model_validate(x.model_dump()) for x in self.set.stop()]


def _server_sampler(s: Any, ep: Endpoint, kind: str, interval_s: float) -> Any:
    headers = dict(ep.headers)
    if ep.api_key is not None:
        headers["Authorization"] = f"Bearer {ep.api_key.get_secret_value()}"
    if kind == "ollama":
        return s.OllamaPsSampler(ep.url, headers=headers, interval_s=interval_s)
    if kind in ("openai", "tgi"):
        return s.PrometheusSampler(ep.url, headers=headers, interval_s=interval_s)
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


@dataclass(frozen=True)
class _ContextPlan:
    """A context sweep's prompt lengths and the options its requests add."""

    points: list[int]
    options: dict[str, Any]


def _context_plans(
    scenario: Scenario, mix: WorkloadMix, calib: RunCalibration
) -> dict[ContextSweepSpec, _ContextPlan]:
    """Each context sweep's lengths, up to the shortest context any endpoint reports, less
    the longest output asked and a 1% margin (min 8 tokens); decided before any phase."""
    plans: dict[ContextSweepSpec, _ContextPlan] = {}
    synthetic = [w for w in mix.workloads if not w.prompts_file]
    if not synthetic or not any(isinstance(x, ContextSweepSpec) for x in scenario.schedules):
        return plans
    output = max(max_output_tokens(w.max_tokens) for w in synthetic)
    limits = [calib.max_prompt(w.model or mix.model, output) for w in synthetic]
    known = [n for n in limits if n is not None]
    limit = min(known) - max(8, min(known) // 100) if known else None
    for spec in scenario.schedules:
        if not isinstance(spec, ContextSweepSpec):
            continue
        top = spec.up_to if limit is None else min(limit, spec.up_to or limit)
        if top is None:
            raise CalibrationFailed(
                "context sweep: no endpoint reports the model's context length; give its "
                "longest prompt (up_to, or --context-sweep POINTS:MAX)"
            )
        if top < 1:
            raise CalibrationFailed(f"context sweep: no room for a prompt beside {output} tokens")
        # Ollama truncates a prompt beyond num_ctx (its default is small): ask for room.
        ollama = "ollama" in calib.kinds.values()
        options = {"num_ctx": top + output + 16} if ollama else {}
        plans[spec] = _ContextPlan(context_points(spec.start, top, spec.points), options)
    return plans


async def _run_context(
    runner: Runner, spec: ContextSweepSpec, plan: _ContextPlan, lengths: dict[str, int]
) -> list[PhaseRun]:
    runs: list[PhaseRun] = []
    try:
        for n in plan.points:
            if runner.stopping:
                break
            runner.mix.force_prompt_tokens(n, plan.options)
            phase = PhasePlan(f"ctx={n}", ClosedLoop(spec.concurrency, spec.ramp_s), spec.stop())
            lengths[phase.name] = n
            runs.append(await runner.run(phase))
    finally:
        runner.mix.force_prompt_tokens(None)
    return runs


async def _run_phases(
    runner: Runner,
    scenario: Scenario,
    samplers: _Samplers,
    contexts: dict[ContextSweepSpec, _ContextPlan] | None = None,
    lengths: dict[str, int] | None = None,
) -> list[PhaseRun]:
    items: list[RunItem] = []
    sessions = runner.mix.sessions.sessions if runner.mix.sessions is not None else None
    # A sessions phase sends its sessions' every turn unless the schedule says otherwise.
    turns = sessions.count * sessions.turns if sessions is not None else None
    for spec in scenario.schedules:
        if isinstance(spec, SweepSpec | ContextSweepSpec):
            items.append(spec)
        else:
            items += phase_plans(spec, turns)
    runs: list[PhaseRun] = []
    for item in dedupe_names(items):
        if runner.stopping:
            break
        await asyncio.to_thread(samplers.mark)
        if isinstance(item, SweepSpec):
            runs += await _run_sweep(runner, item)
        elif isinstance(item, ContextSweepSpec):
            plan = (contexts or {})[item]
            runs += await _run_context(runner, item, plan, lengths if lengths is not None else {})
        else:
            runs.append(await runner.run(item))
    await asyncio.to_thread(samplers.mark)
    # A phase cut before its first request says nothing.
    return [r for r in runs if r.requests or r.stop_reason != "interrupted"]


async def _drive(runner: Runner, driver: PhaseDriver, samplers: _Samplers) -> list[PhaseRun]:
    runs: list[PhaseRun] = []

    async def run_phase(plan: PhasePlan) -> PhaseRun | None:
        if runner.stopping:
            return None
        await asyncio.to_thread(samplers.mark)
        runs.append(await runner.run(plan))
        return runs[-1]

    await driver(run_phase)
    await asyncio.to_thread(samplers.mark)
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
    if run.driver_cpu_s is not None and duration > 0:
        base["driver_cpu"] = round(run.driver_cpu_s / duration, 3)
    base["warnings"] = backlog_warnings(
        base.get("driver_cpu"),
        summary,
        requested_rate=None if isinstance(sched, ClosedLoop) else sched.rate,
        achieved=base["achieved_rate"],
    )
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


#: The event loop busy this share of a phase: requests queue behind the driver itself.
DRIVER_SATURATED = 0.9
#: Sends this late (p99) or waits this long inside the client (p99) are the driver's.
BACKLOG_MS = 10.0


def backlog_warnings(
    driver_cpu: float | None,
    summary: Summary,
    *,
    requested_rate: float | None,
    achieved: float | None,
) -> list[str]:
    """What says a phase's latencies include the bench's own backlog, not the server's."""
    out: list[str] = []
    if driver_cpu is not None and driver_cpu >= DRIVER_SATURATED:
        out.append(
            f"driver saturated: the bench's event loop was busy {driver_cpu:.0%} of the phase, "
            "so latencies include the client's own backlog (see `selftest` for its ceiling)"
        )
    lag = summary.send_lag_ms
    if lag is not None and lag.p99 > BACKLOG_MS:
        out.append(
            f"sent late: p99 schedule delay {lag.p99:.1f} ms (planned vs actual send); the "
            "driver could not keep the arrival schedule"
        )
    if requested_rate and achieved is not None and achieved < 0.95 * requested_rate:
        out.append(f"under-delivered: {achieved:.2f} req/s sent of {requested_rate:.2f} requested")
    queue = summary.client_queue_ms
    if queue is not None and queue.p99 > BACKLOG_MS:
        out.append(
            f"client queue: p99 {queue.p99:.1f} ms waiting inside the client before sending "
            "(endpoint slots or no routable endpoint): not server latency"
        )
    return out


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


def client_class(http: str) -> type[SharedClient]:
    """The client the bench drives: over aiohttp when asked, or by default when installed
    (it reads streams in C: about twice the requests per second on one core)."""
    if http == "httpx":
        return SharedClient
    try:
        from ..aiohttp_client import AiohttpSharedClient
    except ImportError:
        if http == "aiohttp":
            need = "--http aiohttp needs aiohttp: pip install 'shared-ollama[aiohttp]'"
            raise ValueError(need) from None
        return SharedClient
    return AiohttpSharedClient


async def run_scenario(
    scenario: Scenario,
    *,
    progress: ProgressSink | None = None,
    on_record: RecordSink | None = None,
    on_runner: Callable[[Runner], None] | None = None,
    driver: PhaseDriver | None = None,
) -> BenchResult:
    """Run every phase of ``scenario`` and return the result document.

    ``on_runner`` receives the runner before the first request (the CLI hooks Ctrl-C to
    ``runner.stop``); ``on_record`` sees every bench CallRecord as it ends. ``driver``, when
    given, runs phases of its own choosing in place of the scenario's schedules.
    """
    with contextlib.ExitStack() as stack:
        pool = scenario.pool
        if scenario.simulate:
            engines = stack.enter_context(simulated_pool(scenario.simulation))
            pool = pool.model_copy(update={"endpoints": engines})
        result = await _run(scenario, pool, progress, on_record, on_runner, driver)
    return result


async def _run(
    scenario: Scenario,
    pool: PoolConfig,
    progress: ProgressSink | None,
    on_record: RecordSink | None,
    on_runner: Callable[[Runner], None] | None,
    driver: PhaseDriver | None = None,
) -> BenchResult:
    started, t0 = datetime.now(UTC), time.monotonic_ns()
    model = scenario.model or (SIM_MODEL if scenario.simulate else None)
    mix = WorkloadMix(scenario.workloads, model, scenario.seed, salt=scenario.prompt_salt)
    collector = Collector(on_record)
    usage = None if "usage" in pool.model_fields_set else False  # keep the user's ledger clean
    client = client_class(scenario.http)(
        config=pool, project="bench", usage=usage, listeners=[collector]
    )
    samplers = _Samplers()
    runs: list[PhaseRun] = []
    notes: list[str] = []
    lengths: dict[str, int] = {}  # context-sweep phase -> its prompt length
    async with client:
        kinds = {st.url: st.kind for st in client.pool_status()}
        eps = [(ep, kinds.get(ep.url, ep.kind)) for ep in pool.endpoints]
        # Before the samplers start: calibration traffic stays out of the servers' counters.
        contexts_asked = any(isinstance(x, ContextSweepSpec) for x in scenario.schedules)
        # Routing workloads are sized in words: only the others are calibrated.
        plain = [w for w in scenario.workloads if not w.routing]
        calib = await calibrate_run(
            pool,
            plain,
            mix.model,
            mode=scenario.calibrate,
            disk=not scenario.simulate,  # simulated engines get new ports every run
            context=contexts_asked and driver is None,
        )
        mix.use_sizers(calib.sizers)
        contexts = _context_plans(scenario, mix, calib) if driver is None else {}
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
                if driver is None:
                    runs = await _run_phases(runner, scenario, samplers, contexts, lengths)
                else:
                    runs = await _drive(runner, driver, samplers)
        finally:
            series = await asyncio.to_thread(samplers.stop)
        interrupted = runner.stopping
    notes += calib.notes + samplers.notes
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
        sampling=samplers.info(scenario),
    )
    result = build_result(meta, runs, scenario.slo.as_dict(), series)
    if (price := scenario.cost.gpu_hour_price) is not None:
        findings.apply_cost(result, price, scenario.cost.gpus, scenario.cost.currency)
    # What the prompts were: how they were sized, and what the servers counted.
    result.calibrations = calib.records
    result.prompt_tokens = prompt_token_report(
        plain, calib.sizers, calib.records, result.requests, mix.drawn
    )
    for phase in result.phases:
        phase.prompt_tokens = lengths.get(phase.name)
    return result


def build_result(
    meta: RunMetadata, runs: Sequence[PhaseRun], slo: dict[str, float], series: Sequence[Series]
) -> BenchResult:
    """Assemble the document from phase runs and sampled series."""
    phases = [_phase_result(r, slo, series) for r in runs]
    for p in phases:  # a saturated host CPU makes every client-side time suspect
        p.warnings += findings.cpu_warnings(
            series, p.t_start_ns, p.t_end_ns, driver_cpu=p.driver_cpu
        )
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
