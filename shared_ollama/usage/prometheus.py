"""Per-project usage for Prometheus to scrape: no database needed to aggregate a fleet.

Two sources, two metric prefixes (so one Prometheus can scrape both without double counts):

* ``UsageMetrics`` (``shared_ollama_usage_*``): a CallListener counting this process's calls,
  served on ``/metrics`` by ``serve()`` or by a client whose ``UsageConfig.prometheus_port``
  (or ``$SHARED_OLLAMA_USAGE_PROMETHEUS_PORT``) is set. Prometheus sums the hosts.
* ``LedgerCollector`` (``shared_ollama_ledger_*``): the totals in a usage ledger, read at
  each scrape; ``python -m shared_ollama.usage.prometheus --port 9464`` serves them.

Labels are ``project``, ``model`` and ``endpoint`` (the URL without credentials or query).
Project and model names are chosen by callers, so each label keeps at most ``max_values``
distinct values (100 by default); later ones are counted under ``"_other"``, and values are
cut to 128 characters. Needs ``prometheus-client`` (the ``otel`` extra); imported lazily.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..errors import ConfigError
from ..records import CallRecord
from .ledger import default_ledger_path
from .query import query_summary
from .schema import clean_url

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "OTHER",
    "LedgerCollector",
    "UsageMetrics",
    "UsageServer",
    "exporter",
    "main",
    "serve",
]

#: The label value that stands for every value past the cap.
OTHER = "_other"
_MAX_LEN = 128
_HINT = "pip install 'shared-ollama[otel]'"
#: Latency buckets (s): the GenAI semantic conventions' advice, as the OTel histograms use.
BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96,
           81.92)  # fmt: skip
_LABELS = ("project", "model", "endpoint")


def _prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core  # the metric families; not imported by the package
    except ImportError as exc:
        raise ImportError(f"Prometheus usage export needs prometheus-client: {_HINT}") from exc
    return prometheus_client


class _Cap:
    """Keeps a label's distinct values bounded: the first ``limit`` pass, the rest fold."""

    __slots__ = ("limit", "seen")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        value = (value or "")[:_MAX_LEN]
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(value)
        return value


class _Series:
    """The counts of one (project, model, endpoint)."""

    __slots__ = ("buckets", "duration_sum", "errors", "input_tokens", "outcomes",
                 "output_tokens")  # fmt: skip

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.input_tokens = 0
        self.output_tokens = 0
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.duration_sum = 0.0

    def copy(self) -> _Series:
        out = _Series()
        out.outcomes, out.errors = dict(self.outcomes), dict(self.errors)
        out.input_tokens, out.output_tokens = self.input_tokens, self.output_tokens
        out.buckets, out.duration_sum = list(self.buckets), self.duration_sum
        return out


