"""What a llama-server call costs besides its prefill: the floor under the TTFT that
``benchmarks/affinity.py`` measures, which no routing can lower.

Run from the repository root: ``python benchmarks/llama_fixed_cost.py [--calls 30]``.

One llama-server with ``affinity.py``'s flags (``-c 4096 -np 2 -t 1``, llama.cpp's defaults
otherwise) on the first CPU, the tiny letters model. A conversation of ~1,100 tokens is sent
once; then each call is a follow-up turn of ~88 new tokens on it (what affinity's later turns
prefill). A call's *rest* is its TTFT at the client minus the server's own ``prompt_ms``:
HTTP, the chat template, tokenizing the whole conversation, finding the slot and the cached
prompt, sending the first token back. Measured for each combination of:

- path: ``/v1/chat/completions`` (the chat template, as the workload calls) against
  ``/completion`` with the same text as a raw prompt (no template);
- client: raw httpx, blocking (a new connection a call: llama-server closes after every
  stream), raw async httpx (an asyncio event loop) and ``SharedClient`` (chat);
- placement: the client on a CPU of its own, or on the server's CPU (``affinity.py`` on a
  2-CPU machine gives each server a CPU, so the client shares them);
- server: idle, or decoding another slot's long reply meanwhile.

Prints the medians; nothing is asserted (timings live here, not in tests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from benchmarks.affinity import CTX_SIZE, MODEL, PARALLEL, _text
from shared_ollama import Endpoint, SharedClient
from shared_ollama.records import CallRecord
from tests.realservers._process import pinned
from tests.realservers.llama_server import LlamaServer, make_tiny_gguf

SYSTEM_TOKENS = 150
DOCUMENT_TOKENS = 900
USER_TOKENS = 64  # with the template and a 4-token reply: ~88 new tokens a call
REPLY_TOKENS = 4

#: One call: (TTFT at the client in ms, the server's prompt_ms).
Sample = tuple[float, float]


class _FirstEvent:
    """One streamed call's clock: started when made, stopped at the first SSE event; the
    server's ``timings`` from the last event that carries them."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: float | None = None
        self.timings: dict[str, float] = {}

    def line(self, line: str) -> None:
        """Take one line of the SSE stream."""
        if not line.startswith("data: ") or line == "data: [DONE]":
            return
        event = json.loads(line[6:])
        if self.first is None:
            self.first = time.perf_counter()
        self.timings = event.get("timings", self.timings)

    def sample(self) -> Sample:
        """TTFT in ms and the server's ``prompt_ms``."""
        assert self.first is not None, "no event came"
        return 1000 * (self.first - self.started), float(self.timings["prompt_ms"])


class Probe:
    """Follow-up turns on one cached conversation, by one path and client."""

    def __init__(self, url: str, rng: random.Random) -> None:
        self.url = url
        self.rng = rng
        self.base = [
            {"role": "system", "content": _text(rng, SYSTEM_TOKENS)},
            {"role": "user", "content": _text(rng, DOCUMENT_TOKENS)},
        ]

    def follow_up(self) -> list[dict[str, str]]:
        """The conversation plus a short reply and a new user message."""
        tail = [
            {"role": "assistant", "content": _text(self.rng, REPLY_TOKENS)},
            {"role": "user", "content": _text(self.rng, USER_TOKENS)},
        ]
        return self.base + tail

    def chat_body(self) -> dict[str, object]:
        """A streamed follow-up for ``/v1/chat/completions``."""
        return {"model": MODEL, "messages": self.follow_up(), "max_tokens": REPLY_TOKENS,
                "stream": True}  # fmt: skip

    def raw(self, http: httpx.Client, chat: bool) -> Sample:
        """One streamed call over raw httpx: chat, or the same text as a raw prompt."""
        if chat:
            path, body = "/v1/chat/completions", self.chat_body()
        else:
            text = "\n".join(m["content"] for m in self.follow_up())
            path = "/completion"
            body = {"prompt": text, "n_predict": REPLY_TOKENS, "stream": True}
        clock = _FirstEvent()
        with http.stream("POST", self.url + path, json=body) as reply:
            reply.raise_for_status()
            for line in reply.iter_lines():
                clock.line(line)
        return clock.sample()

    async def raw_async(self, http: httpx.AsyncClient) -> Sample:
        """One streamed chat call over raw async httpx (the event loop, no SharedClient)."""
        body = self.chat_body()
        clock = _FirstEvent()
        async with http.stream("POST", self.url + "/v1/chat/completions", json=body) as reply:
            reply.raise_for_status()
            async for line in reply.aiter_lines():
                clock.line(line)
        return clock.sample()

    async def shared(self, client: SharedClient, records: list[CallRecord]) -> Sample:
        """One streamed chat call through ``SharedClient``, read back from its record."""
        stream = await client.chat(
            MODEL, self.follow_up(), stream=True, options={"num_predict": REPLY_TOKENS}
        )
        async for _ in stream:
            pass
        record = records[-1]
        assert record.ttft_s is not None
        return 1000 * record.ttft_s, record.server_timings["prompt_eval_duration_ns"] / 1e6


