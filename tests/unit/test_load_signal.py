"""The fused load signal: in-flight tokens, scraped server gauges, their fading, the parsers."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import pytest

from shared_ollama._core.steps import NOW, Close, Head, Read, Send, scrape
from shared_ollama.config import BreakerPolicy, Endpoint, Limits
from shared_ollama.errors import ProtocolError
from shared_ollama.pool import (
    EndpointState,
    LeastLoaded,
    RouteRequest,
    busy_slots,
    parse_prometheus,
    server_load,
)
from shared_ollama.pool.signals import MAX_LINE, ServerLoad

VLLM = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0 1700000000000
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.5
"""


def state(kind: str = "openai") -> EndpointState:
    return EndpointState(Endpoint("http://127.0.0.1:9", kind=kind), BreakerPolicy(), load_tau_s=10)


def test_prometheus_reads_the_gauges_summed_over_labels() -> None:
    assert parse_prometheus(VLLM) == {
        "vllm:num_requests_running": 4.0,
        "vllm:num_requests_waiting": 2.0,
    }
    llama = b"llamacpp:requests_processing 2\nllamacpp:requests_deferred 5\n"
    assert parse_prometheus(llama) == {
        "llamacpp:requests_processing": 2.0,
        "llamacpp:requests_deferred": 5.0,
    }
    tgi = b"# TYPE tgi_queue_size gauge\ntgi_queue_size 7\ntgi_batch_current_size 1\n"
    assert parse_prometheus(tgi) == {"tgi_queue_size": 7.0, "tgi_batch_current_size": 1.0}
    assert parse_prometheus(b"other_metric 1\n") == {}
    assert parse_prometheus(b"") == {}


@pytest.mark.parametrize(
    "body",
    [
        b"vllm:num_requests_running NaN\nvllm:num_requests_waiting +Inf\n",
        b"vllm:num_requests_running -3\n",
        b'vllm:num_requests_running{engine="0" 3\n',  # unclosed labels
        b"vllm:num_requests_running\n",
        b"vllm:num_requests_running{} \n",
        b"\xff\xfevllm:num_requests_running 1\n",
    ],
)
def test_prometheus_ignores_garbage_samples(body: bytes) -> None:
    assert parse_prometheus(b"# TYPE x gauge\n" + body) == {}


def test_prometheus_hostile_sizes_are_bounded() -> None:
    huge = b'vllm:num_requests_running{l="' + b"a" * (MAX_LINE * 50) + b'"} 99\n'
    assert parse_prometheus(huge + b"vllm:num_requests_waiting 1\n") == {
        "vllm:num_requests_waiting": 1.0
    }
    # Many label sets: summed, not kept one by one.
    many = b"".join(b'vllm:num_requests_running{i="%d"} 1\n' % i for i in range(20000))
    assert parse_prometheus(many) == {"vllm:num_requests_running": 20000.0}
    # A body cut at the read bound: its partial last line is dropped, not misread.
    cut = b"vllm:num_requests_waiting 1\nvllm:num_requests_running 12"
    assert parse_prometheus(cut, truncated=True) == {"vllm:num_requests_waiting": 1.0}


