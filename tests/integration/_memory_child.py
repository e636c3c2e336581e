"""Child process of test_hostile_memory: one call against a hostile server, its RSS.

``python -m tests.integration._memory_child URL CASE CLIENT SECONDS`` prints one JSON line:
the error type and message (if any), chunks read, and the growth of the resident set (MiB)
during the call: the highest RSS sampled every few milliseconds while it ran, minus the RSS
of the started client just before it. (The process's peak RSS would hide a growth smaller
than what imports once took and gave back.) A process of its own, so the memory is its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from typing import Any

from shared_ollama import (
    Endpoint,
    HealthPolicy,
    SharedClient,
    SharedOllamaError,
    SyncSharedClient,
    Timeouts,
    UsageConfig,
)

MESSAGES = [{"role": "user", "content": "hi"}]


_PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE_MIB


class RssWatch:
    """The highest RSS seen by a thread sampling every 2 ms, from ``start()`` on."""

    def __init__(self) -> None:
        self.high = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.high = max(self.high, rss_mib())

    def start(self) -> float:
        self.high = before = rss_mib()
        self._thread.start()
        return before

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.high, rss_mib())


WATCH = RssWatch()


def peak_mib() -> float:
    """The RSS now, as the baseline (the sampler starts with it)."""
    return WATCH.start()


def settings(url: str) -> dict[str, Any]:
    return {
        "endpoints": [Endpoint(url, kind="ollama", models={"m": "m"})],
        "health": HealthPolicy(enabled=False),
        "usage": UsageConfig(enabled=False),
        "timeouts": Timeouts(first_chunk_s=60, between_chunks_s=60, total_s=120),
    }


def run_sync(url: str, case: str, seconds: float) -> dict[str, Any]:
    with SyncSharedClient(**settings(url)) as client:
        before = peak_mib()
        chunks = 0
        try:
            if case == "stream":
                stream = client.chat(model="m", messages=MESSAGES, stream=True)
                end = time.monotonic() + seconds
                for _chunk in stream:
                    chunks += 1
                    if time.monotonic() > end:
                        break
                stream.close()  # type: ignore[attr-defined]
            else:
                client.chat(model="m", messages=MESSAGES)
            error: BaseException | None = None
        except SharedOllamaError as exc:
            error = exc
        return report(before, chunks, error)


async def run_async(url: str, case: str, seconds: float) -> dict[str, Any]:
    async with SharedClient(**settings(url)) as client:
        before = peak_mib()
        chunks = 0
        try:
            if case == "stream":
                stream = await client.chat(model="m", messages=MESSAGES, stream=True)
                end = time.monotonic() + seconds
                async for _chunk in stream:
                    chunks += 1
                    if time.monotonic() > end:
                        break
                await stream.aclose()  # type: ignore[attr-defined]
            else:
                await client.chat(model="m", messages=MESSAGES)
            error: BaseException | None = None
        except SharedOllamaError as exc:
            error = exc
        return report(before, chunks, error)


def report(before: float, chunks: int, error: BaseException | None) -> dict[str, Any]:
    return {
        "error": type(error).__name__ if error is not None else None,
        "message": str(error)[:2000] if error is not None else None,
        "server_message": getattr(error, "server_message", None),
        "chunks": chunks,
        "growth_mib": WATCH.stop() - before,
    }


def main() -> None:
    url, case, client, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    if client == "sync":
        result = run_sync(url, case, seconds)
    else:
        result = asyncio.run(run_async(url, case, seconds))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
