"""Telemetry with the SDK's in-memory exporter and reader: names, attributes, units, values."""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, Metric
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from shared_ollama import telemetry as telemetry_module
from shared_ollama.records import CallRecord
from shared_ollama.telemetry import CAPTURE_CONTENT_ENV, Telemetry

from ._helpers import API_KEY, MS, make_record

TIME_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
TOKEN_BUCKETS = (
    1,
    4,
    16,
    64,
    256,
    1024,
    4096,
    16384,
    65536,
    262144,
    1048576,
    4194304,
    16777216,
    67108864,
)


@dataclass
class OTel:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def telemetry(self, **kw: Any) -> Telemetry:
        return Telemetry(self.tracer_provider, self.meter_provider, **kw)

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def metrics(self) -> dict[str, Metric]:
        data = self.reader.get_metrics_data()
        if data is None:  # nothing recorded or observed
            return {}
        return {
            m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        }


@pytest.fixture
def otel() -> Iterator[OTel]:
    spans = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    yield OTel(spans, reader, tp, mp)
    tp.shutdown()
    mp.shutdown()


def _points(metric: Metric) -> list[HistogramDataPoint]:
    return list(metric.data.data_points)  # type: ignore[arg-type]


def _run(t: Telemetry, record: CallRecord) -> None:
    span = t.start(record.operation, record.model, record.project, record.stream)
    span.end(record)


def test_success(otel: OTel) -> None:
    t = otel.telemetry()
    record = make_record(
        "ok1",
        project="search",
        duration_ms=1500,
        input_tokens=12,
        output_tokens=34,
        served_model="llama3.2:3b",
        finish_reason="stop",
    )
    _run(t, record)
    [span] = otel.finished()
    assert span.name == "chat llama3.2"
    assert span.kind is SpanKind.CLIENT
    assert span.status.status_code is StatusCode.UNSET
    assert dict(span.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "ollama",
        "gen_ai.request.model": "llama3.2",
        "gen_ai.response.model": "llama3.2:3b",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 34,
        "gen_ai.response.finish_reasons": ("stop",),
        "server.address": "gpu-a",
        "server.port": 11434,
        "shared_ollama.project": "search",
        "shared_ollama.stream": False,
        "shared_ollama.attempts": 1,
        "shared_ollama.request_id": "ok1",
    }
    assert span.events == ()

    ms = otel.metrics()
    assert set(ms) == {"gen_ai.client.operation.duration", "gen_ai.client.token.usage"}
    duration = ms["gen_ai.client.operation.duration"]
    assert duration.unit == "s"
    [point] = _points(duration)
    assert (point.count, point.sum) == (1, pytest.approx(1.5))
    assert tuple(point.explicit_bounds) == TIME_BUCKETS
    assert dict(point.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "ollama",
        "gen_ai.request.model": "llama3.2",
        "gen_ai.response.model": "llama3.2:3b",
        "server.address": "gpu-a",
        "server.port": 11434,
        "shared_ollama.project": "search",
    }
    usage = ms["gen_ai.client.token.usage"]
    assert usage.unit == "{token}"
    by_type = {p.attributes["gen_ai.token.type"]: p for p in _points(usage)}
    assert (by_type["input"].sum, by_type["output"].sum) == (12, 34)
    assert tuple(by_type["input"].explicit_bounds) == TOKEN_BUCKETS


def test_failure(otel: OTel) -> None:
    t = otel.telemetry()
    record = make_record(
        "f1",
        outcome="error",
        error_type="ServerError",
        input_tokens=None,
        output_tokens=None,
        served_model=None,
    )
    _run(t, record)
    [span] = otel.finished()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ServerError"
    attrs = dict(span.attributes or {})
    assert attrs["error.type"] == "ServerError"
    assert "gen_ai.usage.input_tokens" not in attrs
    ms = otel.metrics()
    assert "gen_ai.client.token.usage" not in ms
    [point] = _points(ms["gen_ai.client.operation.duration"])
    assert point.attributes["error.type"] == "ServerError"


def test_cancelled_call_is_marked(otel: OTel) -> None:
    _run(otel.telemetry(), make_record("c1", outcome="cancelled"))
    [span] = otel.finished()
    assert span.attributes["error.type"] == "cancelled"  # type: ignore[index]


def test_retry_records_attempts_and_failed_try(otel: OTel) -> None:
    t = otel.telemetry()
    record = make_record("r2", attempts=2)
    record.attempts[0].endpoint = "http://gpu-b:8000"
    record.attempts[0].error_message = f"upstream said {API_KEY}"
    _run(t, record)
    [span] = otel.finished()
    assert span.attributes["shared_ollama.attempts"] == 2  # type: ignore[index]
    assert span.status.status_code is StatusCode.UNSET  # the call itself succeeded
    [event] = span.events
    assert event.name == "shared_ollama.attempt_failed"
    assert dict(event.attributes or {}) == {
        "shared_ollama.attempt": 1,
        "error.type": "ServerError",
        "http.response.status_code": 503,
        "server.address": "gpu-b",
        "server.port": 8000,
    }


