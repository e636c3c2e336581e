"""The samplers' cost to the bench: in a sampler process, scraping and parsing a server's
/metrics and reading the host never run in the bench process; cadences per sampler; the
process's readings on the bench's clock; failures that fall back or report, never hang.

``benchmarks/sampler_cost.py`` measures the latency effect; these tests pin down the
mechanism, which is deterministic (Python calls counted per module in this process).
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from shared_ollama.bench.samplers import (
    HostSampler,
    PrometheusSampler,
    SamplerSet,
    SamplerUnavailable,
)
from shared_ollama.bench.scenario import SamplerSpec, validate_scenario
from shared_ollama.bench.session import run_scenario
from shared_ollama.testing import CallCounter, FakeEngine

from .test_samplers import NEVER, VLLM_METRICS, CountingSampler

# -- a /metrics server that says how often it was scraped ---------------------------------------


class _Scraped(BaseHTTPRequestHandler):
    count = 0
    target = 0
    reached: ClassVar[threading.Event] = threading.Event()
    lock: ClassVar[threading.Lock] = threading.Lock()

    def do_GET(self) -> None:
        body = VLLM_METRICS.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        with self.lock:
            type(self).count += 1
            if self.count >= self.target:
                self.reached.set()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @classmethod
    def expect(cls, more: int) -> threading.Event:
        """An event set once ``more`` scrapes beyond those so far have been served."""
        with cls.lock:
            cls.reached = threading.Event()
            cls.target = cls.count + more
        return cls.reached


@pytest.fixture(scope="module")
def metrics_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scraped)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


# -- where the work happens ----------------------------------------------------------------------

SCRAPES = 4
# Libraries whose calls are the samplers' work: parsing, HTTP, host readings.
SAMPLING_MODULES = ("prometheus_client", "httpx", "httpcore", "h11", "psutil")


def _calls_while_scraping(url: str, *, process: bool) -> dict[str, int]:
    """Python calls per module made in this process while the samplers scrape SCRAPES
    times (started before counting: opening and the first reading are not counted)."""
    counter = CallCounter(by_module=True)
    counter.install()  # before start(): the samplers' threads are counted too
    try:
        scraper = PrometheusSampler(url, interval_s=0.01)
        samplers = SamplerSet([HostSampler(), scraper], interval_s=0.01, process=process)
        samplers.start()
        try:
            assert samplers.mode == ("process" if process else "thread"), samplers.fallback
            done = _Scraped.expect(SCRAPES)
            with counter.counting():
                assert done.wait(timeout=60), "the samplers never scraped"
            counts = dict(counter.by_module)
        finally:
            series = samplers.stop()
    finally:
        counter.uninstall()
    assert all(s.available for s in series), series
    return counts


def test_a_sampler_process_keeps_scraping_out_of_the_bench(metrics_url: str) -> None:
    in_thread = _calls_while_scraping(metrics_url, process=False)
    in_process = _calls_while_scraping(metrics_url, process=True)
    # On a thread: every scrape parses /metrics under this process's GIL ...
    assert in_thread.get("prometheus_client", 0) >= 50 * SCRAPES, in_thread
    assert in_thread.get("psutil", 0) > 0, in_thread
    # ... in a sampler process: none of it happens here (the bench's threads wait).
    assert {m: in_process.get(m, 0) for m in SAMPLING_MODULES} == dict.fromkeys(
        SAMPLING_MODULES, 0
    ), in_process


def test_process_readings_are_on_the_bench_clock(metrics_url: str) -> None:
    scraper = PrometheusSampler(metrics_url, interval_s=NEVER)
    samplers = SamplerSet([HostSampler(), scraper], interval_s=NEVER, process=True)
    t0 = time.monotonic_ns()
    samplers.start()
    t1 = time.monotonic_ns()
    assert samplers.process_pid not in (None, os.getpid())
    samplers.sample_now()
    t2 = time.monotonic_ns()
    host, server = samplers.stop()
    t3 = time.monotonic_ns()
    # Exactly the start, the mark and the closing reading, each stamped inside the call
    # that asked for it: the process stamps with this process's clock.
    for series in (host, server):
        assert series.available and series.errors == 0
        assert len(series.times_ns) == 3
        first, mark, last = series.times_ns
        assert t0 <= first <= t1 <= mark <= t2 <= last <= t3
        assert series.interval_s == NEVER
    key = "vllm:generation_tokens_total{engine=0,model_name=tiny-llama}"
    assert server.values[key] == [8.0, 8.0, 8.0]
    assert host.values["host.proc_rss_bytes"][0] is not None
    assert samplers.process_cpu_s is not None and samplers.process_cpu_s > 0


def test_host_sampler_measures_the_process_that_made_it() -> None:
    sampler = HostSampler()
    assert sampler.pid == os.getpid()
    # What a sampler process receives still points at the bench.
    assert pickle.loads(pickle.dumps(sampler)).pid == os.getpid()
    gone = HostSampler(pid=2**22 + 7)  # above Linux's pid_max: no such process
    with pytest.raises(SamplerUnavailable, match=f"process {2**22 + 7}"):
        gone.open()


def test_samplers_that_cannot_be_sent_run_on_a_thread() -> None:
    counting = CountingSampler(n=1)  # holds a threading.Event: not picklable
    samplers = SamplerSet([counting], interval_s=NEVER, process=True)
    samplers.start()
    (series,) = samplers.stop()
    assert samplers.mode == "thread"
    assert samplers.fallback is not None
    assert samplers.fallback.startswith("samplers cannot be sent to a process")
    assert series.available and series.times_ns and counting.closed


def test_a_killed_sampler_process_reports_instead_of_hanging(metrics_url: str) -> None:
    samplers = SamplerSet([HostSampler()], interval_s=NEVER, process=True)
    samplers.start()
    pid = samplers.process_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    samplers.sample_now()  # best effort: no exception
    (series,) = samplers.stop()
    assert not series.available
    assert series.reason is not None
    assert series.reason.startswith("unavailable: sampler process: it exited")


def test_a_custom_clock_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="no custom clock"):
        SamplerSet([], process=True, clock=lambda: 0)


def test_each_sampler_keeps_its_own_cadence() -> None:
    fast = CountingSampler(n=10**9, name="fast")
    slow = CountingSampler(n=3, name="slow")
    slow.interval_s = 0.1  # type: ignore[attr-defined]
    samplers = SamplerSet([fast, slow], interval_s=0.005)
    samplers.start()  # one reading each
    assert slow.reached.wait(timeout=60)
    fast_series, slow_series = samplers.stop()
    assert samplers.intervals == {"fast": 0.005, "slow": 0.1}
    assert (fast_series.interval_s, slow_series.interval_s) == (0.005, 0.1)
    # Twenty times the cadence; a loaded machine may delay readings, hence the margin.
    assert len(fast_series.times_ns) >= 4 * len(slow_series.times_ns), (
        len(fast_series.times_ns),
        len(slow_series.times_ns),
    )


# -- the bench's defaults and what the result says ---------------------------------------------


def test_defaults_scrape_servers_less_often_in_a_process() -> None:
    spec = SamplerSpec()
    assert spec.process
    assert spec.server_interval_s > spec.interval_s


async def test_the_result_states_cadences_and_where_sampling_ran() -> None:
    with FakeEngine(kind="openai", models=("m",)) as engine:
        scenario = validate_scenario(
            {
                "model": "m",
                "pool": {
                    "endpoints": [{"url": engine.url, "kind": "openai"}],
                    "health": {"enabled": False},
                },
                "workloads": [{"prompt_tokens": 8, "max_tokens": 4}],
                "schedules": [{"kind": "concurrency", "levels": [2], "requests": 4}],
                "warmup": {"requests": 0},
                "calibrate": "off",
                "samplers": {"interval_s": 0.05, "server_interval_s": 0.2, "gpu": False},
            }
        )
        result = await run_scenario(scenario)
    info = result.metadata.sampling
    assert (info.enabled, info.where, info.fallback) == (True, "process", None)
    assert (info.interval_s, info.server_interval_s) == (0.05, 0.2)
    assert info.process_cpu_s is not None and info.process_cpu_s > 0
    every = {s.name.split("@")[0]: s.interval_s for s in result.samples}
    assert every == {"host": 0.05, "metrics": 0.2}
    host = next(s for s in result.samples if s.name == "host")
    phase = result.phases[0]
    assert host.times_ns[0] <= phase.t_start_ns and host.times_ns[-1] >= phase.t_end_ns
