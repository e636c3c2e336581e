"""The scenario: pool, workloads, schedules, SLOs and samplers, from TOML and/or CLI flags.

Validated with pydantic; ``load_scenario`` turns every validation error into one readable
``ScenarioError`` line per problem. ``phase_plans`` expands schedules into phases.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import PoolConfig
from .scheduler import ClosedLoop, OpenLoop, PhasePlan, Stop
from .workload import Workload

__all__ = [
    "ConcurrencySpec",
    "CostSpec",
    "ContextSweepSpec",
    "RateSpec",
    "SamplerSpec",
    "Scenario",
    "SimulationSpec",
    "ScenarioError",
    "RunItem",
    "ScheduleSpec",
    "SloSpec",
    "SweepSpec",
    "WarmupSpec",
    "dedupe_names",
    "load_scenario",
    "phase_plans",
    "public_scenario",
    "read_scenario_file",
    "validate_scenario",
]


class ScenarioError(ValueError):
    """A scenario file or flag is invalid; the message says where and why."""


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _StopSpec(_Spec):
    #: Requests per phase (per level or rate); the default when neither is given: 100.
    requests: int | None = Field(default=None, ge=1)
    #: Seconds per phase; with ``requests`` too, whichever comes first.
    duration_s: float | None = Field(default=None, gt=0)

    def stop(self, default_requests: int = 100) -> Stop:
        """The stop rule (``default_requests`` when neither bound is set)."""
        if self.requests is None and self.duration_s is None:
            return Stop(requests=default_requests)
        return Stop(requests=self.requests, duration_s=self.duration_s)


class ConcurrencySpec(_StopSpec):
    """Closed loop: one phase per concurrency level."""

    kind: Literal["concurrency"] = "concurrency"
    levels: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    ramp_s: float = Field(default=0.0, ge=0)


class RateSpec(_StopSpec):
    """Open loop: one phase per rate (requests per second)."""

    kind: Literal["rate"] = "rate"
    rates: list[Annotated[float, Field(gt=0)]] = Field(min_length=1)
    arrival: Literal["constant", "poisson"] = "poisson"
    #: Gamma shape of inter-arrival times: 1 is Poisson, below 1 burstier.
    burstiness: float = Field(default=1.0, gt=0)
    ramp_s: float = Field(default=0.0, ge=0)


class SweepSpec(_StopSpec):
    """Synchronous (c=1), saturated (c=max_concurrency), then ``points`` rates between."""

    kind: Literal["sweep"] = "sweep"
    points: int = Field(default=5, ge=1, le=50)
    max_concurrency: int = Field(default=64, ge=1)
    arrival: Literal["constant", "poisson"] = "poisson"
    burstiness: float = Field(default=1.0, gt=0)


class ContextSweepSpec(_StopSpec):
    """Closed loop at rising prompt lengths: ``points`` lengths (server tokens, log-spaced)
    from ``start`` up to the model's context (``up_to`` when given), room for the output
    kept; one phase each (see docs/bench.md, "Context sweep")."""

    kind: Literal["context"] = "context"
    points: int = Field(default=6, ge=2, le=50)
    start: int = Field(default=128, ge=1)
    #: The longest prompt; None: the model's context as the servers report it.
    up_to: int | None = Field(default=None, ge=2)
    concurrency: int = Field(default=1, ge=1)
    ramp_s: float = Field(default=0.0, ge=0)

    def stop(self, default_requests: int = 10) -> Stop:
        """10 requests a length unless told (long prompts are slow)."""
        return super().stop(default_requests)


ScheduleSpec: TypeAlias = Annotated[
    ConcurrencySpec | RateSpec | SweepSpec | ContextSweepSpec, Field(discriminator="kind")
]


class WarmupSpec(_Spec):
    """Requests sent first and left out of every result."""

    requests: int = Field(default=2, ge=0)
    concurrency: int = Field(default=1, ge=1)


class SloSpec(_Spec):
    """Service-level objectives for goodput, in milliseconds."""

    ttft_ms: float | None = Field(default=None, gt=0)
    tpot_ms: float | None = Field(default=None, gt=0)
    e2e_ms: float | None = Field(default=None, gt=0)

    def as_dict(self) -> dict[str, float]:
        """The SLOs that are set."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class SamplerSpec(_Spec):
    """Background samplers (host always; GPU and server metrics where available)."""

    enabled: bool = True
    #: Host and GPU cadence (cheap reads of the kernel and the driver).
    interval_s: float = Field(default=0.5, ge=0.01)
    #: Server cadence: every scrape costs the server a /metrics render and the sampler a
    #: parse (a vLLM page: ~600 lines, ~16 ms of Python), so less often than the host's.
    server_interval_s: float = Field(default=2.0, ge=0.01)
    gpu: bool = True
    #: Scrape each openai/tgi endpoint's /metrics and each Ollama endpoint's /api/ps.
    servers: bool = True
    #: Sample in a process of their own (lower priority), never on the bench's GIL; false:
    #: on a thread of the bench process.
    process: bool = True