@contextmanager
def busy(url: str, rng: random.Random) -> Iterator[None]:
    """Keep the server decoding a long reply in another slot meanwhile."""
    stop = threading.Event()
    messages = [{"role": "user", "content": _text(rng, 200)}]

    def loop() -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                body = {"model": MODEL, "messages": messages, "max_tokens": 1500}
                http.post(url + "/v1/chat/completions", json=body).raise_for_status()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def measure(probe: Probe, calls: int, kind: str) -> list[Sample]:
    """``calls`` follow-ups (after one that caches the conversation) by ``kind``."""
    if kind == "shared":
        return asyncio.run(_shared(probe, calls))
    if kind == "async":
        return asyncio.run(_raw_async(probe, calls))
    # A new connection a call: llama-server closes after every stream, whatever it advertises.
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(timeout=60, limits=limits) as http:
        chat = kind == "chat"
        probe.raw(http, chat)
        return [probe.raw(http, chat) for _ in range(calls)]


async def _raw_async(probe: Probe, calls: int) -> list[Sample]:
    async with httpx.AsyncClient(timeout=60) as http:
        await probe.raw_async(http)
        return [await probe.raw_async(http) for _ in range(calls)]


async def _shared(probe: Probe, calls: int) -> list[Sample]:
    records: list[CallRecord] = []
    endpoint = Endpoint(probe.url, kind="openai")
    async with SharedClient([endpoint], usage=False, listeners=[records.append]) as client:
        await probe.shared(client, records)
        return [await probe.shared(client, records) for _ in range(calls)]


def main() -> None:
    """Start the server, measure every combination, print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=30, help="calls per combination")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    out = Path(tempfile.mkdtemp(prefix="llama-fixed-cost-"))
    model = make_tiny_gguf(out / "tiny-letters.gguf", emit="letters")
    server = LlamaServer(
        model,
        log_path=out / "llama-server.log",
        parallel=PARALLEL,
        ctx_size=CTX_SIZE,
        test_flags=False,
        cpus=frozenset(cpus[:1]),
    ).start()
    rng = random.Random(14)
    placements = {"own CPU": frozenset(cpus[1:]), "server's CPU": frozenset(cpus[:1])}
    if len(cpus) < 2:
        del placements["own CPU"]
    kinds: dict[str, str] = {
        "chat": "raw httpx, /v1/chat/completions",
        "completion": "raw httpx, /completion (no template)",
        "async": "raw async httpx, chat",
        "shared": "SharedClient, chat",
    }
    print(f"llama-server on CPU {cpus[0]}: -c {CTX_SIZE} -np {PARALLEL} -t 1 (else defaults)")
    print(f"{calls_line(args.calls)}\n")
    print(f"{'client':<38}{'placement':<14}{'server':<8}{'TTFT':>7}{'prefill':>9}{'rest':>7}")
    try:
        for place, client_cpus in placements.items():
            for load in ("idle", "busy"):
                for kind, label in kinds.items():
                    probe = Probe(server.url, rng)
                    run: Callable[[], list[Sample]] = lambda: measure(probe, args.calls, kind)  # noqa: E731, B023
                    with pinned(client_cpus):
                        if load == "busy":
                            with busy(server.url, rng):
                                samples = run()
                        else:
                            samples = run()
                    ttft = statistics.median(s[0] for s in samples)
                    prefill = statistics.median(s[1] for s in samples)
                    rest = statistics.median(s[0] - s[1] for s in samples)
                    print(f"{label:<38}{place:<14}{load:<8}{ttft:7.2f}{prefill:9.2f}{rest:7.2f}",
                          flush=True)  # fmt: skip
    finally:
        server.stop()
    print("\nms, medians; rest = TTFT - prefill (the server's prompt_ms)")


def calls_line(calls: int) -> str:
    """What each row measured."""
    return (
        f"each row: {calls} follow-up turns of ~88 new tokens on a cached "
        f"~{SYSTEM_TOKENS + DOCUMENT_TOKENS + 30}-token conversation"
    )


if __name__ == "__main__":
    main()
