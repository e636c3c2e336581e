"""The result document: one versioned pydantic schema, written as JSON plus a CSV of requests.

Raw per-request timestamps are stored; per-request metrics are computed fields derived
from them (``timings.derive``), so a reader can always recompute everything.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

from ..records import CallRecord
from .timings import Derived, derive

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "BenchResult",
    "CapacityProbe",
    "CapacityResult",
    "CostBasis",
    "EndpointSummary",
    "Estimate",
    "PhaseResult",
    "PromptCalibration",
    "PromptTokens",
    "RequestRecord",
    "RunMetadata",
    "SamplingInfo",
    "Series",
    "Stats",
    "Summary",
    "load_result",
    "write_csv",
    "write_json",
]

SCHEMA = "shared_ollama.bench.result"
#: Bumped on any change a reader must know about; readers refuse newer versions.
SCHEMA_VERSION = 1


def _ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 6)


class RequestRecord(BaseModel):
    """One measured request: what its CallRecord said, plus where the bench put it."""

    model_config = ConfigDict(extra="ignore")

    seq: int
    phase: str
    workload: str = ""
    operation: str = "chat"
    model: str | None = None
    served_model: str | None = None
    stream: bool = False
    endpoint: str | None = None
    endpoint_name: str | None = None
    protocol: str | None = None
    outcome: str = "ok"
    error_type: str | None = None
    attempts: int = 1
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None
    #: Open loop: the planned send time; closed loop: None (sent when a worker was free).
    t_scheduled_ns: int | None = None
    t_start_ns: int
    #: When the first attempt was sent: later than ``t_start_ns`` by the time the call
    #: waited inside the client (for an endpoint slot, a routable endpoint).
    t_first_send_ns: int | None = None
    t_first_chunk_ns: int | None = None
    #: Streams: arrival of the last chunk that carried content (E2E ends there).
    t_last_token_ns: int | None = None
    t_end_ns: int
    #: Chunk arrival times relative to ``t_start_ns``.
    chunk_offsets_ns: list[int] = Field(default_factory=list)
    #: Server-given tokens per chunk (None: not said).
    chunk_tokens: list[int | None] = Field(default_factory=list)
    #: Whether each chunk carried content (text, thinking or tool calls).
    chunk_content: list[bool] | None = None
    server_timings: dict[str, float] = Field(default_factory=dict)
    #: Prompt tokens the server served from its prefix cache, where it said.
    cached_tokens: int | None = None
    #: The routing decision's reason (``affinity``, ``spill``, ``least_loaded``...).
    routing: str | None = None
    #: The bench's ``session=`` (routing workloads; synthetic ids, never the user's).
    session: str | None = None
    #: Share of the prompt that repeats what an earlier request sent (a session's history,
    #: a shared prefix), where the workload knows it.
    history_share: float | None = None

    @classmethod
    def from_call(
        cls,
        rec: CallRecord,
        *,
        seq: int,
        phase: str,
        workload: str = "",
        t_scheduled_ns: int | None = None,
        chunk_content: Sequence[bool] | None = None,
        session: str | None = None,
        history_share: float | None = None,
    ) -> RequestRecord:
        """Copy what the bench needs from a CallRecord (nothing re-measured)."""
        content = list(chunk_content) if chunk_content is not None else None
        if content is not None and len(content) != len(rec.chunk_times_ns):
            content = None  # the caller did not see every chunk (an interrupted stream)
        return cls(
            seq=seq,
            phase=phase,
            workload=workload,
            operation=rec.operation,
            model=rec.model,
            served_model=rec.served_model,
            stream=rec.stream,
            endpoint=rec.endpoint,
            endpoint_name=rec.endpoint_name,
            protocol=rec.protocol,
            outcome=rec.outcome,
            error_type=rec.error_type,
            attempts=max(1, len(rec.attempts)),
            input_tokens=rec.input_tokens,
            output_tokens=rec.output_tokens,
            finish_reason=rec.finish_reason,
            t_scheduled_ns=t_scheduled_ns,
            t_start_ns=rec.t_start_ns,
            t_first_send_ns=rec.attempts[0].t_start_ns if rec.attempts else None,
            t_first_chunk_ns=rec.t_first_chunk_ns,
            t_last_token_ns=rec.t_last_token_ns if rec.stream else None,
            t_end_ns=rec.t_end_ns,
            chunk_offsets_ns=[t - rec.t_start_ns for t in rec.chunk_times_ns],
            chunk_tokens=list(rec.chunk_tokens),
            chunk_content=content,
            server_timings=dict(rec.server_timings),
            cached_tokens=rec.cached_tokens,
            routing=rec.routing.reason if rec.routing is not None else None,
            session=session,
            history_share=history_share,
        )

    def derived(self) -> Derived:
        """TTFT/TPOT/ITLs from the raw timestamps (cached)."""
        return self.derivation

    # A cached_property, not a private attribute: reading a pydantic private attribute takes
    # the model's __getattr__ (about a microsecond; ten reads per request in a summary).
    @cached_property
    def derivation(self) -> Derived:
        """The derived timings, computed once."""
        return derive(
            self.t_start_ns,
            self.t_end_ns,
            self.chunk_offsets_ns if self.stream else [],
            self.chunk_tokens,
            self.output_tokens,
            self.chunk_content,
        )

    @property
    def ok(self) -> bool:
        """The call succeeded."""
        return self.outcome == "ok"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ttft_ms(self) -> float | None:
        """Time to the first content chunk (streams only)."""
        return _ms(self.derived().ttft_ns)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tpot_ms(self) -> float | None:
        """Mean time per output token after the first chunk (streams only)."""
        return _ms(self.derived().tpot_ns)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def e2e_ms(self) -> float:
        """Start of the call to its last token (streams, as vLLM's bench), else to its end;
        retries included."""
        end = self.t_last_token_ns if self.t_last_token_ns is not None else self.t_end_ns
        return _ms(end - self.t_start_ns) or 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def call_ms(self) -> float:
        """Start of the call to its very end: a stream's closing events (usage, ``[DONE]``)
        and the reply's release included."""
        return _ms(self.t_end_ns - self.t_start_ns) or 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def client_queue_ms(self) -> float | None:
        """Time the call waited inside the client before its first send."""
        if self.t_first_send_ns is None:
            return None
        return _ms(max(0, self.t_first_send_ns - self.t_start_ns))

    @computed_field  # type: ignore[prop-decorator]
    @property
    def send_lag_ms(self) -> float | None:
        """How late the request left compared with its planned time (open loop)."""
        if self.t_scheduled_ns is None:
            return None
        return _ms(self.t_start_ns - self.t_scheduled_ns)


class Stats(BaseModel):
    """Distribution summary; percentiles interpolate linearly (numpy's default)."""

    model_config = ConfigDict(frozen=True)

    count: int
    mean: float
    stdev: float
    min: float
    max: float
    p50: float
    p90: float
    p95: float
    p99: float


class EndpointSummary(BaseModel):
    """One endpoint's share of a phase."""

    requests: int
    completed: int
    failed: int
    output_tokens: int
    output_throughput: float
    ttft_ms: Stats | None = None
    tpot_ms: Stats | None = None
    e2e_ms: Stats | None = None
    errors_by_type: dict[str, int] = Field(default_factory=dict)


class Summary(BaseModel):
    """Aggregates of a set of requests (a phase, or the whole run)."""

    requests: int
    completed: int
    failed: int
    cancelled: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    #: Completed requests meeting every SLO, per second (None without SLOs).
    goodput: float | None = None
    goodput_fraction: float | None = None
    ttft_ms: Stats | None = None
    tpot_ms: Stats | None = None
    itl_ms: Stats | None = None
    e2e_ms: Stats | None = None
    send_lag_ms: Stats | None = None
    client_queue_ms: Stats | None = None
    errors_by_type: dict[str, int] = Field(default_factory=dict)
    retries: int = 0
    retried_requests: int = 0
    per_endpoint: dict[str, EndpointSummary] = Field(default_factory=dict)
    #: Server-reported breakdown: ``ollama.load_ms``, ``tgi.queue_ms``, ...
    server: dict[str, Stats] = Field(default_factory=dict)
    energy_j: float | None = None
    tokens_per_joule: float | None = None
    #: Given a price per GPU-hour (``BenchResult.cost``): price x GPUs x duration per
    #: million output tokens, and per million input + output tokens.
    cost_per_1m_output_tokens: float | None = None
    cost_per_1m_tokens: float | None = None
    #: The same figures under vLLM ``benchmark_serving`` key names.
    vllm: dict[str, float | int | None] = Field(default_factory=dict)
    #: Prefix cache, over completed requests whose server said what hit (None: none said):
    #: how many, their cached prompt tokens, cached / prompt tokens, and cached / history
    #: tokens (the prompt share an earlier request sent, where the workload knows it).
    cache_reported: int = 0
    cached_tokens: int | None = None
    cache_hit_ratio: float | None = None
    history_hit_ratio: float | None = None
    #: Routing decisions by reason (``affinity``, ``spill``, ``round_robin``...).
    routing: dict[str, int] = Field(default_factory=dict)


class PhaseResult(BaseModel):
    """One phase: its schedule, what was achieved and its summary."""

    name: str
    mode: Literal["closed", "open"]
    concurrency: int | None = None
    requested_rate: float | None = None
    achieved_rate: float | None = None
    arrival: str | None = None
    burstiness: float | None = None
    ramp_s: float = 0.0
    planned_requests: int | None = None
    planned_duration_s: float | None = None
    stop_reason: Literal["requests", "duration", "interrupted"] = "requests"
    t_start_ns: int
    t_end_ns: int
    summary: Summary
    #: CPU the bench process used during the phase, in cores (1.0: one core busy).
    driver_cpu: float | None = None
    #: What makes the phase's figures suspect (the client's own backlog, a saturated host
    #: CPU, ...): shown in the terminal summary and the HTML report.
    warnings: list[str] = Field(default_factory=list)
    #: A context-sweep phase: the prompt length (server tokens) every request asked for.
    prompt_tokens: int | None = None


class Series(BaseModel):
    """A sampled time series (from ``bench.samplers``), on the run's monotonic clock."""

    model_config = ConfigDict(extra="allow")

    name: str
    available: bool = True
    reason: str | None = None
    times_ns: list[int] = Field(default_factory=list)
    #: Metric (unit in its name: ``gpu0.power_w``) -> one value per time, None: missing.
    values: dict[str, list[float | None]] = Field(default_factory=dict)
    errors: int = 0
    last_error: str | None = None
    #: The cadence it was read at, in seconds (phase boundaries add readings).
    interval_s: float | None = None


class SamplingInfo(BaseModel):
    """How the samplers ran: their cadences and where (their cost to what they observe)."""

    enabled: bool | None = None
    #: "process": a sampler process of its own; "thread": a thread of the bench process.
    where: Literal["process", "thread"] | None = None
    #: Host and GPU cadence, and the servers' (/metrics, /api/ps), in seconds.
    interval_s: float | None = None
    server_interval_s: float | None = None
    #: CPU seconds the sampler process spent sampling, its start not counted (process only).
    process_cpu_s: float | None = None
    #: Why a thread ran them when a process was asked.
    fallback: str | None = None


class CostBasis(BaseModel):
    """What ``cost_per_1m_*`` assume: a price per GPU-hour and how many GPUs serve."""

    gpu_hour_price: float
    gpus: int
    #: Where the GPU count came from: "given" (``--gpus``), "nvml" (seen here), "assumed" (1).
    gpus_from: Literal["given", "nvml", "assumed"] = "given"
    currency: str = "USD"


class RunMetadata(BaseModel):
    """Where, when and with what the run happened (no secrets: URLs only)."""

    started_at: str
    finished_at: str
    wall_duration_s: float
    #: ``time.monotonic_ns()`` at the run start: every ``*_ns`` value is on that clock.
    monotonic_origin_ns: int
    versions: dict[str, str] = Field(default_factory=dict)
    host: dict[str, Any] = Field(default_factory=dict)
    gpus: list[dict[str, Any]] = Field(default_factory=list)
    endpoints: list[dict[str, str]] = Field(default_factory=list)
    scenario: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    simulate: bool = False
    interrupted: bool = False
    notes: list[str] = Field(default_factory=list)
    sampling: SamplingInfo = Field(default_factory=SamplingInfo)


class Estimate(BaseModel):
    """One SLO metric at one load: the value of each repeat, their mean and its confidence
    interval (Student's t; None with a single repeat)."""

    values: list[float | None]
    mean: float | None = None
    low: float | None = None
    high: float | None = None


class CapacityProbe(BaseModel):
    """One load of a capacity search, measured ``repeats`` times (see ``bench.capacity``)."""

    load: float
    #: The phases that measured it, one per repeat.
    phases: list[str] = Field(default_factory=list)
    #: SLO metric -> its estimate over the repeats.
    metrics: dict[str, Estimate] = Field(default_factory=dict)
    #: Completed requests per second, mean over the repeats.
    throughput: float | None = None
    #: Open loop: achieved send rate, mean over the repeats.
    achieved_rate: float | None = None
    passed: bool
    #: A confidence interval straddles its limit: more repeats could change the verdict.
    uncertain: bool = False


class CapacityResult(BaseModel):
    """``bench capacity``: the highest load meeting every SLO, and every probe on the way."""

    search: Literal["concurrency", "rate"]
    #: Metric -> upper limit, e.g. ``{"p99_ttft_ms": 500.0}``.
    slo: dict[str, float]
    repeats: int
    confidence: float
    start: float
    max_load: float
    #: ``"5%"`` (of the load) or an absolute step in load units.
    resolution: str
    #: found | at_max_load (passes at max_load: capacity is at least that) | below_start
    #: (fails at the lowest load) | interrupted.
    status: Literal["found", "at_max_load", "below_start", "interrupted"]
    #: The highest load that met the SLO (None: none did).
    capacity: float | None = None
    #: The lowest load that failed it (None: none did).
    ceiling: float | None = None
    probes: list[CapacityProbe] = Field(default_factory=list)


class PromptCalibration(BaseModel):
    """How synthetic prompts were sized for one endpoint, model and request shape."""

    endpoint: str
    model: str
    operation: str
    #: Whether the workloads send a system prompt (it is part of what was measured).
    system: bool = False
    workloads: list[str] = Field(default_factory=list)
    #: ``tokenize:vllm``, ``tokenize:llama.cpp``, ``tokenize:tgi`` (word costs from the
    #: server's /tokenize), ``generation`` (from 1-token generations' prompt counts), or
    #: ``none`` (no way to count: lengths in words).
    method: str = "none"
    #: Taken from the on-disk cache (after its check passed).
    cached: bool = False
    requests: int = 0
    seconds: float = 0.0
    #: The fewest tokens a synthetic prompt can have (template and one word).
    shortest_prompt: int | None = None
    tokens_per_word: float | None = None
    #: The check: one sized prompt's predicted and server-counted prompt tokens.
    check_predicted: int | None = None
    check_counted: int | None = None
    context_tokens: int | None = None
    context_source: str | None = None
    note: str | None = None


class PromptTokens(BaseModel):
    """One workload's prompt lengths: what was asked vs what the server counted."""

    workload: str
    #: The length distribution asked for (``128``, ``uniform:64:256``) or "prompts file".
    target: str
    #: How prompts were sized: a calibration method, "words" (not calibrated) or "file".
    method: str
    tolerance_pct: float = 2.0
    #: Measured requests whose reply carried a prompt count.
    requests: int = 0
    target_mean: float | None = None
    #: What the calibration predicted the server would count.
    expected_mean: float | None = None
    server_mean: float | None = None
    server_min: int | None = None
    server_max: int | None = None
    #: Per request (server - target) / target, in percent.
    mean_error_pct: float | None = None
    max_abs_error_pct: float | None = None
    #: Share of requests within ``tolerance_pct`` of their target.
    within_tolerance: float | None = None


class BenchResult(BaseModel):
    """The whole result document."""

    schema_name: str = Field(default=SCHEMA, alias="schema")
    schema_version: int = SCHEMA_VERSION
    metadata: RunMetadata
    #: How every metric is computed (the same text as docs/bench.md).
    definitions: dict[str, str] = Field(default_factory=dict)
    slo: dict[str, float] = Field(default_factory=dict)
    phases: list[PhaseResult] = Field(default_factory=list)
    #: Over every measured phase (throughputs use the sum of phase durations).
    summary: Summary
    requests: list[RequestRecord] = Field(default_factory=list)
    samples: list[Series] = Field(default_factory=list)
    #: Series name -> metric -> mean/max/min/last (``samplers.summarize``).
    sample_summary: dict[str, dict[str, dict[str, float]]] = Field(default_factory=dict)
    #: How synthetic prompts were sized (``bench.calibrate``), per endpoint and shape.
    calibrations: list[PromptCalibration] = Field(default_factory=list)
    #: Per workload: target vs server-counted prompt tokens over the measured requests.
    prompt_tokens: list[PromptTokens] = Field(default_factory=list)
    #: ``bench capacity`` only (older results and ``run`` have none).
    capacity: CapacityResult | None = None
    #: The price basis of the summaries' ``cost_per_1m_*`` (None: no price given).
    cost: CostBasis | None = None

    model_config = ConfigDict(populate_by_name=True)


def write_json(result: BenchResult, path: str | Path) -> Path:
    """Write the document (UTF-8 JSON) and return its path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result.model_dump_json(by_alias=True, indent=1), encoding="utf-8")
    return out


def load_result(path: str | Path) -> BenchResult:
    """Read a result document, refusing other schemas and newer versions."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read a result ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a shared_ollama bench result")
    version = data.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(f"{path}: schema version {version} is newer than this reader's")
    return BenchResult.model_validate(data)


