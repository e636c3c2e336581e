"""OpenTelemetry for every call: a CLIENT span, the GenAI client histograms and pool gauges.

The library uses the OpenTelemetry API only; ``configure()`` (the ``otel`` extra) sets up the SDK.

Names follow the GenAI semantic conventions v1.41 by default: span
``"{gen_ai.operation.name} {model}"``; histograms ``gen_ai.client.operation.duration`` (s),
``gen_ai.client.token.usage`` (``{token}``, ``gen_ai.token.type`` = input|output),
``gen_ai.client.operation.time_to_first_chunk`` (s) and ``gen_ai.client.operation.
time_per_output_chunk`` (s); gauges ``shared_ollama.endpoint.in_flight`` and
``shared_ollama.endpoint.breaker_state`` (and ``shared_ollama.endpoint.concurrency_limit``
for adaptive endpoints). ``OTEL_SEMCONV_STABILITY_OPT_IN`` selects the
newer draft names instead (``gen_ai_latest_experimental``) or both
(``gen_ai_latest_experimental/dup``): see ``SEMCONV_NAMES``.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from inspect import ismethod
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from ._version import __version__
from .records import CallRecord

if TYPE_CHECKING:  # the SDK is an optional extra: only configure() imports it
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

__all__ = [
    "BREAKER_STATE_VALUES",
    "CAPTURE_CONTENT_ENV",
    "SEMCONV_DUP",
    "SEMCONV_LATEST",
    "SEMCONV_NAMES",
    "SEMCONV_OPT_IN_ENV",
    "CallSpan",
    "OTelSetup",
    "Semconv",
    "Telemetry",
    "configure",
    "operation_name",
    "semconv_from_env",
]

log = logging.getLogger("shared_ollama.telemetry")

#: Opt-in for prompts and completions on spans (``true``; also the newer ``SPAN_ONLY``,
#: ``EVENT_ONLY``, ``SPAN_AND_EVENT`` values).
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_CAPTURE_ON = {"1", "true", "yes", "on", "span_only", "event_only", "span_and_event"}

#: Which GenAI conventions to emit: a comma-separated list; unknown tokens are ignored.
SEMCONV_OPT_IN_ENV = "OTEL_SEMCONV_STABILITY_OPT_IN"
#: Emit the latest draft GenAI names only (the conventions' own opt-in value).
SEMCONV_LATEST = "gen_ai_latest_experimental"
#: Emit both the v1.41 and the draft names, for a transition: ``/dup`` as in ``http/dup``,
#: the value the HTTP conventions used for the same kind of migration.
SEMCONV_DUP = "gen_ai_latest_experimental/dup"

#: ``"v1.41"`` (the default), ``"latest"`` or ``"dup"`` (both).
Semconv = Literal["v1.41", "latest", "dup"]

#: v1.41 instrument (or span attribute) -> its draft replacements: (name, unit, instrument).
SEMCONV_NAMES: Mapping[str, tuple[tuple[str, str, str], ...]] = {
    "gen_ai.client.operation.duration": (
        ("gen_ai.client.inference.duration", "s", "histogram"),  # chat, text_completion
        ("gen_ai.client.embeddings.duration", "s", "histogram"),  # embeddings
        ("gen_ai.client.operation.duration", "s", "histogram"),  # any other operation
    ),
    "gen_ai.client.token.usage": (
        ("gen_ai.client.inference.usage.input_tokens", "{token}", "counter"),
        ("gen_ai.client.inference.usage.output_tokens", "{token}", "counter"),
        ("gen_ai.client.inference.operation.input_tokens", "{token}", "histogram"),
        ("gen_ai.client.inference.operation.output_tokens", "{token}", "histogram"),
        ("gen_ai.client.embeddings.operation.input_tokens", "{token}", "histogram"),
    ),
    "gen_ai.client.operation.time_to_first_chunk": (
        ("gen_ai.client.inference.time_to_first_chunk", "s", "histogram"),
    ),
    "gen_ai.client.operation.time_per_output_chunk": (
        ("gen_ai.client.inference.time_per_output_chunk", "s", "histogram"),
    ),
    # A span attribute: the drafts standardise what shared_ollama.stream said (kept too).
    "shared_ollama.stream": (("gen_ai.request.stream", "", "span attribute"),),
}

#: ``shared_ollama.endpoint.breaker_state`` values.
BREAKER_STATE_VALUES: Mapping[str, int] = {"closed": 0, "half_open": 1, "open": 2}

# Bucket boundaries the GenAI semantic conventions advise.
_TIME_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96,
                 81.92)  # fmt: skip
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                  16777216, 67108864)  # fmt: skip

# Our operation names -> the conventions' well-known values (which MUST be used if they apply).
_OPERATION_NAMES = {
    "chat": "chat",
    "generate": "text_completion",
    "embed": "embeddings",
    "embeddings": "embeddings",
}
_DETAILS_EVENT = "gen_ai.client.inference.operation.details"
_SCHEME_PORTS = {"http": 80, "https": 443}


def _capture_from_env() -> bool:
    return os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() in _CAPTURE_ON


def semconv_from_env(value: str | None = None) -> Semconv:
    """The conventions ``$OTEL_SEMCONV_STABILITY_OPT_IN`` (or ``value``) asks for.

    >>> semconv_from_env(""), semconv_from_env("http, gen_ai_latest_experimental")
    ('v1.41', 'latest')
    >>> semconv_from_env("gen_ai_latest_experimental/dup,gen_ai_latest_experimental")
    'dup'
    """
    raw = os.environ.get(SEMCONV_OPT_IN_ENV, "") if value is None else value
    tokens = {token.strip().lower() for token in raw.split(",")}
    if SEMCONV_DUP in tokens:  # the wider one wins, as http/dup does over http
        return "dup"
    if SEMCONV_LATEST in tokens:
        return "latest"
    return "v1.41"


@functools.lru_cache(maxsize=256)
def _server(url: str | None) -> dict[str, AttributeValue]:
    """``server.address``/``server.port`` of an endpoint URL (never its credentials); cached:
    a pool has a handful of endpoints and this runs twice a call. Callers copy the result."""
    if not url:
        return {}
    try:
        parts = urlsplit(url)
        port = parts.port or _SCHEME_PORTS.get(parts.scheme)
    except ValueError:
        return {}
    if not parts.hostname:
        return {}
    out: dict[str, AttributeValue] = {"server.address": parts.hostname}
    if port is not None:
        out["server.port"] = port
    return out


def operation_name(operation: str) -> str:
    """The conventions' ``gen_ai.operation.name`` for one of our operations.

    >>> operation_name("generate"), operation_name("chat"), operation_name("ps")
    ('text_completion', 'chat', 'ps')
    """
    return _OPERATION_NAMES.get(operation, operation)


_StatusFn = Callable[[], list[dict[str, object]]]


class _Instruments:
    """The histograms and pool gauges of one MeterProvider, shared by its ``Telemetry``s.

    The SDK hands back the first instrument when one is created twice under a name (with a
    warning) and would then never call a second client's gauge callbacks; so there is one
    set per provider and the gauges read every registered pool.
    """

    def __init__(self, meter: metrics.Meter) -> None:
        self.meter = meter
        self.lock = threading.Lock()
        self.sources: list[Callable[[], _StatusFn | None]] = []
        self.gauges_created = False
        # Per conventions, created on first use: a mode nobody selected has no instruments.
        self._v141_set: _V141Metrics | None = None
        self._latest_set: _LatestMetrics | None = None
        self._dup_set: _LatestMetrics | None = None
        self._duration: metrics.Histogram | None = None

    def metric_sets(self, semconv: Semconv) -> tuple[_V141Metrics | _LatestMetrics, ...]:
        """The instrument sets ``semconv`` records into, each once per call."""
        with self.lock:
            if semconv == "v1.41":
                return (self._v141(),)
            if semconv == "latest":
                return (self._latest(),)
            # Both keep gen_ai.client.operation.duration (one instrument): in dup only the
            # v1.41 set records it, or an operation that is neither inference nor embeddings
            # would count twice.
            if self._dup_set is None:
                self._dup_set = copy.copy(self._latest())
                self._dup_set.operation_duration = None
            return (self._v141(), self._dup_set)

    def _generic_duration(self) -> metrics.Histogram:
        if self._duration is None:
            self._duration = self.meter.create_histogram(
                "gen_ai.client.operation.duration",
                unit="s",
                description="GenAI operation duration.",
                explicit_bucket_boundaries_advisory=_TIME_BUCKETS,
            )
        return self._duration

    def _v141(self) -> _V141Metrics:
        if self._v141_set is None:
            self._v141_set = _V141Metrics(self.meter, self._generic_duration())
        return self._v141_set

    def _latest(self) -> _LatestMetrics:
        if self._latest_set is None:
            self._latest_set = _LatestMetrics(self.meter, self._generic_duration())
        return self._latest_set

    def observe(self, source: Callable[[], _StatusFn | None]) -> None:
        with self.lock:
            self.sources.append(source)
            if self.gauges_created:
                return
            self.gauges_created = True
        self.meter.create_observable_gauge(
            "shared_ollama.endpoint.in_flight",
            callbacks=[self._observe_in_flight],
            unit="{request}",
            description="Calls in flight to the endpoint.",
        )
        self.meter.create_observable_gauge(
            "shared_ollama.endpoint.breaker_state",
            callbacks=[self._observe_breaker],
            # A state code, not a ratio: "1" would become a _ratio suffix in Prometheus.
            unit="{state}",
            description="Circuit breaker state: 0 closed, 1 half-open, 2 open.",
        )
        self.meter.create_observable_gauge(
            "shared_ollama.endpoint.concurrency_limit",
            callbacks=[self._observe_limit],
            unit="{request}",
            description='The in-flight limit learned for a max_in_flight="adaptive" endpoint.',
        )

    def forget(self, source: Callable[[], _StatusFn | None]) -> None:
        with self.lock:
            if source in self.sources:
                self.sources.remove(source)

    def _statuses(self) -> Iterable[dict[str, object]]:
        with self.lock:
            sources = list(self.sources)
        for source in sources:
            fn = source()
            if fn is None:  # the client was garbage-collected
                self.forget(source)
                continue
            try:
                yield from fn()
            except Exception:  # a collection must not fail because one pool did
                log.exception("pool status for telemetry failed")

    def _observe_in_flight(self, options: CallbackOptions) -> Iterable[Observation]:
        out: list[Observation] = []
        for s in self._statuses():
            in_flight = s.get("in_flight")
            if isinstance(in_flight, int):
                out.append(Observation(in_flight, _server(str(s.get("endpoint")))))
        return out

    def _observe_limit(self, options: CallbackOptions) -> Iterable[Observation]:
        out: list[Observation] = []
        for s in self._statuses():
            limit = s.get("max_in_flight")
            if s.get("adaptive") is True and isinstance(limit, int):
                out.append(Observation(limit, _server(str(s.get("endpoint")))))
        return out

    def _observe_breaker(self, options: CallbackOptions) -> Iterable[Observation]:
        out: list[Observation] = []
        for s in self._statuses():
            value = BREAKER_STATE_VALUES.get(str(s.get("breaker")).replace("-", "_"))
            if value is not None:
                out.append(Observation(value, _server(str(s.get("endpoint")))))
        return out


_GLOBAL = object()  # the key for "whatever global MeterProvider the app installs"
_registry_lock = threading.Lock()
_registry: weakref.WeakKeyDictionary[object, _Instruments] = weakref.WeakKeyDictionary()
_global_instruments: list[_Instruments] = []


def _instruments_for(meter_provider: metrics.MeterProvider | None) -> _Instruments:
    with _registry_lock:
        if meter_provider is None:
            # The API's global meter is a proxy that follows a provider set later.
            if not _global_instruments:
                _global_instruments.append(
                    _Instruments(metrics.get_meter("shared_ollama", __version__))
                )
            return _global_instruments[0]
        inst = _registry.get(meter_provider)
        if inst is None:
            meter = metrics.get_meter("shared_ollama", __version__, meter_provider=meter_provider)
            inst = _registry[meter_provider] = _Instruments(meter)
        return inst


class Telemetry:
    """Creates one ``CallSpan`` per call and records the GenAI client metrics.

    ``tracer_provider``/``meter_provider`` default to the global ones (set by the app, or by
    ``configure()``); without an SDK everything is a cheap no-op. ``capture_content``
    defaults to ``$OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``, ``semconv`` to
    ``$OTEL_SEMCONV_STABILITY_OPT_IN`` (see ``semconv_from_env``), both read here, once.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        capture_content: bool | None = None,
        semconv: Semconv | None = None,
    ) -> None:
        self._tracer = trace.get_tracer(
            "shared_ollama", __version__, tracer_provider=tracer_provider
        )
        self.instruments = _instruments_for(meter_provider)
        self.capture_content = _capture_from_env() if capture_content is None else capture_content
        #: The GenAI conventions this instance emits: ``v1.41``, ``latest`` or ``dup``.
        self.semconv: Semconv = semconv_from_env() if semconv is None else semconv
        if self.semconv not in ("v1.41", "latest", "dup"):
            raise ValueError(f"semconv must be 'v1.41', 'latest' or 'dup', not {semconv!r}")
        self._metric_sets = self.instruments.metric_sets(self.semconv)
        self._latest_span = self.semconv != "v1.41"
        # Events carry epoch ns; records carry monotonic ns.
        self._epoch_offset_ns = time.time_ns() - time.monotonic_ns()

    def start(
        self,
        operation: str,
        model: str | None,
        project: str,
        stream: bool,
        provider: str | None = None,
        server_url: str | None = None,
    ) -> CallSpan:
        """Open the CLIENT span of one call (not made current: ``headers()`` carries it)."""
        op = operation_name(operation)
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": op,
            "shared_ollama.project": project,
            "shared_ollama.stream": stream,
        }
        if self._latest_span:
            attributes["gen_ai.request.stream"] = stream
        if model:
            attributes["gen_ai.request.model"] = model
        if provider:
            attributes["gen_ai.provider.name"] = provider
        attributes.update(_server(server_url))
        span = self._tracer.start_span(
            f"{op} {model}" if model else op, kind=SpanKind.CLIENT, attributes=attributes
        )
        return CallSpan(self, span, op, model, provider)

    def observe_pool(self, status_fn: _StatusFn) -> Callable[[], None]:
        """Report the pool's in-flight calls and breaker states as observable gauges.

        ``status_fn()`` returns one dict per endpoint with ``endpoint`` (URL), ``in_flight``
        and ``breaker`` (``closed``/``half_open``/``open``). A bound method is held weakly, so
        a forgotten client is not kept alive. Returns a function that stops observing.
        """
        source: Callable[[], _StatusFn | None]
        if ismethod(status_fn):
            source = weakref.WeakMethod(status_fn)
        else:

            def source() -> _StatusFn:
                return status_fn

        self.instruments.observe(source)
        return lambda: self.instruments.forget(source)

    def record(self, record: CallRecord) -> None:
        """Span and metrics for a record that had no ``start()`` (a plain CallListener)."""
        span = self.start(record.operation, record.model, record.project, record.stream)
        span.end(record)

    __call__ = record


