"""Synthetic CallRecords for the usage and telemetry tests (no client, no server)."""

from __future__ import annotations

from typing import Any

from shared_ollama.records import AttemptRecord, CallRecord

#: A fake credential: tests scan every output for it.
API_KEY = "sk-test-DO-NOT-LEAK-4f9c2a7e"

MS = 1_000_000  # ns


def make_record(
    request_id: str,
    *,
    project: str = "search",
    model: str | None = "llama3.2",
    t_start_ns: int = 1_800_000_000 * 1_000_000_000,
    duration_ms: float = 100.0,
    ttft_ms: float | None = None,
    outcome: str = "ok",
    error_type: str | None = None,
    input_tokens: int | None = 10,
    output_tokens: int | None = 20,
    attempts: int = 1,
    stream: bool = False,
    endpoint: str = "http://gpu-a:11434",
    protocol: str = "ollama",
    **extra: Any,
) -> CallRecord:
    """A finished call; ``t_start_ns`` is epoch ns when the ledger's offset is 0."""
    t_end = t_start_ns + int(duration_ms * MS)
    tries = [
        AttemptRecord(endpoint=endpoint, t_start_ns=t_start_ns, t_end_ns=t_end)
        for _ in range(attempts)
    ]
    for t in tries[:-1]:
        t.error_type, t.status_code = "ServerError", 503
    return CallRecord(
        request_id=request_id,
        project=project,
        operation=extra.pop("operation", "chat"),
        model=model,
        stream=stream,
        t_start_ns=t_start_ns,
        t_end_ns=t_end,
        t_first_chunk_ns=None if ttft_ms is None else t_start_ns + int(ttft_ms * MS),
        served_model=extra.pop("served_model", model),
        endpoint=endpoint,
        protocol=protocol,
        outcome=outcome,  # type: ignore[arg-type]
        error_type=error_type,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        attempts=tries,
        **extra,
    )
