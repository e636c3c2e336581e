"""``telemetry.configure``: a real Prometheus scrape over HTTP and real OTLP/HTTP exports."""

from __future__ import annotations

import gzip
import socket
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from prometheus_client.parser import text_string_to_metric_families

from shared_ollama.records import CallRecord
from shared_ollama.telemetry import Telemetry, configure

from ._helpers import API_KEY, MS, make_record


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Loopback traffic must not go through a proxy configured in the environment.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _calls() -> list[CallRecord]:
    key_url = f"http://user:{API_KEY}@gpu-a:11434"
    plain = make_record("e1", project="demo", duration_ms=300, endpoint=key_url)
    failed = make_record(
        "e2",
        project="demo",
        outcome="error",
        error_type="Timeout",
        input_tokens=None,
        output_tokens=None,
        attempts=2,
    )
    stream = make_record("e3", project="demo", stream=True, ttft_ms=50, duration_ms=200)
    t0 = stream.t_start_ns
    stream.chunk_times_ns = [t0 + 50 * MS, t0 + 90 * MS, t0 + 200 * MS]
    return [plain, failed, stream]


def _send(t: Telemetry, records: list[CallRecord]) -> None:
    for r in records:
        span = t.start(r.operation, r.model, r.project, r.stream)
        span.end(r)


def test_prometheus_scrape() -> None:
    port = _free_port()
    setup = configure(
        prometheus_port=port,
        prometheus_addr="127.0.0.1",
        set_global=False,
        service_name="usage-tests",
    )
    try:
        assert setup.prometheus_port == port
        t = Telemetry(setup.tracer_provider, setup.meter_provider)
        t.observe_pool(
            lambda: [{"endpoint": "http://gpu-a:11434", "in_flight": 2, "breaker": "half_open"}]
        )
        _send(t, _calls())
        reply = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False)
    finally:
        setup()
    assert reply.status_code == 200
    assert API_KEY not in reply.text
    families = {f.name: f for f in text_string_to_metric_families(reply.text)}

    duration = families["gen_ai_client_operation_duration_seconds"]
    assert duration.type == "histogram"
    counts = {
        s.labels.get("error_type", ""): s.value
        for s in duration.samples
        if s.name.endswith("_count")
    }
    assert counts == {"": 2.0, "Timeout": 1.0}
    buckets = {s.labels["le"] for s in duration.samples if s.name.endswith("_bucket")}
    assert {"0.01", "81.92", "+Inf"} <= buckets
    sample = next(s for s in duration.samples if s.name.endswith("_sum"))
    assert sample.labels["shared_ollama_project"] == "demo"
    assert sample.labels["gen_ai_provider_name"] == "ollama"

    tokens = families["gen_ai_client_token_usage"]
    sums = {
        s.labels["gen_ai_token_type"]: s.value for s in tokens.samples if s.name.endswith("_sum")
    }
    assert sums == {"input": 20.0, "output": 40.0}

    ttfc = families["gen_ai_client_operation_time_to_first_chunk_seconds"]
    [ttfc_sum] = [s.value for s in ttfc.samples if s.name.endswith("_sum")]
    assert ttfc_sum == pytest.approx(0.05)
    tpoc = families["gen_ai_client_operation_time_per_output_chunk_seconds"]
    [tpoc_count] = [s.value for s in tpoc.samples if s.name.endswith("_count")]
    assert tpoc_count == 2

    [in_flight] = families["shared_ollama_endpoint_in_flight"].samples
    assert (in_flight.value, in_flight.labels["server_address"]) == (2.0, "gpu-a")
    [breaker] = families["shared_ollama_endpoint_breaker_state"].samples
    assert breaker.value == 1.0
    [info] = families["target_info"].samples
    assert info.labels["service_name"] == "usage-tests"


