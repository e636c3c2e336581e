"""What the samplers cost the bench they observe: one workload against one FakeEngine with the
samplers off, on the old way and on the new way, interleaved in rounds, side by side.

Run: ``python benchmarks/sampler_cost.py [--rounds 3] [--requests 120] [--concurrency 4]``.

Arms (``--arms`` picks some):

- ``off``: no samplers;
- ``thread-0.5s``: the old way, host, GPU and a server's ``/metrics`` every 0.5 s on a thread
  of the bench process (parsing under its GIL);
- ``process-0.5s``: the same cadence in a sampler process (isolates the process's effect);
- ``new``: the defaults now (``SamplerSpec``): a sampler process, host and GPU every 0.5 s,
  servers every 2 s.

The engine (``python -m shared_ollama.testing``) and a ``/metrics`` server with a page the
size of a real vLLM's (~600 lines: histograms of TTFT, ITL, E2E, queue time ... per model)
run in processes of their own, so the arms differ only in the samplers. With 2 cores or
more, both servers are pinned to core 0 and the bench to the last core, as in the issue's
setup; the sampler process inherits the bench's core. Prints each arm's TTFT and ITL p50/p99
(pooled over rounds), their ratios to ``off``, the bench process's CPU seconds per request
and the sampler process's CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

ARMS = ("off", "thread-0.5s", "process-0.5s", "new")
TTFT_S, ITL_S, TOKENS = 0.020, 0.015, 64


def vllm_like_page() -> str:
    """A Prometheus page shaped like a vLLM server's: gauges, counters, and the histograms
    (22 or 13 buckets each) that make up most of its ~600 lines."""
    labels = 'engine="0",model_name="some-org/some-model-7b-instruct"'
    lines: list[str] = []
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        lines += [f"# HELP vllm:{gauge} x", f"# TYPE vllm:{gauge} gauge"]
        lines.append(f"vllm:{gauge}{{{labels}}} 1.0")
    for counter in ("prompt_tokens", "generation_tokens", "num_preemptions"):
        lines += [f"# HELP vllm:{counter}_total x", f"# TYPE vllm:{counter}_total counter"]
        lines += [
            f"vllm:{counter}_total{{{labels}}} 12.0",
            f"vllm:{counter}_created{{{labels}}} 1.7e9",
        ]
    seconds = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
    tokens = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
    histograms = [
        (name, seconds)
        for name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                     "time_per_output_token_seconds", "e2e_request_latency_seconds",
                     "request_queue_time_seconds", "request_inference_time_seconds",
                     "request_prefill_time_seconds", "request_decode_time_seconds")
    ] + [
        (name, tokens)
        for name in ("request_prompt_tokens", "request_generation_tokens",
                     "iteration_tokens_total", "request_max_num_generation_tokens",
                     "request_params_n", "request_params_max_tokens")
    ]  # fmt: skip
    for name, buckets in histograms:
        lines += [f"# HELP vllm:{name} x", f"# TYPE vllm:{name} histogram"]
        lines += [f'vllm:{name}_bucket{{{labels},le="{b}"}} 3.0' for b in buckets]
        lines += [
            f'vllm:{name}_bucket{{{labels},le="+Inf"}} 3.0',
            f"vllm:{name}_count{{{labels}}} 3.0",
            f"vllm:{name}_sum{{{labels}}} 0.5",
            f"vllm:{name}_created{{{labels}}} 1.7e9",
        ]
    http = (0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5,
            7.5, 10, 30, 60)  # fmt: skip
    lines += ["# TYPE http_request_duration_seconds histogram"]
    for handler in ("/v1/chat/completions", "/v1/completions", "/metrics", "/health", "/v1/models"):
        for method in ("GET", "POST"):
            tag = f'handler="{handler}",method="{method}"'
            lines += [f'http_request_duration_seconds_bucket{{{tag},le="{b}"}} 3.0' for b in http]
            lines += [
                f"http_request_duration_seconds_count{{{tag}}} 3.0",
                f"http_request_duration_seconds_sum{{{tag}}} 3.0",
            ]
    return "\n".join(lines) + "\n"


def serve_metrics() -> None:
    """``--serve-metrics``: serve ``vllm_like_page()`` on 127.0.0.1 until killed."""
    body = vllm_like_page().encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


@contextlib.contextmanager
def _process(argv: list[str], core: int | None) -> Iterator[str]:
    """A server process that prints its URL first; pinned to ``core`` where asked."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        if core is not None:
            os.sched_setaffinity(proc.pid, {core})
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@dataclass
class Arm:
    name: str
    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    requests: int = 0
    bench_cpu_s: float = 0.0
    sampler_cpu_s: float = 0.0
    scrapes: int = 0


def _sampler_set(arm: str, metrics_url: str) -> Any:
    from shared_ollama.bench.samplers import HostSampler, NVMLSampler, PrometheusSampler, SamplerSet
    from shared_ollama.bench.scenario import SamplerSpec

    if arm == "off":
        return None
    if arm == "new":
        spec = SamplerSpec()
        scraper = PrometheusSampler(metrics_url, interval_s=spec.server_interval_s)
        return SamplerSet(
            [HostSampler(), NVMLSampler(), scraper], spec.interval_s, process=spec.process
        )
    scraper = PrometheusSampler(metrics_url)
    samplers = [HostSampler(), NVMLSampler(), scraper]
    return SamplerSet(samplers, 0.5, process=arm.startswith("process"))


