"""Ledger benchmark: writer throughput (records/s) and event-loop stall while writing.

Run: ``python benchmarks/bench_ledger.py [--records 100000] [--repeat 3] [--dir DIR]``.
Prints figures; it is not a test and asserts nothing but row counts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from shared_ollama.records import AttemptRecord, CallRecord
from shared_ollama.usage import Ledger


def make_records(n: int) -> list[CallRecord]:
    """Realistic records: a stream with timings, tags and one attempt each."""
    t0 = time.monotonic_ns()
    out = []
    for i in range(n):
        start = t0 + i * 1000
        out.append(
            CallRecord(
                request_id=uuid.uuid4().hex,
                project=f"project-{i % 7}",
                operation="chat",
                model="llama3.2",
                stream=True,
                t_start_ns=start,
                t_end_ns=start + 250_000_000,
                t_first_chunk_ns=start + 40_000_000,
                served_model="llama3.2:3b",
                endpoint="http://gpu-a:11434",
                endpoint_name="gpu-a",
                protocol="ollama",
                input_tokens=120,
                output_tokens=80,
                finish_reason="stop",
                attempts=[AttemptRecord("http://gpu-a:11434", start, start + 250_000_000, 200)],
                server_timings={"load_duration_ns": 1e6, "eval_duration_ns": 2e8},
                tags={"workload": "bench"},
            )
        )
    return out


def throughput(path: str, records: list[CallRecord]) -> tuple[float, float]:
    """(records/s from first submit until durable, µs per submit on the caller)."""
    ledger = Ledger(path)
    t0 = time.perf_counter()
    for r in records:
        ledger.submit(r)
    t_submitted = time.perf_counter()
    ledger.flush()
    t1 = time.perf_counter()
    assert ledger.count() == len(records), "row count mismatch"
    ledger.close()
    return len(records) / (t1 - t0), (t_submitted - t0) / len(records) * 1e6


async def _probe(
    submit: Callable[[CallRecord], None],
    flush: Callable[[], object],
    records: list[CallRecord],
    chunk: int,
    busy: bool,
    hold_s: float,
) -> list[float]:
    """Stalls in ms, from the first submit until everything is written (and ``hold_s``).

    ``busy=False``: lateness of a 1 ms ``asyncio.sleep`` heartbeat; the loop is otherwise
    idle, as in a service waiting on sockets. ``busy=True``: the time between two turns of
    a task that only yields, so the loop always wants the GIL (the worst case).
    """
    stalls: list[float] = []
    done = False
    t_start = time.perf_counter()

    async def heartbeat() -> None:
        while not done:
            expected = time.perf_counter() + 0.001
            await asyncio.sleep(0.001)
            stalls.append((time.perf_counter() - expected) * 1e3)

    async def spinner() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0)
            now = time.perf_counter()
            stalls.append((now - last) * 1e3)
            last = now

    async def producer() -> None:
        nonlocal done
        for i in range(0, len(records), chunk):
            for r in records[i : i + chunk]:
                submit(r)
            await asyncio.sleep(0)
        await asyncio.to_thread(flush)  # keep measuring while the writer catches up
        await asyncio.sleep(max(0.0, hold_s - (time.perf_counter() - t_start)))
        done = True

    await asyncio.gather(spinner() if busy else heartbeat(), producer())
    return stalls


def stall(
    path: str | None, records: list[CallRecord], chunk: int, busy: bool, hold_s: float = 0.0
) -> tuple[list[float], float]:
    """(stalls in ms, seconds measured) while ``records`` go to a ledger at ``path``, or to
    nothing when ``path`` is None (the baseline)."""
    ledger = Ledger(path) if path else None
    submit = ledger.submit if ledger else (lambda r: None)
    flush = ledger.flush if ledger else (lambda: None)
    t0 = time.perf_counter()
    stalls = asyncio.run(_probe(submit, flush, records, chunk, busy, hold_s))
    elapsed = time.perf_counter() - t0
    if ledger:
        assert ledger.count() == len(records), "row count mismatch"
        ledger.close()
    return sorted(stalls), elapsed


def _row(name: str, stalls: list[float], elapsed: float) -> str:
    n = len(stalls)
    over = sum(s > 1.0 for s in stalls)
    cells = (stalls[n // 2], stalls[int(n * 0.99)], stalls[int(n * 0.999)], stalls[-1])
    return (
        f"  {name:22}" + "".join(f"{c:>9.3f}" for c in cells) + f"{over:>8} of {n:<9,}"
        f"{elapsed:>6.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=100, help="submits per loop turn")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement")
    parser.add_argument("--dir", help="where to put the ledger files (default: a temp dir)")
    args = parser.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench_ledger_"))
    base.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs (load {load:.1f}), "
        f"switch interval {sys.getswitchinterval() * 1e3:.1f} ms, {args.records:,} records"
    )
    print("throughput (first submit until durable):")
    for run in range(args.repeat):
        records = make_records(args.records)
        rate, submit_us = throughput(str(base / f"throughput{run}.sqlite3"), records)
        print(f"  {rate:>9,.0f} records/s; submit() {submit_us:.2f} µs/record on the caller")

    print(f"event-loop stalls (ms) while submitting, {args.chunk} submits per loop turn, until")
    print("everything is written; the baseline runs as long without a ledger:")
    print(f"  {'':22}{'p50':>9}{'p99':>9}{'p99.9':>9}{'max':>9}{'  > 1 ms':>20}{'s':>6}")
    for run in range(args.repeat):
        records = make_records(args.records)
        for busy in (False, True):
            kind = "busy loop" if busy else "idle loop"
            path = str(base / f"stall{run}{kind[0]}.sqlite3")
            stalls, elapsed = stall(path, records, args.chunk, busy)
            print(_row(f"ledger, {kind}", stalls, elapsed))
            stalls, elapsed = stall(None, records, args.chunk, busy, hold_s=elapsed)
            print(_row(f"no ledger, {kind}", stalls, elapsed))
    print("idle loop: lateness of a 1 ms asyncio.sleep heartbeat (epoll rounds up to whole ms);")
    print("busy loop: time between two turns of a task that only yields (always wants the GIL).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
