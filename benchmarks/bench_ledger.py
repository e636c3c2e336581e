"""Ledger benchmark: writer throughput, event-loop stall, and the durability window.

Run: ``python benchmarks/bench_ledger.py [--records 100000] [--repeat 3] [--dir DIR]``, or
``python benchmarks/bench_ledger.py --durability [--rate 1000] [--kills 10] [--ledger URL]``
for submit-to-commit latency and the records lost to ``kill -9`` at a steady call rate.
Prints figures; it is not a test and asserts nothing but row counts.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

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


def _record(tag: str, i: int) -> CallRecord:
    start = time.monotonic_ns()
    return CallRecord(
        request_id=f"{tag}-{i:09d}",
        project="durability",
        operation="chat",
        model="llama3.2",
        stream=False,
        t_start_ns=start,
        t_end_ns=start + 1_000_000,
        endpoint="http://gpu-a:11434",
        protocol="ollama",
        input_tokens=12,
        output_tokens=34,
        attempts=[AttemptRecord("http://gpu-a:11434", start, start + 1_000_000, 200)],
    )


def _paced(rate: float, limit: int, submit: Callable[[int], None]) -> None:
    """Call ``submit(i)`` for i = 0, 1, ... at ``rate`` per second (catching up when late)."""
    t0 = time.perf_counter()
    for i in range(limit):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submit(i)


def paced_child(
    target: str, tag: str, rate: float, times: Any, kill_at: int, conn: Connection
) -> None:
    """Child of the kill -9 runs: submit at ``rate``, noting each submit's wall time in
    the shared array ``times`` (which survives the kill), and tell the parent at ``kill_at``."""
    ledger = Ledger(target)

    def submit(i: int) -> None:
        times[i] = time.time()
        ledger.submit(_record(tag, i))
        if i + 1 == kill_at:
            conn.send(i + 1)

    _paced(rate, len(times), submit)
    conn.send(-1)  # ran out of room: the parent never killed us


def client_child(
    target: str, tag: str, port: int, rate: float, times: Any, kill_at: int, conn: Connection
) -> None:
    """Like ``paced_child``, through ``SyncSharedClient`` against the instant server: each
    call is tagged with its number and its end noted in ``times``."""
    from shared_ollama import Endpoint, HealthPolicy, SyncSharedClient, UsageConfig
    from shared_ollama.testing.instant import MESSAGES, MODEL

    client = SyncSharedClient(
        endpoints=[Endpoint(f"http://127.0.0.1:{port}", kind="ollama")],
        project=tag,
        health=HealthPolicy(enabled=False),
        usage=UsageConfig(path=target),
    )

    def call(i: int) -> None:
        client.chat(model=MODEL, messages=MESSAGES, options={"num_predict": 1}, tags={"i": str(i)})
        times[i] = time.time()
        if i + 1 == kill_at:
            conn.send(i + 1)

    _paced(rate, len(times), call)
    conn.send(-1)


def _killed(
    target: Callable[..., None], args: tuple[Any, ...], rate: float, kill_at: int
) -> tuple[Any, float]:
    """Run ``target(*args, times, kill_at, conn)`` in a spawned child until it says it reached
    ``kill_at``, then kill -9 it: (the child's times array, when it was killed)."""
    ctx = multiprocessing.get_context("spawn")
    times = ctx.Array("d", kill_at + int(rate) * 5, lock=False)
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=target, args=(*args, times, kill_at, sender))
    child.start()
    sender.close()
    reached = receiver.recv()
    t_kill = time.time()
    child.kill()
    child.join()
    assert reached == kill_at, "the child stopped before the kill"
    return times, t_kill


def client_kill_window(
    target: str, tag: str, port: int, rate: float, kill_at: int
) -> tuple[int, int, float]:
    """One kill -9 run through the client: (calls finished, lost, oldest lost call's age)."""
    times, t_kill = _killed(client_child, (target, tag, port, rate), rate, kill_at)
    finished = {i for i, t in enumerate(times) if t > 0}
    with Ledger(target) as ledger:
        kept = {int(r.tags["i"]) for r in ledger.rows(project=tag)}
    lost = finished - kept
    age = t_kill - min(times[i] for i in lost) if lost else 0.0
    return len(finished), len(lost), age


def committed_ids(target: str, tag: str) -> set[str]:
    """The request ids starting with ``tag`` in the ledger at ``target`` (a fresh reader)."""
    if "://" not in target:
        with sqlite3.connect(target) as conn:
            ids = {r[0] for r in conn.execute("SELECT request_id FROM calls")}
    else:
        with Ledger(target) as ledger:
            ids = {r.request_id for r in ledger.rows(project="durability")}
    return {i for i in ids if i.startswith(tag + "-")}