async def _one(arm: Arm, engine_url: str, metrics_url: str, args: argparse.Namespace) -> None:
    from shared_ollama.bench.scenario import validate_scenario
    from shared_ollama.bench.session import run_scenario

    scenario = validate_scenario(
        {
            "model": "fake-llama",
            "pool": {"endpoints": [{"url": engine_url, "kind": "openai"}]},
            "workloads": [{"prompt_tokens": 128, "max_tokens": TOKENS, "stream": True}],
            "schedules": [
                {"kind": "concurrency", "levels": [args.concurrency], "requests": args.requests}
            ],
            "warmup": {"requests": 2 * args.concurrency, "concurrency": args.concurrency},
            "calibrate": "off",
            # This script runs the samplers itself, around the bench, to point the scrape at
            # the vLLM-sized page instead of the engine's own small one.
            "samplers": {"enabled": False},
        }
    )
    samplers = _sampler_set(arm.name, metrics_url)
    if samplers is not None:
        samplers.start()
    cpu0 = time.process_time()
    try:
        result = await run_scenario(scenario)
    finally:
        cpu = time.process_time() - cpu0
        series = samplers.stop() if samplers is not None else []
    ok = [r for r in result.requests if r.ok]
    arm.requests += len(ok)
    arm.ttft_ms += [r.ttft_ms for r in ok if r.ttft_ms is not None]
    arm.itl_ms += [v / 1e6 for r in ok for v in r.derived().itls_ns]
    arm.bench_cpu_s += cpu
    if samplers is not None:
        arm.sampler_cpu_s += samplers.process_cpu_s or 0.0
        arm.scrapes += sum(len(s.times_ns) for s in series if s.name.startswith("metrics@"))


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _report(arms: dict[str, Arm]) -> None:
    base = arms.get("off")
    head = f"{'arm':<13}{'n':>6}{'TTFT p50':>10}{'p99':>8}{'ITL p50':>10}{'p99':>8}"
    head += f"{'ratio ITL p50/p99':>20}{'TTFT p50/p99':>15}{'bench CPU ms/req':>18}"
    head += f"{'sampler CPU s':>15}{'scrapes':>9}"
    print(head)
    for arm in arms.values():
        ttft = (_pct(arm.ttft_ms, 50), _pct(arm.ttft_ms, 99))
        itl = (_pct(arm.itl_ms, 50), _pct(arm.itl_ms, 99))
        line = f"{arm.name:<13}{arm.requests:>6}{ttft[0]:>10.2f}{ttft[1]:>8.2f}"
        line += f"{itl[0]:>10.2f}{itl[1]:>8.2f}"
        if base is not None and base.itl_ms:
            r_itl = (itl[0] / _pct(base.itl_ms, 50), itl[1] / _pct(base.itl_ms, 99))
            r_ttft = (ttft[0] / _pct(base.ttft_ms, 50), ttft[1] / _pct(base.ttft_ms, 99))
            line += f"{r_itl[0]:>12.3f} / {r_itl[1]:<5.3f}{r_ttft[0]:>8.3f} / {r_ttft[1]:<5.3f}"
        else:
            line += " " * 35
        per_req = 1e3 * arm.bench_cpu_s / max(arm.requests, 1)
        line += f"{per_req:>18.2f}{arm.sampler_cpu_s:>15.2f}{arm.scrapes:>9}"
        print(line)


def main() -> None:
    """Parse flags, start the servers, run the arms in rotating order, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=120, help="per arm and round")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"some of {','.join(ARMS)}")
    parser.add_argument("--no-pin", action="store_true", help="leave the processes unpinned")
    parser.add_argument("--serve-metrics", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_metrics:
        serve_metrics()
        return
    names = [a for a in args.arms.split(",") if a]
    if unknown := set(names) - set(ARMS):
        parser.error(f"unknown arms: {sorted(unknown)}")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pin = len(cores) >= 2 and not args.no_pin
    server_core, bench_core = (cores[0], cores[-1]) if pin else (None, None)
    engine_argv = [
        sys.executable, "-m", "shared_ollama.testing", "--kind", "openai", "--port", "0",
        "--slots", "256", "--ttft-base-s", str(TTFT_S), "--ttft-per-prompt-token-s", "0",
        "--itl-s", str(ITL_S), "--itl-per-active-s", "0",
    ]  # fmt: skip
    page = [sys.executable, __file__, "--serve-metrics"]
    with _process(engine_argv, server_core) as engine, _process(page, server_core) as metrics:
        if bench_core is not None:
            os.sched_setaffinity(0, {bench_core})
        print(f"engine {engine}, /metrics page of {len(vllm_like_page().splitlines())} lines at "
              f"{metrics}; servers on core {server_core}, bench on core {bench_core}; "
              f"c={args.concurrency}, {args.requests} requests x {args.rounds} rounds per arm, "
              f"TTFT {TTFT_S * 1e3:g} ms, ITL {ITL_S * 1e3:g} ms, {TOKENS} tokens")  # fmt: skip
        arms = {name: Arm(name) for name in names}
        for i in range(args.rounds):
            order = names[i % len(names) :] + names[: i % len(names)]  # each arm in each slot
            for name in order:
                asyncio.run(_one(arms[name], engine, metrics, args))
            print(f"round {i + 1}/{args.rounds} done ({', '.join(order)})", flush=True)
    _report(arms)


if __name__ == "__main__":
    main()