class CallSpan:
    """The span of one call; ``end(record)`` completes it and records the metrics once."""

    __slots__ = ("_ended", "_input", "_model", "_op", "_output", "_provider", "_span",
                 "_telemetry")  # fmt: skip

    def __init__(
        self,
        telemetry: Telemetry,
        span: trace.Span,
        op: str,
        model: str | None,
        provider: str | None,
    ) -> None:
        self._telemetry = telemetry
        self._span = span
        self._op = op
        self._model = model
        self._provider = provider
        self._input: str | None = None
        self._output: str | None = None
        self._ended = False

    @property
    def span(self) -> trace.Span:
        """The underlying OpenTelemetry span."""
        return self._span

    def headers(self) -> dict[str, str]:
        """W3C ``traceparent`` (and ``tracestate``/baggage) for the request to the server."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self._span))
        return carrier

    def set_input(self, messages_or_prompt: object) -> None:
        """Keep the prompt or chat messages for the span (only with content capture on)."""
        if self._telemetry.capture_content:
            self._input = json.dumps(_input_messages(messages_or_prompt), ensure_ascii=False)

    def set_output(self, text: str | None) -> None:
        """Keep the completion text for the span (only with content capture on)."""
        if self._telemetry.capture_content and text is not None:
            message = {"role": "assistant", "parts": [{"type": "text", "content": text}]}
            self._output = json.dumps([message], ensure_ascii=False)

    def end(self, record: CallRecord) -> None:
        """Finish the span from the call's record and record the histograms (idempotent)."""
        if self._ended:
            return
        self._ended = True
        try:
            self._end(record)
        finally:
            self._span.end()

    def _end(self, record: CallRecord) -> None:
        span = self._span
        error_type = None if record.ok else (record.error_type or record.outcome)
        common = self._common(record)
        if not span.is_recording():  # no tracer provider: no attributes to build
            for metric_set in self._telemetry._metric_sets:
                metric_set.record(record, common, error_type)
            return
        attrs: dict[str, AttributeValue] = {
            **common,
            "shared_ollama.attempts": len(record.attempts),
            "shared_ollama.request_id": record.request_id,
        }
        if record.input_tokens is not None:
            attrs["gen_ai.usage.input_tokens"] = record.input_tokens
        if record.output_tokens is not None:
            attrs["gen_ai.usage.output_tokens"] = record.output_tokens
        if record.finish_reason:
            attrs["gen_ai.response.finish_reasons"] = [record.finish_reason]
        if record.stream and record.ttft_s is not None:
            attrs["gen_ai.response.time_to_first_chunk"] = record.ttft_s
        if error_type:
            attrs["error.type"] = error_type
            span.set_status(Status(StatusCode.ERROR, error_type))
        if record.model and record.model != self._model:
            span.update_name(f"{self._op} {record.model}")
        span.set_attributes(attrs)
        self._attempt_events(record)
        self._content_event()
        for metric_set in self._telemetry._metric_sets:
            metric_set.record(record, common, error_type)

    def _common(self, record: CallRecord) -> dict[str, AttributeValue]:
        """Attributes shared by the span and the metrics (low cardinality)."""
        common: dict[str, AttributeValue] = {
            "gen_ai.operation.name": self._op,
            "shared_ollama.project": record.project,
        }
        provider = record.protocol or self._provider
        if provider:
            common["gen_ai.provider.name"] = provider
        if record.model:
            common["gen_ai.request.model"] = record.model
        if record.served_model:
            common["gen_ai.response.model"] = record.served_model
        common.update(_server(record.endpoint))
        return common

    def _content_event(self) -> None:
        if self._input is None and self._output is None:
            return
        details: dict[str, AttributeValue] = {}
        if self._input is not None:
            details["gen_ai.input.messages"] = self._input
        if self._output is not None:
            details["gen_ai.output.messages"] = self._output
        self._span.add_event(_DETAILS_EVENT, details)

    def _attempt_events(self, record: CallRecord) -> None:
        # Failed tries explain a slow call; their messages stay out (they may quote input).
        offset = self._telemetry._epoch_offset_ns
        for i, attempt in enumerate(record.attempts, 1):
            if attempt.error_type is None:
                continue
            event: dict[str, AttributeValue] = {
                "shared_ollama.attempt": i,
                "error.type": attempt.error_type,
                **_server(attempt.endpoint),
            }
            if attempt.status_code is not None:
                event["http.response.status_code"] = attempt.status_code
            when = (attempt.t_end_ns or attempt.t_start_ns) + offset
            self._span.add_event("shared_ollama.attempt_failed", event, timestamp=when)


