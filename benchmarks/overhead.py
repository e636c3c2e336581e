"""Per-call cost of a pooled, accounted call against bare clients, side by side in one run.

Run from the repository root: ``python benchmarks/overhead.py [--calls 1500] [--rounds 3]
[--concurrency 1 64]``.

One *instant* loopback server (``tests/instant_server.py``: a few dozen lines of asyncio in
its own process, a canned reply for every request) answers every variant, so what differs
is the client: raw ``httpx.AsyncClient``, ``ollama.AsyncClient``, ``openai.AsyncOpenAI`` and
``SharedClient`` with one endpoint and with a pool of three (the usage ledger writing to
SQLite and the OpenTelemetry API on, as an application would run it). In every round each
variant makes ``--calls`` calls, cut into blocks that alternate between the variants, so a
slow spell of a shared machine falls on all of them. Per concurrency level the report gives
the median over the rounds of each variant's *cost per call* (a block's wall time over its
calls: at concurrency 64 the median call's latency says more about the order in which
httpcore's queue serves waiting requests than about cost; it is shown beside it) with its
ratios to raw httpx and to ollama-python, then the function calls per request counted in
every thread (``threading.setprofile`` too, so work
moved to a background thread still counts). Needs the ``dev`` extra (ollama, openai).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any

from tests.instant_server import MESSAGES, MODEL, start_server
from tests.realservers._process import client_cpus, pinned

# -- the variants ----------------------------------------------------------------------------
Variant = Callable[[], Awaitable[object]]


async def make_variants(stack: AsyncExitStack, port: int, ledger: Path) -> dict[str, Variant]:
    """Each client, opened on ``stack``, as a zero-argument chat call."""
    import httpx
    import ollama
    import openai

    from shared_ollama import Endpoint, HealthPolicy, SharedClient, UsageConfig

    url = f"http://127.0.0.1:{port}"
    raw = await stack.enter_async_context(httpx.AsyncClient(base_url=url))
    body = {"model": MODEL, "messages": MESSAGES, "stream": False}
    oll = ollama.AsyncClient(host=url)
    stack.push_async_callback(oll._client.aclose)
    oai = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    stack.push_async_callback(oai.close)
    quiet = {"health": HealthPolicy(enabled=False)}
    ledger_on = UsageConfig(enabled=True, path=str(ledger))
    one = await stack.enter_async_context(
        SharedClient(
            endpoints=[Endpoint(url, kind="ollama", models=[MODEL])], usage=ledger_on, **quiet
        )
    )
    # Three endpoints on the same server (loopback addresses 127.0.0.1-3), one ledger.
    trio = [
        Endpoint(f"http://127.0.0.{i}:{port}", kind="ollama", models=[MODEL]) for i in (1, 2, 3)
    ]
    pool = await stack.enter_async_context(SharedClient(endpoints=trio, usage=ledger_on, **quiet))

    async def raw_call() -> object:
        response = await raw.post("/api/chat", json=body)
        return response.json()

    return {
        "raw httpx": raw_call,
        "ollama.AsyncClient": lambda: oll.chat(model=MODEL, messages=MESSAGES),
        "openai.AsyncOpenAI": lambda: oai.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
        ),
        "SharedClient, 1 endpoint": lambda: one.chat(model=MODEL, messages=MESSAGES),
        "SharedClient, pool of 3": lambda: pool.chat(model=MODEL, messages=MESSAGES),
    }


async def timed(fn: Variant, calls: int, concurrency: int) -> tuple[list[float], float]:
    """Per-call µs of ``calls`` calls, ``concurrency`` at a time, and the block's µs per call
    (its wall time over its calls: what a call costs when many share the client)."""
    out: list[float] = []
    per_worker = max(1, calls // concurrency)

    async def worker() -> None:
        for _ in range(per_worker):
            t0 = time.perf_counter_ns()
            await fn()
            out.append((time.perf_counter_ns() - t0) / 1e3)

    start = time.perf_counter_ns()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out, (time.perf_counter_ns() - start) / 1e3 / len(out)


def blocks_of(calls: int, concurrency: int) -> int:
    """How many blocks a variant's calls in one round are cut into: small enough that a slow
    spell of a shared machine falls on every variant, big enough (8 calls a worker) that
    the ramp at each block's start and end stays a small part of it."""
    return max(1, min(10, calls // (8 * concurrency)))


async def count_calls(variants: dict[str, Variant], counter: Any, n: int) -> dict[str, float]:
    """Function calls per request, every thread, over ``n`` sequential calls each."""
    out: dict[str, float] = {}
    for name, fn in variants.items():
        with counter.counting():
            for _ in range(n):
                await fn()
            # The ledger's share: its writer's batched inserts for these records.
            await asyncio.sleep(0.6)  # > UsageConfig.flush_interval_s
        out[name] = counter.calls / n
    return out


async def main(calls: int, rounds: int, levels: list[int], count: int) -> None:
    """Run every variant at every concurrency level, interleaved, and print the table."""
    from shared_ollama.testing import CallCounter

    counter = CallCounter()
    counter.install()  # before the clients start: their threads are counted too
    with ExitStack() as sync_stack, tempfile.TemporaryDirectory() as tmp:
        port = start_server(sync_stack)
        sync_stack.enter_context(pinned(client_cpus()))
        async with AsyncExitStack() as stack:
            variants = await make_variants(stack, port, Path(tmp) / "usage.db")
            for fn in variants.values():  # warm-up: connections, caches, imports
                await timed(fn, 100, 1)
                await timed(fn, 640, 64)
            # Counted one call at a time: with more connections open, httpcore checks each
            # of them per request, in every client alike.
            counted = await count_calls(variants, counter, count)
            counter.uninstall()
            # Per level and variant, one (median latency, cost per call) pair per round.
            results: dict[int, dict[str, list[tuple[float, float]]]] = {}
            for level in levels:
                results[level] = {name: [] for name in variants}
                blocks = blocks_of(calls, level)
                for _ in range(rounds):
                    latencies: dict[str, list[float]] = {name: [] for name in variants}
                    costs: dict[str, list[float]] = {name: [] for name in variants}
                    # Interleaved block by block, so noise lands on every variant alike.
                    for _ in range(blocks):
                        for name, fn in variants.items():
                            out, cost = await timed(fn, calls // blocks, level)
                            latencies[name] += out
                            costs[name].append(cost)
                    for name in variants:
                        pair = (statistics.median(latencies[name]), statistics.mean(costs[name]))
                        results[level][name].append(pair)
    print(f"median of {rounds} rounds of {calls} calls a variant, interleaved in blocks (µs)")
    print("cost: a block's wall time over its calls; p50: the median call's latency")
    header = f"{'variant':<26}" + "".join(
        f"{f'c={c} cost':>12}{'ratio':>7}{'vs oll':>7}{'p50':>9}" for c in levels
    )
    print(header + f"{'calls/req':>11}")
    for name in counted:
        row = f"{name:<26}"
        for level in levels:
            cost = statistics.median(c for _, c in results[level][name])
            base = statistics.median(c for _, c in results[level]["raw httpx"])
            oll = statistics.median(c for _, c in results[level]["ollama.AsyncClient"])
            p50 = statistics.median(p for p, _ in results[level][name])
            row += f"{cost:>12.0f}{cost / base:>7.2f}{cost / oll:>7.2f}{p50:>9.0f}"
        print(row + f"{counted[name]:>11.0f}")
    print(f"(calls/req: Python and C function calls per request, all threads, mean of {count})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--count", type=int, default=200, help="calls counted per variant")
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.rounds, args.concurrency, args.count))
