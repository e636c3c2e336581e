"""The hot path's cost, counted: function calls per request in every thread (a number that
does not depend on the machine's speed), against the bare clients in the same test."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path

import httpx

from shared_ollama import Endpoint, HealthPolicy, SharedClient, UsageConfig
from shared_ollama.testing import CallCounter
from tests.instant_server import MESSAGES, MODEL, start_server
from tests.realservers.fixtures import report_line

N = 100


async def _count(ledger: Path) -> tuple[dict[str, float], dict[str, dict[str, int]], int]:
    import ollama

    counter = CallCounter(by_module=True)
    counter.install()  # before the clients start: the ledger's writer thread is counted
    try:
        with ExitStack() as stack:
            port = start_server(stack)
            url = f"http://127.0.0.1:{port}"
            trio = [
                Endpoint(f"http://127.0.0.{i}:{port}", kind="ollama", models=[MODEL])
                for i in (1, 2, 3)
            ]
            body = {"model": MODEL, "messages": MESSAGES, "stream": False}
            oll = ollama.AsyncClient(host=url)
            async with (
                httpx.AsyncClient(base_url=url) as raw,
                SharedClient(
                    endpoints=trio,
                    usage=UsageConfig(path=str(ledger)),
                    health=HealthPolicy(enabled=False),
                ) as pool,
            ):

                async def raw_call() -> object:
                    return (await raw.post("/api/chat", json=body)).json()

                async def ours() -> object:
                    return await pool.chat(model=MODEL, messages=MESSAGES)

                variants: dict[str, Callable[[], Awaitable[object]]] = {
                    "raw httpx": raw_call,
                    "ollama-python": lambda: oll.chat(model=MODEL, messages=MESSAGES),
                    "SharedClient, pool of 3": ours,
                }
                for fn in variants.values():  # warm: a connection each, caches, imports
                    for _ in range(10):
                        await fn()
                await pool.usage.aflush()
                counts: dict[str, float] = {}
                modules: dict[str, dict[str, int]] = {}
                for name, fn in variants.items():
                    with counter.counting():
                        for _ in range(N):
                            await fn()
                        if fn is ours:  # its records written inside the window
                            await pool.usage.aflush()
                    counts[name] = counter.calls / N
                    modules[name] = dict(counter.by_module)
                written = pool.usage.ledger.written
            await oll._client.aclose()
        return counts, modules, written
    finally:
        counter.uninstall()


def test_a_pooled_accounted_call_makes_no_more_calls_than_ollama_python(tmp_path: Path) -> None:
    """A pool of three with the usage ledger writing and the OpenTelemetry API on costs no
    more function calls per chat, all threads counted, than ollama-python's client."""
    counts, modules, written = asyncio.run(_count(tmp_path / "usage.db"))
    ours, ollama = counts["SharedClient, pool of 3"], counts["ollama-python"]
    raw = counts["raw httpx"]
    report_line(
        f"calls per chat, all threads: raw httpx {raw:.0f}, ollama-python {ollama:.0f}, "
        f"SharedClient pool of 3 with ledger {ours:.0f} ({ours - raw:+.0f} vs raw httpx)",
        "hot path",
    )
    assert ours <= ollama, counts
    mine = modules["SharedClient, pool of 3"]
    # A call that never retried built no tenacity object; the ledger wrote every record.
    assert mine.get("tenacity", 0) == 0, mine
    assert written == N + 10, written


async def _count_concurrent(ledger: Path, concurrency: int) -> dict[str, float]:
    import ollama

    counter = CallCounter()
    counter.install()
    try:
        with ExitStack() as stack:
            port = start_server(stack)
            url = f"http://127.0.0.1:{port}"
            body = {"model": MODEL, "messages": MESSAGES, "stream": False}
            oll = ollama.AsyncClient(host=url)
            async with (
                httpx.AsyncClient(base_url=url) as raw,
                SharedClient(
                    endpoints=[Endpoint(url, kind="ollama", models=[MODEL])],
                    usage=UsageConfig(path=str(ledger)),
                    health=HealthPolicy(enabled=False),
                ) as one,
            ):

                async def raw_call() -> object:
                    return (await raw.post("/api/chat", json=body)).json()

                variants: dict[str, Callable[[], Awaitable[object]]] = {
                    "raw httpx": raw_call,
                    "ollama-python": lambda: oll.chat(model=MODEL, messages=MESSAGES),
                    "SharedClient": lambda: one.chat(model=MODEL, messages=MESSAGES),
                }

                async def burst(fn: Callable[[], Awaitable[object]], each: int) -> None:
                    async def worker() -> None:
                        for _ in range(each):
                            await fn()

                    await asyncio.gather(*(worker() for _ in range(concurrency)))

                counts: dict[str, float] = {}
                for name, fn in variants.items():
                    await burst(fn, 2)  # warm: its connections open
                    with counter.counting():
                        await burst(fn, 4)
                    counts[name] = counter.calls / (4 * concurrency)
            await oll._client.aclose()
        return counts
    finally:
        counter.uninstall()


def test_many_concurrent_calls_cost_no_more_per_call_than_one_at_a_time(tmp_path: Path) -> None:
    """At 32 concurrent calls one httpcore pool walks all its connections per request (and
    churns connections past its keep-alive limit): the bare clients' calls per request grow
    with concurrency, ours (the endpoint's connections in pools of 4) stay flat and below
    ollama-python's."""
    counts = asyncio.run(_count_concurrent(tmp_path / "usage.db", 32))
    report_line(
        "calls per chat at 32 concurrent, one endpoint: "
        + ", ".join(f"{name} {n:.0f}" for name, n in counts.items()),
        "hot path",
    )
    assert counts["SharedClient"] <= counts["ollama-python"], counts
    assert counts["SharedClient"] <= counts["raw httpx"], counts