def test_streaming(otel: OTel) -> None:
    t = otel.telemetry()
    record = make_record("s1", stream=True, ttft_ms=100, duration_ms=400, output_tokens=3)
    t0 = record.t_start_ns
    record.chunk_times_ns = [t0 + 100 * MS, t0 + 150 * MS, t0 + 230 * MS, t0 + 390 * MS]
    _run(t, record)
    [span] = otel.finished()
    assert span.attributes["shared_ollama.stream"] is True  # type: ignore[index]
    assert span.attributes["gen_ai.response.time_to_first_chunk"] == pytest.approx(0.1)  # type: ignore[index]
    ms = otel.metrics()
    ttfc = ms["gen_ai.client.operation.time_to_first_chunk"]
    [p] = _points(ttfc)
    assert (ttfc.unit, p.count, p.sum) == ("s", 1, pytest.approx(0.1))
    assert tuple(p.explicit_bounds) == TIME_BUCKETS
    tpoc = ms["gen_ai.client.operation.time_per_output_chunk"]
    [p] = _points(tpoc)
    assert (tpoc.unit, p.count, p.sum) == ("s", 3, pytest.approx(0.29))
    assert (p.min, p.max) == (pytest.approx(0.05), pytest.approx(0.16))
    assert tuple(p.explicit_bounds) == TIME_BUCKETS
    assert p.attributes["shared_ollama.project"] == "search"


def test_non_stream_has_no_chunk_metrics(otel: OTel) -> None:
    _run(otel.telemetry(), make_record("n", ttft_ms=50))
    assert "gen_ai.client.operation.time_to_first_chunk" not in otel.metrics()


def test_operation_names_follow_the_conventions(otel: OTel) -> None:
    t = otel.telemetry()
    _run(t, make_record("g", operation="generate"))
    _run(t, make_record("e", operation="embed", model="nomic-embed"))
    _run(t, make_record("l", operation="list", model=None))
    names = [s.name for s in otel.finished()]
    assert names == ["text_completion llama3.2", "embeddings nomic-embed", "list"]


def test_headers_carry_the_span(otel: OTel) -> None:
    span = otel.telemetry().start("chat", "m", "p", False)
    headers = span.headers()
    ctx = span.span.get_span_context()
    assert ctx.trace_flags.sampled
    flags = f"{ctx.trace_flags:02x}"
    assert headers["traceparent"] == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{flags}"
    span.end(make_record("h"))
    span.end(make_record("h"))  # idempotent
    assert len(otel.finished()) == 1


def test_content_not_captured_by_default(otel: OTel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CAPTURE_CONTENT_ENV, raising=False)
    span = otel.telemetry().start("chat", "m", "p", False)
    span.set_input([{"role": "user", "content": "secret prompt"}])
    span.set_output("secret answer")
    span.end(make_record("c"))
    [s] = otel.finished()
    assert s.events == ()
    assert "secret" not in json.dumps(dict(s.attributes or {}))


@pytest.mark.parametrize("value", ["true", "True", "SPAN_AND_EVENT"])
def test_content_captured_on_opt_in(
    otel: OTel, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, value)
    span = otel.telemetry().start("chat", "m", "p", False)
    span.set_input([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    span.set_output("hello")
    span.end(make_record("c"))
    [s] = otel.finished()
    [event] = s.events
    assert event.name == "gen_ai.client.inference.operation.details"
    attrs = dict(event.attributes or {})
    assert json.loads(str(attrs["gen_ai.input.messages"])) == [
        {"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
        {"role": "user", "parts": [{"type": "text", "content": "hi"}]},
    ]
    assert json.loads(str(attrs["gen_ai.output.messages"])) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "hello"}]}
    ]


def test_prompt_string_input(otel: OTel) -> None:
    span = otel.telemetry(capture_content=True).start("generate", "m", "p", False)
    span.set_input("why is the sky blue")
    span.end(make_record("p", operation="generate"))
    [s] = otel.finished()
    msgs = json.loads(str(s.events[0].attributes["gen_ai.input.messages"]))  # type: ignore[index]
    assert msgs == [{"role": "user", "parts": [{"type": "text", "content": "why is the sky blue"}]}]


class _Pool:
    def __init__(self) -> None:
        self.rows: list[dict[str, object]] = [
            {"endpoint": "http://gpu-a:11434", "in_flight": 3, "breaker": "closed"},
            {"endpoint": "http://gpu-b:8000", "in_flight": 0, "breaker": "half_open"},
            {"endpoint": "https://gpu-c", "in_flight": 1, "breaker": "open"},
        ]

    def status(self) -> list[dict[str, object]]:
        return self.rows


def _gauge(otel: OTel, name: str) -> dict[tuple[str, int], float]:
    metric = otel.metrics().get(name)
    if metric is None:
        return {}
    points: list[Any] = list(metric.data.data_points)
    return {
        (str(p.attributes["server.address"]), int(p.attributes["server.port"])): p.value
        for p in points
    }


