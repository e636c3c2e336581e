"""Truth test: FakeEngines with exactly known TTFT and inter-token times, in their own process,
benched at concurrency 64; the bench must recover the schedule.

What any client on this machine can see is bounded by the machine itself (the engine's HTTP
handling, timer granularity, a loaded 2-core CI box): a *floor* client, a bare aiohttp loop
reading the same engine at the same concurrency in the same test, measures that. The bench's
error is its offset beyond the floor's, and the bounds (1 ms at p50, 5 ms at p99) hold
strictly for TTFT and ITL, on every protocol: OpenAI (4-token chunks), Ollama (chunks of 1
and of 3 tokens, where the lines do not say how many each carries), TGI.

The engine (``python -m shared_ollama.testing``) runs apart from the bench so the two do not
share a GIL. Workers start spread over one request's duration (``ramp_s``) so requests do not
reach the server in one synchronized burst of 64, which any server would queue.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from shared_ollama.bench.result import BenchResult
from shared_ollama.bench.scenario import validate_scenario
from shared_ollama.bench.session import run_scenario
from shared_ollama.testing import TimingModel, engine_process
from tests.realservers.fixtures import report_line

CONCURRENCY = 64
ROUNDS = 4  # requests per worker
TTFT_S = 0.050
ITL_S = 0.050
TOKENS = 24  # whole chunks of 1, 3 and 4 tokens
RAMP_S = TTFT_S + (TOKENS - 1) * ITL_S
P50_BOUND_MS, P99_BOUND_MS = 1.0, 5.0  # set by the issue, not tuned here
MODEL = "fake-llama"
PROMPT = "one two three four five six seven eight"
CASES = [("openai", 4), ("ollama", 1), ("ollama", 3), ("tgi", 1)]


@dataclass
class Samples:
    """TTFTs and ITLs (ms) of one client's run."""

    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    def errors(self, name: str, expected_ms: float) -> tuple[float, float, float]:
        """(p50, p99, min) of measured minus expected, in ms."""
        err = np.array(getattr(self, name), dtype=float) - expected_ms
        p50, p99 = np.percentile(err, [50, 99])
        return float(p50), float(p99), float(err.min())


@dataclass
class Truth:
    kind: str
    tokens_per_chunk: int
    result: BenchResult
    bench: Samples
    floor: Samples

    @property
    def expected_ms(self) -> dict[str, float]:
        # A k-token chunk leaves when its last token is produced.
        return {"ttft": (TTFT_S + (self.tokens_per_chunk - 1) * ITL_S) * 1e3, "itl": ITL_S * 1e3}

    def offsets(self, name: str) -> tuple[float, float]:
        """The bench's (p50, p99) error beyond the floor's, in ms."""
        b50, b99, _ = self.bench.errors(name, self.expected_ms[name])
        f50, f99, _ = self.floor.errors(name, self.expected_ms[name])
        return b50 - f50, b99 - f99

    def report(self) -> str:
        lines = [f"{self.kind} k={self.tokens_per_chunk} c={CONCURRENCY}, error vs the schedule:"]
        for name in ("ttft", "itl"):
            b50, b99, _ = self.bench.errors(name, self.expected_ms[name])
            f50, f99, _ = self.floor.errors(name, self.expected_ms[name])
            d50, d99 = self.offsets(name)
            lines.append(
                f"  {name}: bench p50 {b50:+.3f} p99 {b99:+.3f} ms; floor p50 {f50:+.3f} "
                f"p99 {f99:+.3f} ms; beyond the floor p50 {d50:+.3f} p99 {d99:+.3f} ms"
            )
        return "\n".join(lines)


def _timing(tokens_per_chunk: int) -> TimingModel:
    return TimingModel(ttft_base_s=TTFT_S, ttft_per_prompt_token_s=0, itl_s=ITL_S,
                       itl_per_active_s=0, tokens_per_chunk=tokens_per_chunk)  # fmt: skip


# -- the floor: a bare aiohttp loop, no parsing beyond what finds a content chunk ---------------
_ROUTES: dict[str, tuple[str, dict[str, object]]] = {
    "openai": ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": TOKENS}),
    "ollama": ("/api/generate", {"model": MODEL, "prompt": PROMPT,
                                 "options": {"num_predict": TOKENS}}),
    "tgi": ("/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": TOKENS}}),
}  # fmt: skip


def _content(kind: str, line: bytes) -> bool:
    """Whether one line of the stream is a chunk carrying text."""
    if kind == "ollama":
        return line.startswith(b"{") and not json.loads(line)["done"]
    if not line.startswith(b"data:") or b"[DONE]" in line:
        return False
    event = json.loads(line[5:])
    return bool(event.get("choices")) if kind == "openai" else "token" in event


