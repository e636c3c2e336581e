"""Per-project usage on /metrics: real calls to a FakeEngine, scraped over real HTTP and
parsed with prometheus-client's parser; totals checked against the engine and the ledger."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared_ollama import (
    ConfigError,
    Endpoint,
    HealthPolicy,
    RetryPolicy,
    ServerError,
    SyncSharedClient,
    UsageConfig,
)
from shared_ollama.config import load_config
from shared_ollama.testing import FakeEngine
from shared_ollama.usage.prometheus import (
    OTHER,
    LedgerCollector,
    UsageMetrics,
    exporter,
    serve,
    stop_exporters,
)
from shared_ollama.usage.schema import clean_url
from tests.conftest import FAST

MODEL = "fake-llama"
MSG = [{"role": "user", "content": "how many tokens is this"}]
SECRET = "sk-prom-DO-NOT-LEAK-91c3"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[str, Samples]:
    """The exposition text and its samples by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def by(samples: Samples, name: str, label: str) -> dict[str, float]:
    """``name``'s samples summed per value of ``label``."""
    out: dict[str, float] = defaultdict(float)
    for (n, labels), value in samples.items():
        if n == name:
            out[dict(labels)[label]] += value
    return dict(out)


@pytest.fixture
def oai() -> Iterator[FakeEngine]:
    with FakeEngine(kind="openai", models=(MODEL,), timing=FAST) as eng:
        yield eng


@pytest.fixture
def exporters() -> Iterator[None]:
    yield
    stop_exporters()


def _client(eng: FakeEngine, **kw: object) -> SyncSharedClient:
    return SyncSharedClient(
        endpoints=[Endpoint(eng.url, kind="openai", api_key=SECRET)],
        health=HealthPolicy(enabled=False),
        retry=RetryPolicy(max_attempts=1),
        **kw,  # type: ignore[arg-type]
    )


def test_two_projects_scraped_equal_the_engine_and_the_ledger(
    oai: FakeEngine, tmp_path: Path, exporters: None
) -> None:
    db = tmp_path / "usage.sqlite3"
    usage = UsageConfig(path=str(db), prometheus_port=0)
    with _client(oai, project="alpha", usage=usage) as client:
        for _ in range(3):
            client.chat(model=MODEL, messages=MSG, options={"num_predict": 4})
        for _ in range(2):
            client.generate(model=MODEL, prompt="a b c", project="beta", options={"num_predict": 7})
        oai.faults.fail(500, times=1)
        with pytest.raises(ServerError):
            client.generate(model=MODEL, prompt="x", project="beta")
        summary = {r.project: r for r in client.usage.summary(group_by=("project",))}
    stats = oai.stats()
    _, server = exporter(0)  # the process's exporter the client subscribed to
    text, samples = scrape(server.port)

    requests = by(samples, "shared_ollama_usage_requests_total", "project")
    assert requests == {"alpha": 3, "beta": 3}
    assert by(samples, "shared_ollama_usage_requests_total", "outcome") == {"ok": 5, "error": 1}
    assert by(samples, "shared_ollama_usage_errors_total", "error_type") == {"ServerError": 1}
    tokens_out = by(samples, "shared_ollama_usage_output_tokens_total", "project")
    tokens_in = by(samples, "shared_ollama_usage_input_tokens_total", "project")
    assert tokens_out == {"alpha": 12, "beta": 14}
    assert sum(tokens_out.values()) == stats.tokens_generated
    assert sum(tokens_in.values()) == stats.prompt_tokens
    counts = by(samples, "shared_ollama_usage_request_duration_seconds_count", "project")
    assert counts == requests
    for project, row in summary.items():
        assert project is not None  # the ledger agrees, project by project
        assert (row.requests, row.errors) == (requests[project], 1 if project == "beta" else 0)
        assert (row.input_tokens, row.output_tokens) == (tokens_in[project], tokens_out[project])
    endpoints = by(samples, "shared_ollama_usage_requests_total", "endpoint")
    assert list(endpoints) == [clean_url(oai.url)]  # no credentials, no query
    assert SECRET not in text

    # The ledger's own exporter serves the same totals under its prefix.
    ledger_server = serve(LedgerCollector(db), port=0)
    try:
        ltext, lsamples = scrape(ledger_server.port)
    finally:
        ledger_server.close()
    assert lsamples[("shared_ollama_ledger_up", ())] == 1
    assert by(lsamples, "shared_ollama_ledger_requests_total", "project") == requests
    assert by(lsamples, "shared_ollama_ledger_errors_total", "project") == {"alpha": 0, "beta": 1}
    assert by(lsamples, "shared_ollama_ledger_output_tokens_total", "project") == tokens_out
    assert by(lsamples, "shared_ollama_ledger_input_tokens_total", "project") == tokens_in
    quantiles = by(lsamples, "shared_ollama_ledger_latency_seconds", "quantile")
    assert set(quantiles) == {"0.5", "0.95"} and all(v > 0 for v in quantiles.values())
    assert SECRET not in ltext


