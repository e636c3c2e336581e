"""Child process of test_hostile_memory: one call against a hostile server, its peak RSS.

``python -m tests.integration._memory_child URL CASE CLIENT SECONDS`` prints one JSON line:
the error type and message (if any), chunks read, and the growth of the peak RSS (MiB) from
a started client to the end of the call. A process of its own, so the memory is its own.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
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


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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
        "growth_mib": peak_mib() - before,
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