async def _floor(kind: str, url: str, k: int) -> Samples:
    import aiohttp

    path, body = _ROUTES[kind]
    out = Samples()
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(measure: bool) -> None:
            arrivals: list[int] = []
            start = time.monotonic_ns()
            async with session.post(f"{url}{path}", json={**body, "stream": True}) as resp:
                async for line in resp.content:
                    if _content(kind, line.strip()):
                        arrivals.append(time.monotonic_ns())
            if measure:
                out.ttft.append((arrivals[0] - start) / 1e6)
                for a, b in itertools.pairwise(arrivals):
                    out.itl += [(b - a) / 1e6 / k] * k

        async def worker(index: int) -> None:
            await asyncio.sleep(RAMP_S * index / CONCURRENCY)  # the bench's ramp, not a sync
            for _ in range(ROUNDS):
                await one(True)

        await asyncio.gather(*(one(False) for _ in range(CONCURRENCY)))  # warm, as the bench
        await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
    return out


def _bench(kind: str, url: str) -> BenchResult:
    scenario = validate_scenario(
        {
            "model": MODEL,
            "pool": {"endpoints": [{"url": url, "kind": kind}]},
            "workloads": [
                {"operation": "generate", "prompt_tokens": 8, "max_tokens": TOKENS, "stream": True}
            ],
            "schedules": [
                {
                    "kind": "concurrency",
                    "levels": [CONCURRENCY],
                    "requests": CONCURRENCY * ROUNDS,
                    "ramp_s": RAMP_S,
                }
            ],
            "warmup": {"requests": CONCURRENCY, "concurrency": CONCURRENCY},
            "calibrate": "off",  # the engines' TTFT does not depend on the prompt
        }
    )
    return asyncio.run(run_scenario(scenario))


def _measure(kind: str, k: int) -> Truth:
    """The floor, then the bench, against one engine of known schedule."""
    with engine_process(kind, timing=_timing(k), models=[MODEL], slots=256) as engine:
        floor = asyncio.run(_floor(kind, engine.url, k))
        result = _bench(kind, engine.url)
    ok = [r for r in result.requests if r.ok]
    bench = Samples(
        ttft=[r.ttft_ms for r in ok if r.ttft_ms is not None],
        itl=[v / 1e6 for r in ok for v in r.derived().itls_ns],
    )
    return Truth(kind, k, result, bench, floor)


@pytest.fixture(scope="module", params=CASES, ids=[f"{kind}-k{k}" for kind, k in CASES])
def truth(request: pytest.FixtureRequest) -> Truth:
    kind, k = request.param
    return _measure(kind, k)


def test_every_request_and_token_is_accounted(truth: Truth) -> None:
    s = truth.result.summary
    assert s.completed == CONCURRENCY * ROUNDS and s.failed == 0, s.errors_by_type
    assert all(r.output_tokens == TOKENS for r in truth.result.requests)
    assert s.itl_ms is not None and s.itl_ms.count == s.completed * (
        TOKENS - truth.tokens_per_chunk
    )
    assert len(truth.floor.ttft) == CONCURRENCY * ROUNDS
    assert len(truth.floor.itl) == s.itl_ms.count


def test_ttft_is_never_early(truth: Truth) -> None:
    # Causality, whatever the machine: no first chunk can beat the engine's own schedule.
    assert truth.bench.errors("ttft", truth.expected_ms["ttft"])[2] >= 0, truth.report()


def _within(t: Truth) -> bool:
    return all(
        abs(d50) <= P50_BOUND_MS and abs(d99) <= P99_BOUND_MS
        for d50, d99 in (t.offsets(name) for name in ("ttft", "itl"))
    )


def test_ttft_and_itl_are_recovered_within_the_bounds_beyond_the_floor(truth: Truth) -> None:
    for attempt in range(2):
        if _within(truth):
            break
        # The floor and the bench run one after the other: a burst of other load on a
        # shared 2-core machine during one of them moves a p99 by itself. A disturbed pair
        # is measured again, up to twice (each is printed); the bounds are not relaxed.
        print(f"run {attempt + 1}, disturbed:\n" + truth.report())
        truth = _measure(truth.kind, truth.tokens_per_chunk)
    report_line(truth.report(), "bench truth (TTFT/ITL beyond the same-run floor)")
    for name in ("ttft", "itl"):
        d50, d99 = truth.offsets(name)
        assert abs(d50) <= P50_BOUND_MS, truth.report()
        assert abs(d99) <= P99_BOUND_MS, truth.report()