def test_project_cardinality_is_capped(oai: FakeEngine) -> None:
    metrics = UsageMetrics(max_values=3)
    projects = [f"team-{i}" for i in range(7)]
    with _client(oai, usage=UsageConfig(enabled=False), listeners=[metrics]) as client:
        for project in projects:
            client.chat(model=MODEL, messages=MSG, project=project, options={"num_predict": 2})
        client.chat(model=MODEL, messages=MSG, project="team-0", options={"num_predict": 2})
    server = serve(metrics, port=0)
    try:
        _, samples = scrape(server.port)
    finally:
        server.close()
    requests = by(samples, "shared_ollama_usage_requests_total", "project")
    # The first three keep their names; the other four are one series; nothing is lost.
    assert requests == {"team-0": 2, "team-1": 1, "team-2": 1, OTHER: 4}
    tokens = by(samples, "shared_ollama_usage_output_tokens_total", "project")
    assert sum(tokens.values()) == oai.stats().tokens_generated == 16


def test_long_project_names_are_cut() -> None:
    from tests.usage._helpers import make_record

    metrics = UsageMetrics()
    metrics(make_record("r", project="p" * 1000))
    [family, *_] = list(metrics.collect())
    [sample] = family.samples
    assert sample.labels["project"] == "p" * 128


def test_the_module_entry_point_serves_a_ledger(oai: FakeEngine, tmp_path: Path) -> None:
    db = tmp_path / "usage.sqlite3"
    with _client(oai, project="cli", usage=UsageConfig(path=str(db))) as client:
        client.chat(model=MODEL, messages=MSG, options={"num_predict": 3})
        client.usage.flush()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shared_ollama.usage.prometheus",
            "--ledger",
            str(db),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until it listens (or exits)
        assert line.startswith("serving http://127.0.0.1:"), (
            line,
            proc.stderr and proc.stderr.read(),
        )
        port = int(line.rsplit(":", 1)[1].split("/", 1)[0])
        _, samples = scrape(port)
    finally:
        proc.terminate()
        proc.wait(30)
    assert by(samples, "shared_ollama_ledger_requests_total", "project") == {"cli": 1}
    assert by(samples, "shared_ollama_ledger_output_tokens_total", "project") == {"cli": 3}


def test_a_missing_ledger_is_down_not_an_error(tmp_path: Path) -> None:
    server = serve(LedgerCollector(tmp_path / "nowhere.sqlite3"), port=0)
    try:
        _, samples = scrape(server.port)
    finally:
        server.close()
    assert samples == {("shared_ollama_ledger_up", ()): 0}


def test_port_from_env_and_bad_ports(oai: FakeEngine) -> None:
    env = {"SHARED_OLLAMA_ENDPOINTS": oai.url, "SHARED_OLLAMA_USAGE_PROMETHEUS_PORT": "9464"}
    assert load_config(env=env).usage.prometheus_port == 9464
    assert load_config(env={"SHARED_OLLAMA_ENDPOINTS": oai.url}).usage.prometheus_port is None
    with pytest.raises(ConfigError, match="prometheus_port"):
        load_config(env={**env, "SHARED_OLLAMA_USAGE_PROMETHEUS_PORT": "70000"})
    taken = serve(UsageMetrics(), port=0)
    try:
        with pytest.raises(ConfigError, match="cannot serve usage metrics"):
            serve(UsageMetrics(), port=taken.port)
    finally:
        taken.close()