def _record_chunks(first: metrics.Histogram, per_chunk: metrics.Histogram, record: CallRecord,
                   attrs: Mapping[str, AttributeValue]) -> None:  # fmt: skip
    """A stream's chunk timings, the same under both naming conventions."""
    if record.t_first_chunk_ns is not None:
        first.record((record.t_first_chunk_ns - record.t_start_ns) / 1e9, attrs)
    for previous, current in itertools.pairwise(record.chunk_times_ns):
        per_chunk.record((current - previous) / 1e9, attrs)


class _V141Metrics:
    """The GenAI client histograms as the conventions v1.41 name them (the default)."""

    def __init__(self, meter: metrics.Meter, duration: metrics.Histogram) -> None:
        self.duration = duration
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
        )
        self.time_to_first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            unit="s",
            description="Time to receive the first chunk of a streaming response.",
            explicit_bucket_boundaries_advisory=_TIME_BUCKETS,
        )
        self.time_per_output_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_per_output_chunk",
            unit="s",
            description="Time between consecutive chunks of a streaming response.",
            explicit_bucket_boundaries_advisory=_TIME_BUCKETS,
        )

    def record(
        self, record: CallRecord, attrs: dict[str, AttributeValue], error_type: str | None
    ) -> None:
        """Record one finished call."""
        self.duration.record(
            record.duration_s, {**attrs, "error.type": error_type} if error_type else attrs
        )
        for kind, tokens in (("input", record.input_tokens), ("output", record.output_tokens)):
            if tokens is not None:
                self.token_usage.record(tokens, {**attrs, "gen_ai.token.type": kind})
        if not record.stream:  # the chunk metrics are for streams only
            return
        _record_chunks(self.time_to_first_chunk, self.time_per_output_chunk, record, attrs)