_CSV_TIMINGS = (
    ("load_duration_ns", "server_load_ms", 1e-6),
    ("prompt_eval_duration_ns", "server_prefill_ms", 1e-6),
    ("eval_duration_ns", "server_decode_ms", 1e-6),
    ("queue_time_ms", "server_queue_ms", 1.0),
    ("inference_time_ms", "server_inference_ms", 1.0),
)
_CSV_FIELDS = (
    *("seq", "phase", "workload", "operation", "model", "served_model", "stream", "endpoint"),
    *("protocol", "outcome", "error_type", "attempts", "input_tokens", "output_tokens"),
    *("finish_reason", "t_scheduled_ns", "t_start_ns", "t_first_chunk_ns", "t_end_ns"),
    *("n_chunks", "ttft_ms", "tpot_ms", "e2e_ms", "send_lag_ms", "client_queue_ms"),
    *("cached_tokens", "routing", "session", "history_share"),
)


def write_csv(requests: Sequence[RequestRecord], path: str | Path) -> Path:
    """One row per request: raw timestamps, derived metrics and server timings."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*_CSV_FIELDS, *(name for _, name, _ in _CSV_TIMINGS)])
        for r in requests:
            row = r.model_dump(include=set(_CSV_FIELDS))
            row["n_chunks"] = len(r.chunk_offsets_ns)
            timings = [
                "" if (v := r.server_timings.get(key)) is None else round(v * scale, 6)
                for key, _, scale in _CSV_TIMINGS
            ]
            writer.writerow(["" if row.get(k) is None else row[k] for k in _CSV_FIELDS] + timings)
    return out