def kill_window(target: str, tag: str, rate: float, kill_at: int) -> tuple[int, int, float]:
    """One kill -9 run: (records submitted, records lost, age in s of the oldest lost one)."""
    times, t_kill = _killed(paced_child, (target, tag, rate), rate, kill_at)
    submitted = sum(1 for t in times if t > 0)
    ids = committed_ids(target, tag)
    # The writer commits in submit order: what survived is a prefix.
    assert ids == {f"{tag}-{i:09d}" for i in range(len(ids))}, "a gap in the committed records"
    lost = submitted - len(ids)
    age = t_kill - times[len(ids)] if lost else 0.0
    return submitted, lost, age


def commit_latency(target: str, rate: float, seconds: float) -> list[float]:
    """Submit-to-commit latency (s) of each record at a steady ``rate``, sorted; a reader
    polls the row count every 2 ms (records are committed in submit order)."""
    ledger = Ledger(target)
    n = int(rate * seconds)
    times = [0.0] * n
    polls: list[tuple[float, int]] = []
    done = threading.Event()
    before = ledger.count()  # rows of earlier runs (a reused database)
    tag = f"l{uuid.uuid4().hex[:8]}"  # ids unique across runs: duplicates are not inserted

    def poll() -> None:
        while not done.is_set():
            count = ledger.count() - before
            polls.append((time.time(), count))
            done.wait(0.002)

    poller = threading.Thread(target=poll)
    poller.start()

    def submit(i: int) -> None:
        times[i] = time.time()
        ledger.submit(_record(tag, i))

    _paced(rate, n, submit)
    ledger.flush()
    polls.append((time.time(), ledger.count() - before))
    done.set()
    poller.join()
    ledger.close()
    latencies: list[float] = []
    j = 0
    for i in range(n):
        while polls[j][1] <= i:
            j += 1
        latencies.append(polls[j][0] - times[i])
    return sorted(latencies)


def durability(args: argparse.Namespace, base: Path) -> None:
    """Print submit-to-commit latency and the kill -9 loss window at ``args.rate``."""
    print(f"durability at {args.rate:,.0f} calls/s, default ledger settings:")
    for run in range(args.repeat):
        target = args.ledger or str(base / f"latency{run}.sqlite3")
        lat = commit_latency(target, args.rate, args.seconds)
        n = len(lat)
        print(
            f"  submit-to-commit (s): p50 {lat[n // 2]:.3f}  p99 {lat[int(n * 0.99)]:.3f}"
            f"  max {lat[-1]:.3f}  ({n:,} records)"
        )
    worst = 0.0
    for run in range(args.kills):
        target = args.ledger or str(base / f"kill{run}.sqlite3")
        kill_at = int(args.rate * 1.5) + run * 137  # a different phase of the writer each run
        tag = f"k{uuid.uuid4().hex[:8]}"
        submitted, lost, age = kill_window(target, tag, args.rate, kill_at)
        worst = max(worst, age)
        print(
            f"  kill -9 #{run + 1}: {submitted:,} submitted, {lost} lost, oldest lost {age:.3f} s"
        )
    print(f"  worst oldest lost record: {worst:.3f} s")
    if args.client:
        client_kills(args, base)


def client_kills(args: argparse.Namespace, base: Path) -> None:
    """The kill -9 runs through ``SyncSharedClient`` and the instant server."""
    server = subprocess.Popen(
        [sys.executable, "-m", "shared_ollama.testing.instant"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        print(f"kill -9 through SyncSharedClient (instant server), paced at {args.rate:,.0f}/s:")
        worst = 0.0
        for run in range(args.kills):
            target = args.ledger or str(base / f"client{run}.sqlite3")
            kill_at = int(args.rate * 1.5) + run * 137
            tag = f"c{uuid.uuid4().hex[:8]}"
            done, lost, age = client_kill_window(target, tag, port, args.rate, kill_at)
            worst = max(worst, age)
            print(
                f"  kill -9 #{run + 1}: {done:,} calls finished, {lost} lost, "
                f"oldest lost {age:.3f} s"
            )
        print(f"  worst oldest lost call: {worst:.3f} s")
    finally:
        server.terminate()
        server.wait(10)


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
    parser.add_argument("--durability", action="store_true", help="commit latency and kill -9")
    parser.add_argument("--rate", type=float, default=1000.0, help="calls/s for --durability")
    parser.add_argument("--seconds", type=float, default=5.0, help="latency run length")
    parser.add_argument("--kills", type=int, default=10, help="kill -9 runs")
    parser.add_argument("--ledger", help="--durability against this ledger (e.g. a PostgreSQL URL)")
    parser.add_argument("--client", action="store_true", help="also kill -9 through the client")
    args = parser.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench_ledger_"))
    base.mkdir(parents=True, exist_ok=True)
    if args.durability:
        durability(args, base)
        return 0
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