_INFERENCE_OPS = frozenset({"chat", "text_completion", "generate_content"})
# The servers report no per-modality counts, and a chat may carry images: the drafts ask
# for "unknown" when the modality cannot be told reliably.
_UNKNOWN_MODALITY = "unknown"


class _LatestMetrics:
    """The GenAI client instruments as the latest draft conventions name them (opt-in).

    Inference (chat, text completion) and embeddings have their own duration and token
    instruments; ``gen_ai.client.operation.duration`` stays for any other operation.
    """

    def __init__(self, meter: metrics.Meter, operation_duration: metrics.Histogram) -> None:
        def histogram(name: str, unit: str, description: str) -> metrics.Histogram:
            buckets = _TIME_BUCKETS if unit == "s" else _TOKEN_BUCKETS
            return meter.create_histogram(
                name,
                unit=unit,
                description=description,
                explicit_bucket_boundaries_advisory=buckets,
            )

        self.inference_duration = histogram(
            "gen_ai.client.inference.duration", "s", "GenAI client inference operation duration."
        )
        self.embeddings_duration = histogram(
            "gen_ai.client.embeddings.duration", "s", "GenAI client embeddings operation duration."
        )
        #: None where the v1.41 set records it (dup).
        self.operation_duration: metrics.Histogram | None = operation_duration
        self.time_to_first_chunk = histogram(
            "gen_ai.client.inference.time_to_first_chunk",
            "s",
            "Time to receive the first chunk of a streaming response.",
        )
        self.time_per_output_chunk = histogram(
            "gen_ai.client.inference.time_per_output_chunk",
            "s",
            "Time between consecutive chunks of a streaming response.",
        )
        self.usage_input = meter.create_counter(
            "gen_ai.client.inference.usage.input_tokens",
            unit="{token}",
            description="The number of input (prompt) tokens used, including cached tokens.",
        )
        self.usage_output = meter.create_counter(
            "gen_ai.client.inference.usage.output_tokens",
            unit="{token}",
            description="The number of output (completion) tokens used.",
        )
        self.operation_input = histogram(
            "gen_ai.client.inference.operation.input_tokens",
            "{token}",
            "Input tokens per inference operation.",
        )
        self.operation_output = histogram(
            "gen_ai.client.inference.operation.output_tokens",
            "{token}",
            "Output tokens per inference operation.",
        )
        self.embeddings_input = histogram(
            "gen_ai.client.embeddings.operation.input_tokens",
            "{token}",
            "Input tokens per embeddings operation.",
        )

    def record(
        self, record: CallRecord, attrs: dict[str, AttributeValue], error_type: str | None
    ) -> None:
        """Record one finished call."""
        timed = {**attrs, "error.type": error_type} if error_type else attrs
        op = attrs["gen_ai.operation.name"]
        if op in _INFERENCE_OPS:
            self.inference_duration.record(record.duration_s, timed)
            # The counters take every call, a failed one as 0, so rates line up with calls.
            counted = {**attrs, "gen_ai.token.modality": _UNKNOWN_MODALITY}
            self.usage_input.add(record.input_tokens or 0, counted)
            self.usage_output.add(record.output_tokens or 0, counted)
            if record.input_tokens is not None:
                self.operation_input.record(record.input_tokens, attrs)
            if record.output_tokens is not None:
                self.operation_output.record(record.output_tokens, attrs)
        elif op == "embeddings":
            self.embeddings_duration.record(record.duration_s, timed)
            if record.input_tokens is not None:
                self.embeddings_input.record(record.input_tokens, attrs)
            return
        else:
            if self.operation_duration is not None:
                self.operation_duration.record(record.duration_s, timed)
            return
        if not record.stream:
            return
        _record_chunks(self.time_to_first_chunk, self.time_per_output_chunk, record, attrs)