class UsageMetrics:
    """Per-project request, error, token and latency counters, fed by finished calls.

    A CallListener (``client.add_listener(metrics)``) and a prometheus-client collector
    (``registry.register(metrics)``). Exposes ``shared_ollama_usage_requests_total``
    (by ``outcome``), ``..._errors_total`` (by ``error_type``), ``..._input_tokens_total``,
    ``..._output_tokens_total`` and the ``..._request_duration_seconds`` histogram.
    """

    def __init__(self, *, max_values: int = 100) -> None:
        if max_values < 1:
            raise ConfigError("max_values must be at least 1")
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str, str], _Series] = {}
        self._projects = _Cap(max_values)
        self._models = _Cap(max_values)
        self._endpoints = _Cap(max_values)
        # Error types are our error classes' names, but a listener must not trust that.
        self._error_types = _Cap(max_values)

    def __call__(self, record: CallRecord) -> None:
        """Count one finished call (cheap: runs inline after every call)."""
        with self._lock:
            key = (
                self._projects(record.project),
                self._models(record.model),
                self._endpoints(clean_url(record.endpoint)),
            )
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series()
            series.outcomes[record.outcome] = series.outcomes.get(record.outcome, 0) + 1
            if not record.ok and record.outcome != "cancelled":
                error = self._error_types(record.error_type or record.outcome)
                series.errors[error] = series.errors.get(error, 0) + 1
            series.input_tokens += record.input_tokens or 0
            series.output_tokens += record.output_tokens or 0
            duration = record.duration_s
            series.buckets[bisect_left(BUCKETS, duration)] += 1
            series.duration_sum += duration

    record = __call__

    def collect(self) -> Iterator[Any]:
        """The metric families, for prometheus-client."""
        core = _prometheus().core
        with self._lock:  # a consistent snapshot; the copies are small
            rows = [(key, series.copy()) for key, series in self._series.items()]
        prefix = "shared_ollama_usage"
        requests = core.CounterMetricFamily(
            f"{prefix}_requests", "Calls by outcome.", labels=[*_LABELS, "outcome"]
        )
        errors = core.CounterMetricFamily(
            f"{prefix}_errors",
            "Calls that failed (cancelled ones are not errors).",
            labels=[*_LABELS, "error_type"],
        )
        tokens_in = core.CounterMetricFamily(
            f"{prefix}_input_tokens", "Input (prompt) tokens the servers counted.", labels=_LABELS
        )
        tokens_out = core.CounterMetricFamily(
            f"{prefix}_output_tokens", "Output tokens the servers counted.", labels=_LABELS
        )
        duration = core.HistogramMetricFamily(
            f"{prefix}_request_duration_seconds",
            "End-to-end call duration, retries included.",
            labels=_LABELS,
            unit="seconds",
        )
        for key, series in rows:
            labels = list(key)
            for outcome, n in sorted(series.outcomes.items()):
                requests.add_metric([*labels, outcome], n)
            for error, n in sorted(series.errors.items()):
                errors.add_metric([*labels, error], n)
            tokens_in.add_metric(labels, series.input_tokens)
            tokens_out.add_metric(labels, series.output_tokens)
            cumulative: list[tuple[str, float]] = []
            running = 0
            for bound, n in zip((*map(str, BUCKETS), "+Inf"), series.buckets, strict=True):
                running += n
                cumulative.append((bound, running))
            duration.add_metric(labels, cumulative, series.duration_sum)
        yield from (requests, errors, tokens_in, tokens_out, duration)

    def describe(self) -> Iterable[Any]:
        """Nothing up front: the families are built at each scrape."""
        return ()


class LedgerCollector:
    """The totals of a SQLite usage ledger, per project, model and endpoint, read (read-only)
    at each scrape: ``shared_ollama_ledger_requests_total``, ``..._errors_total``,
    ``..._retries_total``, ``..._input_tokens_total``, ``..._output_tokens_total`` and the
    ``..._latency_seconds`` gauge (``quantile`` 0.5 and 0.95 of successful calls)."""

    def __init__(self, path: str | Path | None = None, *, max_values: int = 100) -> None:
        self.path = Path(path) if path else default_ledger_path()
        self.max_values = max_values

    def collect(self) -> Iterator[Any]:
        """The metric families, for prometheus-client."""
        core = _prometheus().core
        prefix = "shared_ollama_ledger"
        up = core.GaugeMetricFamily(f"{prefix}_up", "1 when the ledger could be read.")
        try:
            conn = sqlite3.connect(f"file:{quote(str(self.path))}?mode=ro", uri=True, timeout=5.0)
            try:
                rows = query_summary(conn, now=time.time(), group_by=_LABELS)
            finally:
                conn.close()
        except sqlite3.Error:  # missing or locked: say so, never fail the scrape
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        caps = {name: _Cap(self.max_values) for name in _LABELS}
        totals: dict[tuple[str, ...], list[int]] = {}
        latency: dict[tuple[str, ...], tuple[float | None, float | None]] = {}
        for row in rows:
            key = tuple(
                caps[name](clean_url(v) if name == "endpoint" else v)
                for name, v in zip(_LABELS, (row.project, row.model, row.endpoint), strict=True)
            )
            acc = totals.setdefault(key, [0, 0, 0, 0, 0])
            for i, n in enumerate(
                (row.requests, row.errors, row.retries, row.input_tokens, row.output_tokens)
            ):
                acc[i] += n
            # Percentiles do not add up: a folded (_other) group reports none.
            latency[key] = (None, None) if OTHER in key else (row.p50_ms, row.p95_ms)
        names = ("requests", "errors", "retries", "input_tokens", "output_tokens")
        families = [
            core.CounterMetricFamily(f"{prefix}_{n}", f"Ledger total of {n}.", labels=_LABELS)
            for n in names
        ]
        quantiles = core.GaugeMetricFamily(
            f"{prefix}_latency_seconds",
            "Latency percentiles of successful calls over the whole ledger.",
            labels=[*_LABELS, "quantile"],
        )
        for key, acc in totals.items():
            for family, n in zip(families, acc, strict=True):
                family.add_metric(list(key), n)
            for q, ms in zip(("0.5", "0.95"), latency[key], strict=True):
                if ms is not None:
                    quantiles.add_metric([*key, q], ms / 1000)
        yield from (*families, quantiles)

    def describe(self) -> Iterable[Any]:
        """Nothing up front: the families are built at each scrape."""
        return ()


