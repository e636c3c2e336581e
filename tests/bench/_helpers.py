"""Synthetic CallRecords with exactly known timings for the bench's metric tests."""

from __future__ import annotations

from collections.abc import Sequence

from shared_ollama.bench.result import RequestRecord
from shared_ollama.records import AttemptRecord, CallRecord

MS = 1_000_000


def call(
    *,
    start_ms: float = 0.0,
    chunks_ms: Sequence[float] = (),
    end_ms: float | None = None,
    chunk_tokens: Sequence[int | None] | None = None,
    output_tokens: int | None = None,
    input_tokens: int | None = 10,
    outcome: str = "ok",
    error_type: str | None = None,
    attempts: int = 1,
    endpoint: str = "http://a:1",
    stream: bool = True,
    timings: dict[str, float] | None = None,
) -> CallRecord:
    """A CallRecord whose chunks arrive at ``chunks_ms`` after ``start_ms``."""
    t0 = int(start_ms * MS)
    times = [t0 + int(c * MS) for c in chunks_ms]
    end = t0 + int((end_ms if end_ms is not None else (chunks_ms[-1] if chunks_ms else 0)) * MS)
    return CallRecord(
        request_id="r",
        project="bench",
        operation="chat",
        model="m",
        stream=stream,
        t_start_ns=t0,
        t_end_ns=end,
        t_first_chunk_ns=times[0] if times else end,
        endpoint=endpoint,
        outcome=outcome,  # type: ignore[arg-type]
        error_type=error_type,
        input_tokens=input_tokens,
        output_tokens=output_tokens if output_tokens is not None else len(times),
        attempts=[AttemptRecord(endpoint=endpoint, t_start_ns=t0) for _ in range(attempts)],
        chunk_times_ns=times,
        chunk_tokens=list(chunk_tokens) if chunk_tokens is not None else [None] * len(times),
        server_timings=dict(timings or {}),
    )


def req(
    seq: int = 1,
    phase: str = "p",
    content: Sequence[bool] | None = None,
    t_scheduled_ms: float | None = None,
    **kw: object,
) -> RequestRecord:
    """A RequestRecord built through ``RequestRecord.from_call``."""
    rec = call(**kw)  # type: ignore[arg-type]
    sched = None if t_scheduled_ms is None else int(t_scheduled_ms * MS)
    return RequestRecord.from_call(
        rec, seq=seq, phase=phase, t_scheduled_ns=sched, chunk_content=content
    )
