"""OTEL_SEMCONV_STABILITY_OPT_IN: the v1.41 GenAI names, the latest draft ones, or both,
from real calls to a FakeEngine read with the SDK's in-memory metric reader."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
    Sum,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared_ollama import (
    Endpoint,
    HealthPolicy,
    InvalidRequest,
    RetryPolicy,
    SyncSharedClient,
    UsageConfig,
)
from shared_ollama.telemetry import (
    SEMCONV_DUP,
    SEMCONV_LATEST,
    SEMCONV_NAMES,
    SEMCONV_OPT_IN_ENV,
    Telemetry,
    semconv_from_env,
)
from shared_ollama.testing import FakeEngine
from tests.conftest import FAST

MODEL = "fake-llama"
MSG = [{"role": "user", "content": "name the metrics"}]

V141 = {
    "gen_ai.client.operation.duration": ("s", HistogramData),
    "gen_ai.client.token.usage": ("{token}", HistogramData),
    "gen_ai.client.operation.time_to_first_chunk": ("s", HistogramData),
    "gen_ai.client.operation.time_per_output_chunk": ("s", HistogramData),
}
LATEST = {
    "gen_ai.client.inference.duration": ("s", HistogramData),
    "gen_ai.client.embeddings.duration": ("s", HistogramData),
    "gen_ai.client.inference.time_to_first_chunk": ("s", HistogramData),
    "gen_ai.client.inference.time_per_output_chunk": ("s", HistogramData),
    "gen_ai.client.inference.usage.input_tokens": ("{token}", Sum),
    "gen_ai.client.inference.usage.output_tokens": ("{token}", Sum),
    "gen_ai.client.inference.operation.input_tokens": ("{token}", HistogramData),
    "gen_ai.client.inference.operation.output_tokens": ("{token}", HistogramData),
    "gen_ai.client.embeddings.operation.input_tokens": ("{token}", HistogramData),
}


@dataclass
class Run:
    metrics: dict[str, Metric]
    span_attributes: list[dict[str, Any]]
    engine_prompt_tokens: int
    engine_output_tokens: int
    chunks: int

    def genai(self) -> set[str]:
        """The GenAI instruments recorded (the pool gauges are the same in every mode)."""
        return {name for name in self.metrics if name.startswith("gen_ai.")}


@pytest.fixture(scope="module")
def engine() -> Iterator[FakeEngine]:
    with FakeEngine(kind="ollama", models=(MODEL,), timing=FAST) as eng:
        yield eng


def _calls(
    engine: FakeEngine, monkeypatch: pytest.MonkeyPatch, env: str | None, *, then: str = ""
) -> Run:
    """Four calls (chat, streamed chat, embed, failed chat) with ``env`` set at construction
    and ``then`` set afterwards (which must change nothing: the variable is read once)."""
    if env is None:
        monkeypatch.delenv(SEMCONV_OPT_IN_ENV, raising=False)
    else:
        monkeypatch.setenv(SEMCONV_OPT_IN_ENV, env)
    spans = InMemorySpanExporter()
    tracer = TracerProvider()
    tracer.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader])
    telemetry = Telemetry(tracer, meter)
    monkeypatch.setenv(SEMCONV_OPT_IN_ENV, then)
    engine.reset_stats()
    with SyncSharedClient(
        endpoints=[Endpoint(engine.url, kind="ollama")],
        project="semconv",
        telemetry=telemetry,
        health=HealthPolicy(enabled=False),
        retry=RetryPolicy(max_attempts=1),
        usage=UsageConfig(enabled=False),
    ) as client:
        client.chat(model=MODEL, messages=MSG, options={"num_predict": 4})
        chunks = list(
            client.chat(model=MODEL, messages=MSG, stream=True, options={"num_predict": 6})
        )
        client.embed(model=MODEL, input="embed me")
        engine.faults.fail(422, message="bad input")
        with pytest.raises(InvalidRequest):
            client.chat(model=MODEL, messages=MSG)
    stats = engine.stats()
    data = reader.get_metrics_data()
    assert data is not None
    found = {
        m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    attrs = [dict(s.attributes or {}) for s in spans.get_finished_spans()]
    tracer.shutdown()
    meter.shutdown()
    return Run(found, attrs, stats.prompt_tokens, stats.tokens_generated, len(chunks))


def _a(point: HistogramDataPoint | NumberDataPoint) -> dict[str, Any]:
    return dict(point.attributes or {})


def _hist(metric: Metric) -> list[HistogramDataPoint]:
    return list(metric.data.data_points)  # type: ignore[arg-type]


def _sum(metric: Metric) -> list[NumberDataPoint]:
    return list(metric.data.data_points)  # type: ignore[arg-type]


def _check_shapes(run: Run, expected: Mapping[str, tuple[str, type]]) -> None:
    for name, (unit, kind) in expected.items():
        metric = run.metrics[name]
        assert metric.unit == unit, name
        assert isinstance(metric.data, kind), name
        if isinstance(metric.data, Sum):
            assert metric.data.is_monotonic, name


def _check_v141(run: Run) -> None:
    duration = _hist(run.metrics["gen_ai.client.operation.duration"])
    # One point per call, every operation in it (embeddings too), the failure with error.type.
    assert sum(p.count for p in duration) == 4
    by_op = {(_a(p)["gen_ai.operation.name"], _a(p).get("error.type")): p.count for p in duration}
    assert by_op == {("chat", None): 2, ("embeddings", None): 1, ("chat", "InvalidRequest"): 1}
    tokens = _hist(run.metrics["gen_ai.client.token.usage"])
    by_type = {
        _a(p)["gen_ai.token.type"]: p for p in tokens if _a(p)["gen_ai.operation.name"] == "chat"
    }
    assert by_type["output"].sum == run.engine_output_tokens == 10
    assert by_type["input"].count == 2
    ttfc = _hist(run.metrics["gen_ai.client.operation.time_to_first_chunk"])
    assert [p.count for p in ttfc] == [1]
    tpoc = _hist(run.metrics["gen_ai.client.operation.time_per_output_chunk"])
    assert [p.count for p in tpoc] == [run.chunks - 1]


def _check_latest(run: Run) -> None:
    inference = _hist(run.metrics["gen_ai.client.inference.duration"])
    assert sorted((_a(p).get("error.type") or "", p.count) for p in inference) == [
        ("", 2),
        ("InvalidRequest", 1),
    ]
    embeddings = _hist(run.metrics["gen_ai.client.embeddings.duration"])
    assert [p.count for p in embeddings] == [1]
    assert {_a(p)["gen_ai.operation.name"] for p in embeddings} == {"embeddings"}
    [used_in] = _sum(run.metrics["gen_ai.client.inference.usage.input_tokens"])
    [used_out] = _sum(run.metrics["gen_ai.client.inference.usage.output_tokens"])
    for point in (used_in, used_out):
        assert _a(point)["gen_ai.token.modality"] == "unknown"
        assert "gen_ai.token.type" not in _a(point)
        assert "error.type" not in _a(point)
    assert used_out.value == run.engine_output_tokens == 10
    [per_call_out] = _hist(run.metrics["gen_ai.client.inference.operation.output_tokens"])
    assert per_call_out.count == 2 and per_call_out.sum == 10
    assert "gen_ai.token.modality" not in _a(per_call_out)
    [per_call_in] = _hist(run.metrics["gen_ai.client.inference.operation.input_tokens"])
    [embed_in] = _hist(run.metrics["gen_ai.client.embeddings.operation.input_tokens"])
    assert used_in.value == per_call_in.sum
    assert per_call_in.sum + embed_in.sum == run.engine_prompt_tokens
    [ttfc] = _hist(run.metrics["gen_ai.client.inference.time_to_first_chunk"])
    assert ttfc.count == 1 and _a(ttfc)["shared_ollama.project"] == "semconv"
    [tpoc] = _hist(run.metrics["gen_ai.client.inference.time_per_output_chunk"])
    assert tpoc.count == run.chunks - 1
    # Inference and embeddings have names of their own: the generic one is not recorded.
    assert "gen_ai.client.operation.duration" not in run.metrics or _only_v141_ops(run)


def _only_v141_ops(run: Run) -> bool:
    """In dup mode operation.duration is the v1.41 instrument: each call once, not twice."""
    duration = _hist(run.metrics["gen_ai.client.operation.duration"])
    return sum(p.count for p in duration) == 4


def test_default_is_v141_only(engine: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _calls(engine, monkeypatch, None, then=SEMCONV_LATEST)
    assert run.genai() == set(V141)
    _check_shapes(run, V141)
    _check_v141(run)
    assert all("gen_ai.request.stream" not in a for a in run.span_attributes)
    assert [a["shared_ollama.stream"] for a in run.span_attributes] == [False, True, False, False]


def test_opt_in_is_latest_only(engine: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _calls(engine, monkeypatch, f" http , {SEMCONV_LATEST} ,bogus", then="")
    assert run.genai() == set(LATEST)
    _check_shapes(run, LATEST)
    _check_latest(run)
    assert [a["gen_ai.request.stream"] for a in run.span_attributes] == [False, True, False, False]


def test_dup_is_both_each_once(engine: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _calls(engine, monkeypatch, SEMCONV_DUP, then="")
    assert run.genai() == set(V141) | set(LATEST)
    _check_shapes(run, {**V141, **LATEST})
    _check_v141(run)
    _check_latest(run)
    assert all(a["gen_ai.request.stream"] == a["shared_ollama.stream"] for a in run.span_attributes)


@pytest.mark.parametrize("semconv", ["latest", "dup"])
def test_other_operations_keep_the_generic_duration_once(
    semconv: Literal["latest", "dup"], caplog: pytest.LogCaptureFixture
) -> None:
    from shared_ollama.records import CallRecord

    caplog.set_level(logging.WARNING)
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader])
    # A latest and a dup client on one provider share one set of instruments.
    Telemetry(meter_provider=meter, semconv="latest")
    t = Telemetry(meter_provider=meter, semconv=semconv)
    t(CallRecord("r", "p", "ps", None, False, t_start_ns=0, t_end_ns=5))
    data = reader.get_metrics_data()
    assert data is not None
    metrics = [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
    assert [m.name for m in metrics] == ["gen_ai.client.operation.duration"]
    assert [p.count for p in _hist(metrics[0])] == [1]
    assert "created already" not in caplog.text
    meter.shutdown()


def test_env_parsing_and_bad_values() -> None:
    assert semconv_from_env("") == "v1.41"
    assert semconv_from_env("gen_ai_latest_experimental_typo") == "v1.41"
    assert semconv_from_env("GEN_AI_LATEST_EXPERIMENTAL") == "latest"
    assert semconv_from_env(f"{SEMCONV_LATEST},{SEMCONV_DUP}") == "dup"
    with pytest.raises(ValueError, match="semconv"):
        Telemetry(semconv="newest")  # type: ignore[arg-type]


def test_the_name_table_covers_every_instrument() -> None:
    new_names = {
        name
        for rows in SEMCONV_NAMES.values()
        for name, _, kind in rows
        if kind != "span attribute"
    }
    assert set(V141) <= set(SEMCONV_NAMES)
    assert set(LATEST) <= new_names
    kinds = {name: kind for rows in SEMCONV_NAMES.values() for name, _, kind in rows}
    for name, (_, data) in LATEST.items():
        assert kinds[name] == ("counter" if data is Sum else "histogram")
