"""Routing overhead: the full SharedClient path vs a direct httpx call to one FakeEngine.

Run: ``python benchmarks/bench_routing_overhead.py [--calls 2000] [--no-sniffio]``.
The engines run in separate processes (``python -m shared_ollama.testing``) so the client
is measured, not the server; the variants are interleaved in rounds, side by side, and the
report gives ratios to the direct call. ``--no-sniffio`` hides sniffio from httpcore to
measure what its per-request import attempt costs (see STYLE.md).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack

import httpx

from shared_ollama import Endpoint, HealthPolicy, SharedClient, UsageConfig
from shared_ollama.testing import TimingModel, engine_process

MODEL = "bench-model"
BODY = {"model": MODEL, "prompt": "one two three", "stream": False, "options": {"num_predict": 4}}


def start_engine(stack: ExitStack) -> str:
    """An ollama FakeEngine in its own process with near-zero model latency."""
    timing = TimingModel(ttft_base_s=0, itl_s=0)
    return stack.enter_context(engine_process(timing=timing, models=[MODEL], slots=64)).url


async def timed(fn: Callable[[], Awaitable[object]], n: int) -> list[float]:
    """Per-call seconds for ``n`` sequential calls."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await fn()
        out.append((time.perf_counter_ns() - t0) / 1e9)
    return out


async def main(calls: int, rounds: int) -> None:
    """Interleave the variants in rounds and print per-call latency and ratios."""
    with ExitStack() as stack:
        urls = [start_engine(stack) for _ in range(4)]
        quiet = {"health": HealthPolicy(enabled=False), "usage": UsageConfig(enabled=False)}
        async with (
            httpx.AsyncClient(base_url=urls[0]) as raw,
            SharedClient(endpoints=[Endpoint(urls[0], kind="ollama")], **quiet) as one,
            SharedClient(endpoints=[Endpoint(u, kind="ollama") for u in urls], **quiet) as pool,
            SharedClient(
                endpoints=[Endpoint(u, kind="ollama") for u in urls], strategy="affinity", **quiet
            ) as sticky,
        ):
            variants: dict[str, Callable[[], Awaitable[object]]] = {
                "direct httpx POST": lambda: raw.post("/api/generate", json=BODY),
                "SharedClient, 1 endpoint": lambda: one.generate(
                    model=MODEL, prompt="one two three", options={"num_predict": 4}
                ),
                "SharedClient, pool of 4": lambda: pool.generate(
                    model=MODEL, prompt="one two three", options={"num_predict": 4}
                ),
                "pool of 4, affinity": lambda: sticky.generate(
                    model=MODEL, prompt="one two three", options={"num_predict": 4}, session="s"
                ),
            }
            samples: dict[str, list[float]] = {k: [] for k in variants}
            for fn in variants.values():  # warm-up: connections, caches
                await timed(fn, 50)
            for _ in range(rounds):
                for name, fn in variants.items():
                    samples[name] += await timed(fn, calls // rounds)
    base = statistics.median(samples["direct httpx POST"])
    print(f"{'variant':<28}{'median':>10}{'mean':>10}{'p99':>10}{'ratio':>8}")
    for name, xs in samples.items():
        xs.sort()
        med, mean, p99 = statistics.median(xs), statistics.fmean(xs), xs[int(0.99 * len(xs))]
        print(f"{name:<28}{med * 1e3:>8.3f}ms{mean * 1e3:>8.3f}ms{p99 * 1e3:>8.3f}ms"
              f"{med / base:>8.2f}")  # fmt: skip
    overhead = statistics.median(samples["SharedClient, 1 endpoint"]) - base
    print(f"library overhead per call (median): {overhead * 1e6:.0f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-sniffio", action="store_true")
    args = parser.parse_args()
    if args.no_sniffio:
        sys.modules["sniffio"] = None  # type: ignore[assignment]
    asyncio.run(main(args.calls, args.rounds))
