"""Per-call cost of a pooled, accounted call against bare clients, side by side in one run.

Run: ``python benchmarks/overhead.py [--calls 1500] [--rounds 3] [--concurrency 1 64]``.

One *instant* loopback server (a few dozen lines of asyncio below, in its own process, a
canned reply for every request) answers every variant, so what differs is the client:
raw ``httpx.AsyncClient``, ``ollama.AsyncClient``, ``openai.AsyncOpenAI`` and
``SharedClient`` with one endpoint and with a pool of three (the usage ledger writing to
SQLite and the OpenTelemetry API on, as an application would run it). The variants are
interleaved in every round; the report gives, per concurrency level, the median over the
rounds of each variant's median per-call latency and its ratio to raw httpx, then the
function calls per request counted in every thread (``threading.setprofile`` too, so work
moved to a background thread still counts). Needs the ``dev`` extra (ollama, openai).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any

MODEL = "bench-model"
MESSAGES = [{"role": "user", "content": "one two three"}]

_OLLAMA_CHAT = {
    "model": MODEL,
    "created_at": "2026-01-01T00:00:00Z",
    "message": {"role": "assistant", "content": "four five six"},
    "done": True,
    "done_reason": "stop",
    "total_duration": 1000,
    "load_duration": 10,
    "prompt_eval_count": 3,
    "prompt_eval_duration": 100,
    "eval_count": 3,
    "eval_duration": 500,
}
_OPENAI_CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1767225600,
    "model": MODEL,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "four five six"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
}
_REPLIES = {
    b"/api/chat": _OLLAMA_CHAT,
    b"/v1/chat/completions": _OPENAI_CHAT,
    b"/api/version": {"version": "0.9.0"},
    b"/api/tags": {"models": [{"name": MODEL, "model": MODEL, "size": 1}]},
    b"/api/ps": {"models": []},
}


# -- the instant server ----------------------------------------------------------------------
def _response(body: dict[str, Any] | None) -> bytes:
    if body is None:
        return b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
    data = json.dumps(body).encode()
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(data)}"
    return head.encode() + b"\r\n\r\n" + data


async def _serve(port: int) -> None:
    canned = {path: _response(body) for path, body in _REPLIES.items()}
    missing = _response(None)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, _, rest = head.partition(b"\r\n")
                path = line.split(b" ")[1].split(b"?")[0]
                length = 0
                for header in rest.lower().split(b"\r\n"):
                    if header.startswith(b"content-length:"):
                        length = int(header[15:])
                if length:
                    await reader.readexactly(length)
                writer.write(canned.get(path, missing))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "0.0.0.0", port, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def start_server(stack: ExitStack) -> int:
    """The instant server in its own process; returns its port."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    stack.callback(proc.wait, 10)
    stack.callback(proc.terminate)
    assert proc.stdout is not None
    return int(proc.stdout.readline())


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
    trio = [Endpoint(f"http://127.0.0.{i}:{port}", kind="ollama", models=[MODEL]) for i in (1, 2, 3)]
    pool = await stack.enter_async_context(
        SharedClient(endpoints=trio, usage=ledger_on, **quiet)
    )

    async def raw_call() -> object:
        response = await raw.post("/api/chat", json=body)
        return response.json()

    return {
        "raw httpx": raw_call,
        "ollama.AsyncClient": lambda: oll.chat(model=MODEL, messages=MESSAGES),
        "openai.AsyncOpenAI": lambda: oai.chat.completions.create(
            model=MODEL, messages=MESSAGES  # type: ignore[arg-type]
        ),
        "SharedClient, 1 endpoint": lambda: one.chat(model=MODEL, messages=MESSAGES),
        "SharedClient, pool of 3": lambda: pool.chat(model=MODEL, messages=MESSAGES),
    }


async def timed(fn: Variant, calls: int, concurrency: int) -> list[float]:
    """Per-call seconds of ``calls`` calls, ``concurrency`` at a time."""
    out: list[float] = []
    per_worker = max(1, calls // concurrency)

    async def worker() -> None:
        for _ in range(per_worker):
            t0 = time.perf_counter_ns()
            await fn()
            out.append((time.perf_counter_ns() - t0) / 1e3)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


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
        async with AsyncExitStack() as stack:
            variants = await make_variants(stack, port, Path(tmp) / "usage.db")
            for fn in variants.values():  # warm-up: connections, caches, imports
                await timed(fn, 100, 4)
            counted = await count_calls(variants, counter, count)
            counter.uninstall()
            results: dict[int, dict[str, list[float]]] = {}
            for level in levels:
                medians: dict[str, list[float]] = {name: [] for name in variants}
                for _ in range(rounds):
                    for name, fn in variants.items():
                        medians[name].append(statistics.median(await timed(fn, calls, level)))
                results[level] = medians
    print(f"per-call latency, median of {rounds} interleaved rounds of {calls} calls (µs)")
    header = f"{'variant':<26}" + "".join(f"{f'c={c}':>11}{'ratio':>7}" for c in levels)
    print(header + f"{'calls/req':>11}")
    for name in counted:
        row = f"{name:<26}"
        for level in levels:
            mine = statistics.median(results[level][name])
            base = statistics.median(results[level]["raw httpx"])
            row += f"{mine:>11.0f}{mine / base:>7.2f}"
        print(row + f"{counted[name]:>11.0f}")
    print(f"(calls/req: Python and C function calls per request, all threads, mean of {count})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--count", type=int, default=200, help="calls counted per variant")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(int(os.environ.get("PORT", "0"))))
    else:
        asyncio.run(main(args.calls, args.rounds, args.concurrency, args.count))