class _Receiver(ThreadingHTTPServer):
    """A loopback OTLP/HTTP collector that keeps every request body."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[tuple[str, str, bytes]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def bodies(self, path: str) -> list[bytes]:
        with self.lock:
            return [body for p, _, body in self.received if p == path]


class _Handler(BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        with self.server.lock:
            self.server.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    server = _Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    items: list[KeyValue] = list(kvs)
    return {kv.key: _value(kv.value) for kv in items}


def test_otlp_http_export(receiver: _Receiver) -> None:
    setup = configure(
        otlp_endpoint=receiver.url + "/",
        set_global=False,
        service_name="usage-tests",
        export_interval_s=3600,
    )
    t = Telemetry(setup.tracer_provider, setup.meter_provider)
    _send(t, _calls())
    setup()  # shutdown flushes spans and exports metrics once, synchronously
    setup()  # idempotent

    [trace_body] = receiver.bodies("/v1/traces")
    request = ExportTraceServiceRequest.FromString(trace_body)
    [resource_spans] = request.resource_spans
    assert _attrs(resource_spans.resource.attributes)["service.name"] == "usage-tests"
    spans = [s for ss in resource_spans.scope_spans for s in ss.spans]
    assert [s.name for s in spans] == ["chat llama3.2"] * 3
    first = _attrs(spans[0].attributes)
    assert first["gen_ai.operation.name"] == "chat"
    assert first["gen_ai.usage.input_tokens"] == 10
    assert first["shared_ollama.project"] == "demo"
    assert first["server.address"] == "gpu-a"
    assert spans[0].kind == 3  # SPAN_KIND_CLIENT
    failed = _attrs(spans[1].attributes)
    assert (failed["error.type"], failed["shared_ollama.attempts"]) == ("Timeout", 2)
    assert spans[1].status.code == 2  # STATUS_CODE_ERROR
    assert [e.name for e in spans[1].events] == ["shared_ollama.attempt_failed"]
    assert API_KEY.encode() not in trace_body

    metric_bodies = receiver.bodies("/v1/metrics")
    assert metric_bodies
    names: dict[str, Any] = {}
    for body in metric_bodies:
        for rm in ExportMetricsServiceRequest.FromString(body).resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    names[m.name] = m
    assert {
        "gen_ai.client.operation.duration",
        "gen_ai.client.token.usage",
        "gen_ai.client.operation.time_to_first_chunk",
        "gen_ai.client.operation.time_per_output_chunk",
    } <= set(names)
    duration = names["gen_ai.client.operation.duration"]
    assert duration.unit == "s"
    points = duration.histogram.data_points
    assert sum(p.count for p in points) == 3
    assert list(points[0].explicit_bounds)[:3] == [0.01, 0.02, 0.04]
    assert names["gen_ai.client.token.usage"].unit == "{token}"


def test_configure_names_the_extra_when_the_sdk_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(ImportError, match=r"shared-ollama\[otel\]"):
        configure()


def test_configure_console_and_global(capsys: pytest.CaptureFixture[str]) -> None:
    setup = configure(console=True, set_global=False, export_interval_s=3600)
    t = Telemetry(setup.tracer_provider, setup.meter_provider)
    _send(t, _calls()[:1])
    setup()
    out = capsys.readouterr().out
    assert '"name": "chat llama3.2"' in out
    assert "gen_ai.client.operation.duration" in out


def test_example_exports_real_client_calls(receiver: _Receiver) -> None:
    """examples/otel_export.py end to end: SharedClient -> FakeEngine -> OTLP + Prometheus."""
    pytest.importorskip("uvicorn")
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "NO_PROXY": "127.0.0.1,localhost"}
    done = subprocess.run(
        [
            sys.executable,
            str(root / "examples" / "otel_export.py"),
            "--otlp",
            receiver.url,
            "--prometheus-port",
            "0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "gen_ai_client_operation_duration_seconds_count" in done.stdout
    spans = [
        s
        for body in receiver.bodies("/v1/traces")
        for rs in ExportTraceServiceRequest.FromString(body).resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    ]
    assert [s.name for s in spans] == ["chat fake-llama"] * 3
    attrs = _attrs(spans[-1].attributes)
    assert attrs["shared_ollama.project"] == "demo"
    assert attrs["gen_ai.provider.name"] == "ollama"
    assert attrs["shared_ollama.stream"] is True
    assert attrs["gen_ai.usage.output_tokens"] > 0