@pytest.mark.parametrize("body", [b"<html><body>hi</body></html>", bytes(range(256)) * 10])
def test_prometheus_rejects_what_is_no_metrics_text(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_prometheus(body)


def test_slots() -> None:
    body = b'[{"id":0,"is_processing":true},{"id":1,"is_processing":false},{"id":2},3]'
    assert busy_slots(body) == 1
    for bad in (b"{", b'{"slots": 1}', b"[" * 100_000):
        with pytest.raises(ProtocolError):
            busy_slots(bad)


def test_load_is_own_in_flight_plus_others_faded_by_age() -> None:
    ep = state()
    assert ep.try_acquire(tokens=120) and ep.try_acquire(tokens=30)
    assert (ep.in_flight, ep.in_flight_tokens) == (2, 150)
    assert ep.load(0.0) == 2.0
    # The server counted 6 running + 2 waiting while 2 of them were ours: 6 others.
    report = server_load(
        parse_prometheus(VLLM + b"vllm:num_requests_running 2\n"),
        at=100.0,
        own_in_flight=2,
        source="/metrics",
    )
    assert report is not None and report.others == 6.0
    ep.set_server_load(report)
    assert ep.load(100.0) == pytest.approx(8.0)
    assert ep.load(110.0) == pytest.approx(2 + 6 * math.exp(-1))
    assert ep.load(10_000.0) == pytest.approx(2.0)
    ep.release(latency_s=0.1, error=None, now=101.0, tokens=120)
    assert (ep.in_flight, ep.in_flight_tokens) == (1, 30)
    status = ep.status(105.0)
    assert status.in_flight_tokens == 30
    assert status.server_running == 6.0 and status.server_waiting == 2.0
    assert status.server_load_age_s == pytest.approx(5.0)
    assert status.as_dict()["server_load_age_s"] == pytest.approx(5.0)
    # Our own calls are never counted twice: a server reporting fewer than ours adds nothing.
    ep.set_server_load(ServerLoad(1.0, None, 105.0, 4, "/slots"))
    assert ep.load(105.0) == 1.0


def test_least_loaded_reads_the_signal() -> None:
    quiet, busy = state(), state()
    busy.set_server_load(ServerLoad(10.0, 5.0, 0.0, 0, "/metrics"))
    rng = random.Random(0)
    picks = {LeastLoaded().pick([quiet, busy], RouteRequest("m"), rng, 0.0).endpoint is quiet
             for _ in range(20)}  # fmt: skip
    assert picks == {True}
    # Once the report is old enough, both weigh the same again.
    late = {
        LeastLoaded().pick([quiet, busy], RouteRequest("m"), rng, 1000.0).endpoint is quiet
        for _ in range(50)
    }
    assert late == {True, False}


class Server:
    """Answers the scrape's sends from a table of path -> (status, body)."""

    def __init__(self, routes: dict[str, tuple[int, bytes]]) -> None:
        self.routes = routes
        self.asked: list[str] = []

    def run(self, steps: Any, now: float = 50.0) -> None:
        value: Any = None
        while True:
            try:
                op = steps.send(value)
            except StopIteration:
                return
            value = self.answer(op, now)

    def answer(self, op: Any, now: float) -> Any:
        if op is NOW:
            return now, int(now * 1e9)
        if isinstance(op, Send):
            self.asked.append(op.wire.path)
            status, body = self.routes.get(op.wire.path, (404, b"not found"))
            return Head(status, {}, body, 0)
        if isinstance(op, Read):
            sent: bytes = op.head.handle
            assert op.max_bytes is not None  # every read of a server is bounded
            return sent[: op.max_bytes]
        assert isinstance(op, Close)
        return None


def run_scrape(ep: EndpointState, server: Server, limits: Limits | None = None) -> None:
    server.run(scrape(ep, "p", 1.0, limits or Limits()))


def test_scrape_reads_metrics_then_slots_then_gives_up() -> None:
    ep = state()
    ep.try_acquire()
    server = Server({"/metrics": (200, VLLM)})
    run_scrape(ep, server)
    report = ep.server_load
    assert report is not None and (report.running, report.waiting) == (4.0, 2.0)
    assert report.own_in_flight == 1 and report.at == 50.0 and report.source == "/metrics"
    # llama.cpp without --metrics: 501, then /slots.
    ep = state()
    server = Server({"/metrics": (501, b"no"), "/slots": (200, b'[{"is_processing":true}]')})
    run_scrape(ep, server)
    assert ep.server_load is not None and ep.server_load.source == "/slots"
    # Neither route: not scraped again.
    ep = state()
    server = Server({})
    run_scrape(ep, server)
    assert not ep.scrapable and server.asked == ["/metrics", "/slots"]
    run_scrape(ep, server)
    assert server.asked == ["/metrics", "/slots"]


def test_scrape_survives_hostile_replies() -> None:
    ep = state()
    ep.set_server_load(ServerLoad(3.0, 0.0, 0.0, 0, "/metrics"))
    html: Callable[[], Server] = lambda: Server({"/metrics": (200, b"<html>" * 1000)})  # noqa: E731
    run_scrape(ep, html())
    assert ep.server_load is not None and ep.server_load.running == 3.0  # the last one kept
    # A body past the bound is cut, not read whole; the partial line is dropped.
    big = b"vllm:num_requests_waiting 1\n" + b"# padding\n" * 300_000
    run_scrape(ep, Server({"/metrics": (200, big)}))
    assert ep.server_load is not None and ep.server_load.waiting == 1.0
    # A transient 503 keeps the endpoint scrapable.
    run_scrape(ep, Server({"/metrics": (503, b"busy")}))
    assert ep.scrapable


def test_scrape_ollama_refreshes_loaded_models() -> None:
    ep = state("ollama")
    body = b'{"models":[{"name":"m:latest","model":"m:latest","size":1}]}'
    server = Server({"/api/ps": (200, body)})
    run_scrape(ep, server)
    assert ep.is_loaded("m") and server.asked == ["/api/ps"]
