"""Aggregate metrics over measured requests: distributions, throughput, goodput, breakdowns.

Everything comes from ``RequestRecord``s (raw CallRecord values); nothing is re-measured
or re-tokenized. ``DEFINITIONS`` is the text written into every result and docs/bench.md.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from .result import EndpointSummary, RequestRecord, Stats, Summary

__all__ = [
    "DEFINITIONS",
    "PERCENTILES",
    "SLO_KEYS",
    "meets_slo",
    "parse_slo",
    "server_breakdown",
    "stats",
    "summarize",
    "vllm_keys",
]

PERCENTILES = (50, 90, 95, 99)
#: ``--slo`` names -> per-request fields (milliseconds).
SLO_KEYS = {"ttft": "ttft_ms", "tpot": "tpot_ms", "e2e": "e2e_ms"}

DEFINITIONS = {
    "ttft_ms": "Streams only: first chunk with content minus call start (t_start_ns), "
    "client clock, retries included.",
    "tpot_ms": "Streams only, per request: (last token-carrying chunk - first token-carrying "
    "chunk) / (output tokens - tokens of the first chunk). Excludes the first token.",
    "itl_ms": "Per output token after the first chunk, pooled over requests: a chunk carrying "
    "k tokens that arrived g after the previous token-carrying chunk gives k values g/k.",
    "e2e_ms": "Streams: the last content-carrying chunk's arrival - t_start_ns (as vLLM's "
    "bench); otherwise t_end_ns - t_start_ns (client side, retries included).",
    "call_ms": "t_end_ns - t_start_ns: the whole call, a stream's closing events (usage "
    "chunk, [DONE]) and the reply's release included (per request, in the result file).",
    "apportioning": "Tokens per chunk: the server's per-chunk count where given; chunks "
    "without content carry 0; the rest of the server's output count is shared over the "
    "other content chunks in proportion to the wait before each (at least one token each; "
    "the first chunk weighs as the median wait), largest remainders to the earliest.",
    "stats": "mean; stdev (population, ddof=0, as vLLM); p50/p90/p95/p99 by linear "
    "interpolation (numpy.percentile). Latencies over completed requests only.",
    "duration_s": "Phase: first send to last completion. Run: sum of the phases.",
    "request_throughput": "Completed requests / duration_s.",
    "output_throughput": "Output tokens (server counts) of completed requests / duration_s.",
    "total_token_throughput": "(Input + output tokens) of completed requests / duration_s.",
    "goodput": "Completed requests meeting every SLO / duration_s; an SLO on a metric the "
    "request lacks (TTFT/TPOT of a non-stream call) is not applied to it.",
    "send_lag_ms": "Open loop: actual send (t_start_ns) minus planned send time (the "
    "schedule delay: the driver sending late).",
    "client_queue_ms": "Time a call waited inside the client before its first attempt was "
    "sent (an endpoint slot, a routable endpoint).",
    "driver_cpu": "CPU time of the bench's event-loop thread over the phase's wall time: "
    "near 1.0 the driver, not the server, sets the pace.",
    "achieved_rate": "(sends - 1) / (last send - first send).",
    "errors_by_type": "Failed calls (error or interrupted stream) by exception class name.",
    "retries": "Attempts beyond the first, summed over calls.",
    "server.queue_ms": "Ollama: total - load - prompt eval - eval durations; TGI: x-queue-time.",
    "server.load_ms": "Ollama load_duration.",
    "server.prefill_ms": "Ollama/llama.cpp prompt eval duration.",
    "server.decode_ms": "Ollama/llama.cpp eval duration.",
    "server.decode_ms_per_token": "Eval duration / output tokens.",
    "server.inference_ms": "TGI x-inference-time.",
    "server.overhead_ms": "Client call time - the server's total (Ollama total_duration): network, "
    "HTTP and client time.",
    "energy_j": "GPU energy counter difference over the phase (all GPUs), when NVML has one.",
    "tokens_per_joule": "Output tokens of completed requests / energy_j.",
    "cache_hit_ratio": "Sum of cached prompt tokens / sum of prompt tokens, over completed "
    "requests whose server reported its cache hits (OpenAI usage.prompt_tokens_details."
    "cached_tokens, llama.cpp timings.cache_n).",
    "history_hit_ratio": "Sum of cached prompt tokens / sum of history tokens (prompt tokens "
    "x the workload's history share: the part an earlier request already sent), over the "
    "same requests; 1.0: every reusable token was served from a cache.",
    "endpoint_imbalance": "Requests of the busiest endpoint / mean requests per endpoint of "
    "the pool (1.0: even).",
}


def stats(values: Iterable[float]) -> Stats | None:
    """Mean, stdev, min, max and percentiles; None for no values."""
    arr = np.fromiter(values, dtype=float)
    if arr.size == 0:
        return None
    p50, p90, p95, p99 = np.percentile(arr, PERCENTILES)
    return Stats(
        count=int(arr.size),
        mean=float(arr.mean()),
        stdev=float(arr.std()),
        min=float(arr.min()),
        max=float(arr.max()),
        p50=float(p50),
        p90=float(p90),
        p95=float(p95),
        p99=float(p99),
    )


def parse_slo(spec: str) -> dict[str, float]:
    """``"ttft:500,tpot:50,e2e:10000"`` (milliseconds) -> ``{"ttft_ms": 500.0, ...}``."""
    out: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = item.partition(":")
        key = SLO_KEYS.get(name.strip().lower().removesuffix("_ms"))
        if not sep or key is None:
            raise ValueError(f"bad SLO {item!r}: use ttft:MS, tpot:MS or e2e:MS")
        try:
            ms = float(value.strip().removesuffix("ms"))
        except ValueError:
            raise ValueError(f"bad SLO {item!r}: {value!r} is not a number of ms") from None
        if not ms > 0:
            raise ValueError(f"bad SLO {item!r}: must be positive")
        out[key] = ms
    return out


def meets_slo(r: RequestRecord, slo: Mapping[str, float]) -> bool:
    """Completed and within every SLO that applies to it."""
    if not r.ok:
        return False
    values = {"ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms, "e2e_ms": r.e2e_ms}
    for key, limit in slo.items():
        value = values[key]
        if value is not None and value > limit:
            return False
    return True


def _span_s(requests: Sequence[RequestRecord]) -> float:
    if not requests:
        return 0.0
    start = min(r.t_scheduled_ns or r.t_start_ns for r in requests)
    return (max(r.t_end_ns for r in requests) - start) / 1e9


def _ms_stats(
    rs: Iterable[RequestRecord], get: Callable[[RequestRecord], float | None]
) -> Stats | None:
    return stats(v for r in rs if (v := get(r)) is not None)


def _endpoint(rs: Sequence[RequestRecord], duration_s: float) -> EndpointSummary:
    ok = [r for r in rs if r.ok]
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    return EndpointSummary(
        requests=len(rs),
        completed=len(ok),
        failed=sum(1 for r in rs if r.outcome in ("error", "interrupted")),
        output_tokens=out_tokens,
        output_throughput=out_tokens / duration_s if duration_s > 0 else 0.0,
        ttft_ms=_ms_stats(ok, lambda r: r.ttft_ms),
        tpot_ms=_ms_stats(ok, lambda r: r.tpot_ms),
        e2e_ms=_ms_stats(ok, lambda r: r.e2e_ms),
        errors_by_type=_errors(rs),
    )


def _errors(rs: Iterable[RequestRecord]) -> dict[str, int]:
    counts = Counter(r.error_type or "unknown" for r in rs if r.outcome in ("error", "interrupted"))
    return dict(counts.most_common())


def server_breakdown(requests: Iterable[RequestRecord]) -> dict[str, Stats]:
    """Server-reported timings of completed requests, in ms (see ``DEFINITIONS``)."""
    cols: dict[str, list[float]] = defaultdict(list)
    for r in requests:
        if not r.ok:
            continue
        for name, value in _server_values(r).items():
            cols[name].append(value)
    return {k: s for k, v in sorted(cols.items()) if (s := stats(v)) is not None}


def _server_values(r: RequestRecord) -> dict[str, float]:
    t = r.server_timings
    out: dict[str, float] = {}
    parts = {
        "load_ms": "load_duration_ns",
        "prefill_ms": "prompt_eval_duration_ns",
        "decode_ms": "eval_duration_ns",
    }
    for name, key in parts.items():
        if key in t:
            out[name] = t[key] / 1e6
    if "eval_duration_ns" in t and r.output_tokens:
        out["decode_ms_per_token"] = t["eval_duration_ns"] / 1e6 / r.output_tokens
    if (total := t.get("total_duration_ns")) is not None:
        spent = sum(t.get(key, 0.0) for key in parts.values())
        out["queue_ms"] = max(0.0, total - spent) / 1e6
        out["overhead_ms"] = r.call_ms - total / 1e6
    for key, name in (
        ("queue_time_ms", "queue_ms"),
        ("inference_time_ms", "inference_ms"),
        ("validation_time_ms", "validation_ms"),
        ("time_per_token_ms", "time_per_token_ms"),
    ):
        if key in t:
            out[name] = t[key]
    return out


def summarize(
    requests: Sequence[RequestRecord],
    *,
    slo: Mapping[str, float] | None = None,
    duration_s: float | None = None,
    energy_j: float | None = None,
) -> Summary:
    """Aggregate one phase (or any set of requests); ``duration_s`` defaults to their span."""
    slo = slo or {}
    duration = _span_s(requests) if duration_s is None else duration_s
    ok = [r for r in requests if r.ok]
    per_s = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    in_tokens = sum(r.input_tokens or 0 for r in ok)
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    good = sum(1 for r in ok if meets_slo(r, slo)) if slo else None
    by_ep: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in requests:
        by_ep[r.endpoint or "(none)"].append(r)
    summary = Summary(
        requests=len(requests),
        completed=len(ok),
        failed=sum(1 for r in requests if r.outcome in ("error", "interrupted")),
        cancelled=sum(1 for r in requests if r.outcome == "cancelled"),
        duration_s=duration,
        total_input_tokens=in_tokens,
        total_output_tokens=out_tokens,
        request_throughput=per_s(len(ok)),
        output_throughput=per_s(out_tokens),
        total_token_throughput=per_s(in_tokens + out_tokens),
        goodput=None if good is None else per_s(good),
        goodput_fraction=None if good is None or not ok else good / len(ok),
        ttft_ms=_ms_stats(ok, lambda r: r.ttft_ms),
        tpot_ms=_ms_stats(ok, lambda r: r.tpot_ms),
        itl_ms=stats(v / 1e6 for r in ok for v in r.derived().itls_ns),
        e2e_ms=_ms_stats(ok, lambda r: r.e2e_ms),
        send_lag_ms=_ms_stats(requests, lambda r: r.send_lag_ms),
        client_queue_ms=_ms_stats(requests, lambda r: r.client_queue_ms),
        errors_by_type=_errors(requests),
        retries=sum(r.attempts - 1 for r in requests),
        retried_requests=sum(1 for r in requests if r.attempts > 1),
        per_endpoint={ep: _endpoint(rs, duration) for ep, rs in sorted(by_ep.items())},
        server=server_breakdown(ok),
        energy_j=energy_j,
        tokens_per_joule=out_tokens / energy_j if energy_j else None,
    )
    _cache(summary, ok)
    summary.vllm = vllm_keys(summary)
    return summary


def _cache(summary: Summary, ok: Sequence[RequestRecord]) -> None:
    """The prefix-cache figures and routing reasons (see ``DEFINITIONS``)."""
    summary.routing = dict(Counter(r.routing for r in ok if r.routing).most_common())
    told = [r for r in ok if r.cached_tokens is not None and r.input_tokens]
    if not told:
        return
    cached = sum(r.cached_tokens or 0 for r in told)
    prompt = sum(r.input_tokens or 0 for r in told)
    summary.cache_reported = len(told)
    summary.cached_tokens = cached
    summary.cache_hit_ratio = cached / prompt if prompt else None
    known = [r for r in told if r.history_share is not None]
    history = sum((r.history_share or 0.0) * (r.input_tokens or 0) for r in known)
    if history > 0:
        summary.history_hit_ratio = sum(r.cached_tokens or 0 for r in known) / history


def vllm_keys(s: Summary) -> dict[str, float | int | None]:
    """The summary under vLLM ``benchmark_serving`` names (``mean_ttft_ms``, ...)."""
    out: dict[str, float | int | None] = {
        "duration": s.duration_s,
        "completed": s.completed,
        "total_input_tokens": s.total_input_tokens,
        "total_output_tokens": s.total_output_tokens,
        "request_throughput": s.request_throughput,
        "request_goodput": s.goodput,
        "output_throughput": s.output_throughput,
        "total_token_throughput": s.total_token_throughput,
    }
    for ours, theirs in (
        ("ttft_ms", "ttft"),
        ("tpot_ms", "tpot"),
        ("itl_ms", "itl"),
        ("e2e_ms", "e2el"),
    ):
        st: Stats | None = getattr(s, ours)
        out[f"mean_{theirs}_ms"] = st.mean if st else None
        out[f"median_{theirs}_ms"] = st.p50 if st else None
        out[f"std_{theirs}_ms"] = st.stdev if st else None
        for p in PERCENTILES:
            out[f"p{p}_{theirs}_ms"] = getattr(st, f"p{p}") if st else None
    return out