def _input_messages(value: object) -> list[dict[str, Any]]:
    """Prompt or chat messages in the conventions' ``gen_ai.input.messages`` shape."""
    if isinstance(value, str):
        return [{"role": "user", "parts": [{"type": "text", "content": value}]}]
    items: Sequence[object] = value if isinstance(value, Sequence) else [value]
    out: list[dict[str, Any]] = []
    for item in items:
        if hasattr(item, "model_dump"):
            item = item.model_dump()
        if isinstance(item, Mapping):
            role = str(item.get("role", "user"))
            content = item.get("content", "")
        else:
            role, content = "user", item
        out.append({"role": role, "parts": [{"type": "text", "content": str(content)}]})
    return out


# -- SDK set-up for applications -------------------------------------------------------------

_EXTRA_HINT = "pip install 'shared-ollama[otel]'"


class OTelSetup:
    """What ``configure()`` built; call it to flush and shut everything down (idempotent)."""

    def __init__(
        self,
        tracer_provider: SdkTracerProvider,
        meter_provider: SdkMeterProvider,
        prometheus_port: int | None = None,
        stop_server: Callable[[], None] | None = None,
    ) -> None:
        #: The SDK ``TracerProvider`` (pass it to ``Telemetry`` when not set globally).
        self.tracer_provider = tracer_provider
        #: The SDK ``MeterProvider``.
        self.meter_provider = meter_provider
        #: The port the Prometheus endpoint listens on (the real one when 0 was asked).
        self.prometheus_port = prometheus_port
        self._stop_server = stop_server
        self._done = False

    def __call__(self) -> None:
        if self._done:
            return
        self._done = True
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        if self._stop_server is not None:
            self._stop_server()