class CostSpec(_Spec):
    """The price basis of ``cost_per_1m_*``: a price per GPU-hour, the GPUs serving."""

    gpu_hour_price: float | None = Field(default=None, ge=0)
    #: GPUs behind the pool; default: the GPUs NVML sees on this host, else 1 (said so).
    gpus: int | None = Field(default=None, ge=1)
    currency: str = Field(default="USD", min_length=1, max_length=8)


SimKind: TypeAlias = Literal["ollama", "openai", "tgi"]


def _one_each() -> list[SimKind]:
    return ["ollama", "openai", "tgi"]


class SimulationSpec(_Spec):
    """``--simulate``'s FakeEngines: which protocols (one engine each, repeats allowed) and
    their prefix cache (see docs/fake_engine.md, "Prefix cache")."""

    engines: list[SimKind] = Field(default_factory=_one_each, min_length=1, max_length=64)
    #: Each engine's prefix cache, in tokens (0: none).
    prefix_cache_tokens: int = Field(default=0, ge=0)
    prefix_block_tokens: int = Field(default=16, ge=1)
    #: Prefill seconds per uncached prompt token on every engine (None: each kind's own).
    prefill_s_per_token: float | None = Field(default=None, ge=0)


def _default_schedules() -> list[ConcurrencySpec | RateSpec | SweepSpec | ContextSweepSpec]:
    return [ConcurrencySpec(levels=[1, 4, 16])]


class Scenario(_Spec):
    """Everything a run needs (see docs/bench.md, "Scenario file")."""

    name: str = Field(default="bench", pattern=r"^[A-Za-z0-9._-]+$")
    #: Default logical model for workloads that do not name one.
    model: str | None = None
    seed: int = 0
    #: Text put before every request's prompt (its first message, or the prompt). The
    #: strategy A/B against real servers gives each strategy its own, so that no strategy's
    #: run is served from the prompts an earlier one left in the servers' caches.
    prompt_salt: str = Field(default="", max_length=64)
    #: Output folder; default ``bench-results/<name>-<timestamp>``.
    out: str | None = None
    simulate: bool = False
    html: bool = True
    #: Also write ``report.pdf`` (matplotlib's PDF backend).
    pdf: bool = False
    #: The client's HTTP driver: aiohttp when installed ("auto"), else httpx (see
    #: ``shared_ollama.aiohttp_client``: about twice the streams per second on one core).
    http: Literal["auto", "httpx", "aiohttp"] = "auto"
    #: Synthetic prompt lengths in server tokens: "auto" measures each server once and
    #: keeps it on disk, "refresh" measures again, "off" counts words (``bench.calibrate``).
    calibrate: Literal["auto", "refresh", "off"] = "auto"
    pool: PoolConfig = Field(default_factory=PoolConfig)
    workloads: list[Workload] = Field(default_factory=lambda: [Workload()], min_length=1)
    schedules: list[ScheduleSpec] = Field(default_factory=_default_schedules, min_length=1)
    warmup: WarmupSpec = Field(default_factory=WarmupSpec)
    slo: SloSpec = Field(default_factory=SloSpec)
    samplers: SamplerSpec = Field(default_factory=SamplerSpec)
    cost: CostSpec = Field(default_factory=CostSpec)
    simulation: SimulationSpec = Field(default_factory=SimulationSpec)

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        names = [w.name for w in self.workloads]
        if len(set(names)) != len(names):
            raise ValueError("workload names must be unique")
        if not self.simulate and not self.pool.endpoints:
            raise ValueError("no endpoints: give --endpoint URL, [pool] endpoints, or --simulate")
        if not self.simulate and not self.model and any(not w.model for w in self.workloads):
            raise ValueError("no model: give --model, model = ..., or a model per workload")
        context = any(isinstance(x, ContextSweepSpec) for x in self.schedules)
        if context and all(w.prompts_file for w in self.workloads):
            raise ValueError("a context sweep sizes synthetic prompts: no workload has them")
        if any(w.sessions is not None for w in self.workloads):
            if len(self.workloads) > 1:
                raise ValueError("a sessions workload must be the only workload")
            if not all(isinstance(x, ConcurrencySpec) for x in self.schedules):
                raise ValueError("sessions run in closed loop: use concurrency schedules")
        return self


