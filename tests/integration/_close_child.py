"""Child process of test_close_in_flight: close a client with 200 calls in flight.

``python -X dev -W error -m tests.integration._close_child {async|sync} LEDGER`` prints one
JSON line: what each call ended with, the ledger's rows by outcome and error type, and the
sockets still open to the engine after close. Warnings (unclosed transports, sockets) go to
stderr, which the test reads.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil

from shared_ollama import (
    Endpoint,
    HealthPolicy,
    SharedClient,
    SyncSharedClient,
    Timeouts,
    UsageConfig,
)
from shared_ollama.testing import FakeEngine, TimingModel

N_CALLS, N_STREAMS, N_ABANDONED = 100, 80, 20
MESSAGES = [{"role": "user", "content": "hi"}]
# The first chunk comes at once, the next only after a minute: every call is in flight.
SLOW = TimingModel(ttft_base_s=0.01, ttft_per_prompt_token_s=0.0, itl_s=60.0,
                   default_max_tokens=8)  # fmt: skip
TOTAL = N_CALLS + N_STREAMS + N_ABANDONED


def settings(url: str, ledger: str) -> dict[str, Any]:
    return {
        "endpoints": [
            Endpoint(url, kind="ollama", models={"m": "fake-llama"}, max_connections=256)
        ],
        "health": HealthPolicy(enabled=False),
        "usage": UsageConfig(path=ledger),
        "timeouts": Timeouts(first_chunk_s=300, between_chunks_s=300, total_s=600),
    }


def outcome(exc: BaseException | None) -> str:
    return "ok" if exc is None else type(exc).__name__


def sockets_to(port: int) -> int:
    conns = psutil.Process().net_connections(kind="tcp")
    return sum(1 for c in conns if c.raddr and c.raddr.port == port)


def ledger_rows(path: str) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT outcome, error_type FROM calls").fetchall()
    return dict(Counter(f"{o}:{e}" for o, e in rows))


async def run_async(engine: FakeEngine, ledger: str) -> dict[str, Any]:
    client = SharedClient(**settings(engine.url, ledger))
    await client.start()
    release = asyncio.Event()
    abandoned: list[Any] = []

    async def call() -> None:
        await client.chat(model="m", messages=MESSAGES)

    async def stream() -> None:
        async for _ in await client.chat(model="m", messages=MESSAGES, stream=True):
            pass

    async def abandon() -> None:
        it = await client.chat(model="m", messages=MESSAGES, stream=True)
        await anext(it)  # type: ignore[call-overload]
        abandoned.append(it)
        await release.wait()  # holds the stream without reading it

    tasks = [asyncio.create_task(call()) for _ in range(N_CALLS)]
    tasks += [asyncio.create_task(stream()) for _ in range(N_STREAMS)]
    holders = [asyncio.create_task(abandon()) for _ in range(N_ABANDONED)]
    await engine.await_stats(lambda s: s.in_flight == TOTAL, timeout=60)
    while len(abandoned) < N_ABANDONED:  # each holder has taken its first chunk
        await asyncio.sleep(0.01)
    await client.aclose()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    ends = Counter(outcome(r if isinstance(r, BaseException) else None) for r in results)
    release.set()
    await asyncio.gather(*holders)
    for it in abandoned:
        try:
            await anext(it)
            ends["abandoned-continued"] += 1
        except BaseException as exc:
            ends["abandoned-" + outcome(exc)] += 1
        await it.aclose()
    return {"ends": dict(ends), "sockets": sockets_to(engine.port)}


def run_sync(engine: FakeEngine, ledger: str) -> dict[str, Any]:
    client = SyncSharedClient(**settings(engine.url, ledger))
    client.start()
    release = threading.Event()
    abandoned: list[Any] = []
    lock = threading.Lock()

    def call() -> None:
        client.chat(model="m", messages=MESSAGES)

    def stream() -> None:
        for _ in client.chat(model="m", messages=MESSAGES, stream=True):
            pass

    def abandon() -> None:
        it = client.chat(model="m", messages=MESSAGES, stream=True)
        next(it)
        with lock:
            abandoned.append(it)
        release.wait(120)

    def ended(fn: Any) -> str:
        try:
            fn()
        except BaseException as exc:
            return outcome(exc)
        return "ok"

    with ThreadPoolExecutor(TOTAL) as pool:
        futures = [pool.submit(ended, call) for _ in range(N_CALLS)]
        futures += [pool.submit(ended, stream) for _ in range(N_STREAMS)]
        holders = [pool.submit(abandon) for _ in range(N_ABANDONED)]
        engine.wait_stats(lambda s: s.in_flight == TOTAL, timeout=60)
        while True:
            with lock:
                if len(abandoned) == N_ABANDONED:
                    break
            release.wait(0.01)
        client.close()
        ends = Counter(f.result() for f in futures)
        release.set()
        for h in holders:
            h.result()
    for it in abandoned:
        ends["abandoned-" + ended(lambda it=it: next(it))] += 1
        it.close()
    return {"ends": dict(ends), "sockets": sockets_to(engine.port)}


def main() -> None:
    mode, ledger = sys.argv[1], sys.argv[2]
    with FakeEngine(kind="ollama", models=("fake-llama",), timing=SLOW, slots=256) as engine:
        result = (
            asyncio.run(run_async(engine, ledger)) if mode == "async" else run_sync(engine, ledger)
        )
    result["ledger"] = ledger_rows(ledger)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