def configure(
    *,
    service_name: str = "shared_ollama",
    otlp_endpoint: str | None = None,
    prometheus_port: int | None = None,
    prometheus_addr: str = "0.0.0.0",
    console: bool = False,
    set_global: bool = True,
    export_interval_s: float = 10.0,
) -> OTelSetup:
    """Set up the OpenTelemetry SDK in one line; returns the shutdown function.

    ``otlp_endpoint`` is an OTLP/HTTP base URL (``http://collector:4318``): spans and metrics
    go to ``/v1/traces`` and ``/v1/metrics``. ``prometheus_port`` serves ``/metrics`` for
    scraping (0: any free port, see ``.prometheus_port``). ``console`` prints to stdout.
    ``set_global`` installs the providers globally, where ``Telemetry()`` finds them.
    Needs the ``otel`` extra; raises ``ImportError`` saying so when it is missing.
    """
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            PeriodicExportingMetricReader,
        )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
    except ImportError as exc:
        raise ImportError(
            f"shared_ollama.telemetry.configure() needs the OpenTelemetry SDK: {_EXTRA_HINT}"
        ) from exc

    resource = Resource.create({"service.name": service_name})
    tracer_provider = TracerProvider(resource=resource)
    readers: list[MetricReader] = []
    interval_ms = export_interval_s * 1000
    bound_port: int | None = None
    stop_server: Callable[[], None] | None = None
    try:
        if otlp_endpoint:
            readers.append(_otlp(tracer_provider, otlp_endpoint, interval_ms))
        if prometheus_port is not None:
            reader, bound_port, stop_server = _prometheus(prometheus_port, prometheus_addr)
            readers.append(reader)
        if console:
            # sys.stdout now, not the exporters' default bound when they were imported.
            tracer_provider.add_span_processor(
                SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stdout))
            )
            readers.append(
                PeriodicExportingMetricReader(
                    ConsoleMetricExporter(out=sys.stdout), export_interval_millis=interval_ms
                )
            )
    except BaseException:
        tracer_provider.shutdown()  # stops the span processors' threads started so far
        raise
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    if set_global:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
        if trace.get_tracer_provider() is not tracer_provider:
            log.warning("a global TracerProvider was already set; configure() did not replace it")
    return OTelSetup(tracer_provider, meter_provider, bound_port, stop_server)


def _otlp(tracer_provider: SdkTracerProvider, endpoint: str, interval_ms: float) -> MetricReader:
    """Send spans (batched) and metrics (periodically) to an OTLP/HTTP collector."""
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ImportError(
            f"OTLP export needs opentelemetry-exporter-otlp-proto-http: {_EXTRA_HINT}"
        ) from exc
    base = endpoint.rstrip("/")
    tracer_provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces"))
    )
    return PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{base}/v1/metrics"), export_interval_millis=interval_ms
    )


def _prometheus(port: int, addr: str) -> tuple[MetricReader, int, Callable[[], None]]:
    """A Prometheus reader and its /metrics server: (reader, bound port, stop)."""
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError as exc:
        raise ImportError(
            f"Prometheus export needs opentelemetry-exporter-prometheus: {_EXTRA_HINT}"
        ) from exc
    # A registry of our own: a second configure() (tests, several apps in one process) does
    # not collide with the first or with the app's own prometheus_client metrics.
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    server, thread = start_http_server(port, addr, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return reader, int(server.server_port), stop
