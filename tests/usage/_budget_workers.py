"""Functions the shared-budget tests run in child processes (importable, so ``spawn`` works)."""

from __future__ import annotations

from threading import Barrier

from shared_ollama import (
    Endpoint,
    HealthPolicy,
    RetryPolicy,
    SyncSharedClient,
    Timeouts,
    UsageConfig,
)
from shared_ollama.config import Budget
from shared_ollama.errors import BudgetExceeded, BudgetUnavailable
from shared_ollama.records import CallRecord
from shared_ollama.usage.budget import BudgetGate
from shared_ollama.usage.limits import open_limits

PROJECT = "shared"
#: Every child waits this long at most for the others to arrive (a dead sibling fails the test).
BARRIER_TIMEOUT_S = 120.0


def admit_requests(location: str, barrier: Barrier, limit: int, tries: int, now: float) -> int:
    """Try ``tries`` admissions against a shared ``requests_per_minute=limit``; how many passed.

    Every child reads the same fixed clock, so the window is the same for all of them.
    """
    gate = BudgetGate(
        {PROJECT: Budget(requests_per_minute=limit)},
        limits=open_limits(location),
        clock=lambda: now,
    )
    admitted = 0
    try:
        barrier.wait(BARRIER_TIMEOUT_S)  # every child admits at the same moment
        for _ in range(tries):
            try:
                gate.admit(PROJECT, 0.0)
            except BudgetUnavailable:
                raise  # a store failure is not a refusal: the test must see it
            except BudgetExceeded:
                continue
            admitted += 1
    finally:
        gate.close()
    return admitted


def call_until_refused(
    engine_url: str,
    model: str,
    ledger: str,
    barrier: Barrier,
    tokens_per_minute: int,
    prompt: str,
    max_tokens: int,
) -> list[tuple[int, int]]:
    """Chat against the FakeEngine under a shared token budget until it refuses a call.

    Returns each finished call's (input tokens, output tokens) as the server reported them.
    """
    seen: list[tuple[int, int]] = []

    def listen(record: CallRecord) -> None:
        seen.append((record.input_tokens or 0, record.output_tokens or 0))

    client = SyncSharedClient(
        endpoints=[Endpoint(url=engine_url, kind="ollama")],
        project=PROJECT,
        health=HealthPolicy(enabled=False),
        retry=RetryPolicy(max_attempts=1),
        timeouts=Timeouts(connect_s=5, first_chunk_s=30, between_chunks_s=30, total_s=60),
        usage=UsageConfig(path=ledger, flush_interval_s=0.05),
        budgets={PROJECT: Budget(tokens_per_minute=tokens_per_minute)},
    )
    client.add_listener(listen)
    try:
        client.start()
        barrier.wait(BARRIER_TIMEOUT_S)
        while True:
            try:
                client.chat(
                    model,
                    [{"role": "user", "content": prompt}],
                    options={"num_predict": max_tokens},
                )
            except BudgetUnavailable:
                raise  # a store failure is not a refusal: the test must see it
            except BudgetExceeded:
                break
    finally:
        client.close()  # also applies this process's pending settlements
    return seen