def _error_lines(exc: ValidationError, source: str) -> str:
    lines = []
    for e in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        where = f"{loc}: " if loc else ""
        # Never echo pool values: an api_key or a header may be among them.
        shown = "" if "pool" in e["loc"] or "input" not in e else f" (got {e['input']!r})"
        if e["type"] in ("missing", "extra_forbidden", "model_type", "union_tag_invalid"):
            shown = ""
        lines.append(f"  {where}{e['msg']}{shown}")
    return f"invalid scenario ({source}):\n" + "\n".join(lines)


def read_scenario_file(path: str | Path) -> dict[str, Any]:
    """The raw tables of a TOML scenario file (validated later, after flags apply)."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError(f"scenario file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path} is not valid TOML: {exc}") from None


def validate_scenario(data: Mapping[str, Any], source: str = "flags") -> Scenario:
    """Validate raw scenario data; every problem is one line of the ``ScenarioError``."""
    try:
        return Scenario.model_validate(dict(data))
    except ValidationError as exc:
        raise ScenarioError(_error_lines(exc, source)) from None


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a TOML scenario file."""
    return validate_scenario(read_scenario_file(path), str(path))


#: A phase, or a schedule whose phases are planned while it runs.
RunItem: TypeAlias = PhasePlan | SweepSpec | ContextSweepSpec


def dedupe_names(items: list[RunItem]) -> list[RunItem]:
    """Suffix repeated phase names (``c=4``, ``c=4#2``) so each phase is told apart."""
    seen: dict[str, int] = {}
    out: list[RunItem] = []
    for p in items:
        if isinstance(p, PhasePlan):
            n = seen[p.name] = seen.get(p.name, 0) + 1
            p = p if n == 1 else PhasePlan(f"{p.name}#{n}", p.schedule, p.stop)
        out.append(p)
    return out


def phase_plans(
    spec: ConcurrencySpec | RateSpec, default_requests: int | None = None
) -> list[PhasePlan]:
    """The phases of a concurrency or rate schedule (sweeps are expanded while running);
    ``default_requests`` replaces the 100 requests a phase sends when the schedule says
    nothing (a sessions workload: its sessions' turns)."""
    stop = spec.stop() if default_requests is None else spec.stop(default_requests)
    if isinstance(spec, ConcurrencySpec):
        plans = [PhasePlan(f"c={c}", ClosedLoop(c, spec.ramp_s), stop) for c in spec.levels]
    else:
        arrival, burst, ramp = spec.arrival, spec.burstiness, spec.ramp_s
        plans = [
            PhasePlan(f"rate={r:g}/s", OpenLoop(r, arrival, burst, ramp), stop) for r in spec.rates
        ]
    return plans


def public_scenario(s: Scenario) -> dict[str, Any]:
    """The scenario as stored in results: endpoints reduced to url/kind/name, no secrets,
    no output folder."""
    data = s.model_dump(mode="json", exclude={"pool", "out"})
    data["pool"] = s.pool.model_dump(mode="json", exclude={"endpoints"})
    data["pool"]["endpoints"] = [
        {"url": e.url, "kind": e.kind, "name": e.display_name} for e in s.pool.endpoints
    ]
    return data