def test_pool_gauges(otel: OTel) -> None:
    t = otel.telemetry()
    pool = _Pool()
    stop = t.observe_pool(pool.status)
    assert _gauge(otel, "shared_ollama.endpoint.in_flight") == {
        ("gpu-a", 11434): 3,
        ("gpu-b", 8000): 0,
        ("gpu-c", 443): 1,
    }
    assert _gauge(otel, "shared_ollama.endpoint.breaker_state") == {
        ("gpu-a", 11434): 0,
        ("gpu-b", 8000): 1,
        ("gpu-c", 443): 2,
    }
    assert otel.metrics()["shared_ollama.endpoint.in_flight"].unit == "{request}"
    pool.rows[0]["in_flight"] = 7
    assert _gauge(otel, "shared_ollama.endpoint.in_flight")[("gpu-a", 11434)] == 7
    stop()
    assert _gauge(otel, "shared_ollama.endpoint.in_flight") == {}


def test_pool_gauges_do_not_keep_a_client_alive(otel: OTel) -> None:
    t = otel.telemetry()
    pool = _Pool()
    t.observe_pool(pool.status)
    other = _Pool()
    other.rows = [{"endpoint": "http://gpu-z:1", "in_flight": 5, "breaker": "closed"}]
    t.observe_pool(other.status)
    assert len(_gauge(otel, "shared_ollama.endpoint.in_flight")) == 4
    del pool
    gc.collect()
    assert _gauge(otel, "shared_ollama.endpoint.in_flight") == {("gpu-z", 1): 5}


def test_failing_status_fn_does_not_break_collection(
    otel: OTel, caplog: pytest.LogCaptureFixture
) -> None:
    t = otel.telemetry()

    def broken() -> list[dict[str, object]]:
        raise RuntimeError("boom")

    t.observe_pool(broken)
    t.observe_pool(_Pool().status)  # collected right away: nothing holds it
    _run(t, make_record("x"))
    assert "gen_ai.client.operation.duration" in otel.metrics()
    assert "pool status for telemetry failed" in caplog.text


def test_listener_form(otel: OTel) -> None:
    t = otel.telemetry()
    t(make_record("l1"))
    [span] = otel.finished()
    assert span.name == "chat llama3.2"


def test_without_an_sdk_everything_is_a_noop() -> None:
    t = Telemetry(trace.NoOpTracerProvider(), metrics.NoOpMeterProvider())
    span = t.start("chat", "m", "p", True)
    assert span.headers() == {}
    span.set_input("x")
    span.end(make_record("n", stream=True, ttft_ms=1))
    t.observe_pool(list)


def test_no_api_key_in_spans_metrics_or_logs(
    otel: OTel, caplog: pytest.LogCaptureFixture, tmp_path: object
) -> None:
    from shared_ollama.usage import Ledger

    caplog.set_level(logging.DEBUG)
    t = otel.telemetry()
    endpoint = f"http://user:{API_KEY}@gpu-a:11434/?key={API_KEY}"
    records = [
        make_record("k1", endpoint=endpoint, attempts=2, tags={"k": "v"}),
        make_record(
            "k2",
            endpoint=endpoint,
            outcome="error",
            error_type="AuthError",
            error_message=f"401 for key {API_KEY}",
        ),
        make_record("k3", endpoint=endpoint, stream=True, ttft_ms=5),
    ]
    for r in records[:2]:
        r.attempts[0].error_message = f"key {API_KEY} rejected"
    ledger = Ledger(f"{tmp_path}/k.db")
    for r in records:
        span = t.start(r.operation, r.model, r.project, r.stream, "ollama", endpoint)
        span.end(r)
        ledger.submit(r)
        t.observe_pool(lambda: [{"endpoint": endpoint, "in_flight": 1, "breaker": "open"}])
    rows = ledger.rows()
    ledger.close()
    dumped = [
        json.dumps(dict(s.attributes or {}), default=str)
        + json.dumps([dict(e.attributes or {}) for e in s.events], default=str)
        + s.name
        + str(s.status.description)
        for s in otel.finished()
    ]
    data = otel.reader.get_metrics_data()
    assert data is not None
    outputs = [*dumped, data.to_json(), *(r.model_dump_json() for r in rows), caplog.text]
    assert len(rows) == 3 and len(dumped) == 3
    for text in outputs:
        assert API_KEY not in text
    assert any("gpu-a" in text for text in dumped)


def test_doctests() -> None:
    import doctest

    assert doctest.testmod(telemetry_module).failed == 0


def test_two_clients_on_one_provider_share_instruments(
    otel: OTel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    first, second = otel.telemetry(), otel.telemetry()
    pool_a, pool_b = _Pool(), _Pool()
    pool_b.rows = [{"endpoint": "http://gpu-z:1", "in_flight": 5, "breaker": "open"}]
    first.observe_pool(pool_a.status)
    second.observe_pool(pool_b.status)
    _run(first, make_record("one"))
    _run(second, make_record("two"))
    assert len(_gauge(otel, "shared_ollama.endpoint.in_flight")) == 4
    [point] = _points(otel.metrics()["gen_ai.client.operation.duration"])
    assert point.count == 2
    assert "created already" not in caplog.text