class UsageServer:
    """A running ``/metrics`` HTTP server; ``close()`` stops it (idempotent)."""

    def __init__(self, server: Any, thread: threading.Thread, registry: CollectorRegistry):
        self._server = server
        self._thread = thread
        #: The registry it serves.
        self.registry = registry
        #: The port it listens on (the real one when 0 was asked).
        self.port = int(server.server_port)
        self._closed = False

    def close(self) -> None:
        """Stop serving and free the port."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def serve(
    *collectors: UsageMetrics | LedgerCollector, port: int, addr: str = "127.0.0.1"
) -> UsageServer:
    """Serve ``collectors`` on ``http://addr:port/metrics`` from a daemon thread.

    A registry of its own: nothing else of the process's prometheus-client metrics leaks
    in, and two servers do not collide. ``addr`` defaults to loopback; use ``0.0.0.0`` for
    a Prometheus on another host. ``port=0`` takes a free port (see ``.port``).
    """
    prometheus_client = _prometheus()
    registry = prometheus_client.CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    try:
        server, thread = prometheus_client.start_http_server(port, addr, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve usage metrics on {addr}:{port}: {exc}") from None
    return UsageServer(server, thread, registry)


_exporters_lock = threading.Lock()
_exporters: dict[tuple[str, int], tuple[UsageMetrics, UsageServer]] = {}


def exporter(port: int, addr: str = "127.0.0.1") -> tuple[UsageMetrics, UsageServer]:
    """The process's ``UsageMetrics`` served on ``addr:port``, started on first use.

    What a client with ``UsageConfig.prometheus_port`` subscribes to: every client of the
    process with the same port shares one ``/metrics``, as Prometheus expects of a process.
    """
    with _exporters_lock:
        found = _exporters.get((addr, port))
        if found is None:
            metrics = UsageMetrics()
            found = _exporters[(addr, port)] = (metrics, serve(metrics, port=port, addr=addr))
        return found


def stop_exporters() -> None:
    """Stop every server ``exporter()`` started (tests; a process may also just exit)."""
    with _exporters_lock:
        running = list(_exporters.values())
        _exporters.clear()
    for _, server in running:
        server.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m shared_ollama.usage.prometheus",
        description="Serve the usage ledger's per-project totals on /metrics for Prometheus.",
    )
    p.add_argument("--ledger", metavar="PATH", help="ledger file (default: per-user data dir)")
    p.add_argument("--port", type=int, default=9464, help="port to listen on (default 9464)")
    p.add_argument("--addr", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--max-values", type=int, default=100, help="distinct values per label")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a ledger until interrupted; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: argparse already printed why
        return int(exc.code or 0)
    try:
        server = serve(
            LedgerCollector(args.ledger, max_values=args.max_values),
            port=args.port,
            addr=args.addr,
        )
    except (ConfigError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"serving http://{args.addr}:{server.port}/metrics", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
