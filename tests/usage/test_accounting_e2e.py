"""Accounting through the real clients over real HTTP: ledger, budgets and telemetry."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared_ollama import (
    Budget,
    BudgetExceeded,
    Endpoint,
    HealthPolicy,
    ModelNotFound,
    RetryPolicy,
    SharedClient,
    SyncSharedClient,
    UsageConfig,
)
from shared_ollama.telemetry import Telemetry
from shared_ollama.testing import FakeEngine
from tests.conftest import FAST

MODEL = "fake-llama"
MSG = [{"role": "user", "content": "count me in"}]
SECRET = "sk-ledger-secret"


def quick(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "health": HealthPolicy(enabled=False),
        "retry": RetryPolicy(backoff_initial_s=0.001, backoff_max_s=0.01),
    }
    base.update(kw)
    return base


def test_ledger_rows_equal_calls_from_threads_and_processes(tmp_path: Path) -> None:
    db = tmp_path / "usage.sqlite3"
    with FakeEngine(kind="openai", models=(MODEL,), timing=FAST, slots=16) as eng:
        ep = Endpoint(eng.url, kind="openai", api_key=SECRET)
        script = textwrap.dedent(f"""
            from shared_ollama import Endpoint, HealthPolicy, SyncSharedClient, UsageConfig
            ep = Endpoint({eng.url!r}, kind="openai", api_key={SECRET!r})
            off = HealthPolicy(enabled=False)
            with SyncSharedClient(endpoints=[ep], project="proc", health=off,
                                  usage=UsageConfig(path={str(db)!r})) as c:
                for i in range(300):
                    c.generate(model={MODEL!r}, prompt="p " + str(i), options={{"num_predict": 2}})
        """)
        procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(2)]
        with SyncSharedClient(
            endpoints=[ep], project="threads", **quick(usage=UsageConfig(path=str(db)))
        ) as client:

            def call(i: int) -> None:
                client.chat(model=MODEL, messages=MSG, options={"num_predict": 3})

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(call, range(1600)))
            with pytest.raises(ModelNotFound):
                client.chat(model="nope", messages=MSG)  # failures are rows too
            summary = client.usage.summary(group_by=("project",))
        assert [p.wait(120) for p in procs] == [0, 0]
    conn = sqlite3.connect(db)
    counts = dict(conn.execute("SELECT project, count(*) FROM calls GROUP BY project").fetchall())
    assert counts == {"threads": 1601, "proc": 600}
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    dump = "\n".join(str(row) for row in conn.iterdump())
    assert SECRET not in dump
    threads = next(r for r in summary if r.project == "threads")
    assert threads.requests == 1601 and threads.errors == 1
    assert threads.output_tokens == 1600 * 3  # the server's own counts


async def test_budget_rejects_before_sending() -> None:
    budgets = {"tight": Budget(requests_per_minute=3)}
    with FakeEngine(kind="ollama", models=(MODEL,), timing=FAST) as eng:
        async with SharedClient(
            endpoints=[Endpoint(eng.url, kind="ollama")],
            project="tight",
            budgets=budgets,
            **quick(usage=UsageConfig(enabled=False)),
        ) as client:
            for _ in range(3):
                await client.chat(model=MODEL, messages=MSG)
            sent = eng.stats().total_requests
            with pytest.raises(BudgetExceeded) as err:
                await client.chat(model=MODEL, messages=MSG)
            assert eng.stats().total_requests == sent  # nothing was sent
            assert err.value.limit == "requests_per_minute" and err.value.project == "tight"
            assert err.value.resets_in is not None and 0 < err.value.resets_in <= 60
            # Another project has its own (unlimited) budget.
            await client.chat(model=MODEL, messages=MSG, project="free")


async def test_telemetry_from_real_calls() -> None:
    spans = InMemorySpanExporter()
    tracer = TracerProvider()
    tracer.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(
        tracer_provider=tracer, meter_provider=MeterProvider(metric_readers=[reader])
    )
    with FakeEngine(kind="tgi", models=(MODEL,), timing=FAST) as eng:
        async with SharedClient(
            endpoints=[Endpoint(eng.url, kind="tgi")],
            project="otel",
            telemetry=telemetry,
            **quick(usage=UsageConfig(enabled=False)),
        ) as client:
            await client.generate(model=MODEL, prompt="a b", options={"num_predict": 5})
            eng.faults.fail(500, times=1)
            await client.generate(model=MODEL, prompt="a b", options={"num_predict": 5})
            stream = await client.generate(
                model=MODEL, prompt="a b", stream=True, options={"num_predict": 5}
            )
            chunks = [c async for c in stream]
            eng.faults.fail(422, message="bad input")
            with pytest.raises(Exception, match="bad input"):
                await client.generate(model=MODEL, prompt="a b")
    assert chunks[-1].done
    got = spans.get_finished_spans()
    assert [s.name for s in got] == ["text_completion fake-llama"] * 4
    ok, retried, streamed, failed = (dict(s.attributes or {}) for s in got)
    assert ok["gen_ai.usage.output_tokens"] == 5 and ok["gen_ai.provider.name"] == "tgi"
    assert ok["shared_ollama.project"] == "otel" and ok["shared_ollama.attempts"] == 1
    assert retried["shared_ollama.attempts"] == 2
    assert streamed["gen_ai.usage.output_tokens"] == 5
    assert failed["error.type"] == "InvalidRequest"
    names = {
        m.name: m
        for rm in reader.get_metrics_data().resource_metrics  # type: ignore[union-attr]
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert names["gen_ai.client.operation.duration"].unit == "s"
    ttft = names["gen_ai.client.operation.time_to_first_chunk"].data.data_points  # type: ignore[union-attr]
    assert sum(p.count for p in ttft) == 1  # only the streaming call
    per_chunk = names["gen_ai.client.operation.time_per_output_chunk"].data.data_points  # type: ignore[union-attr]
    assert sum(p.count for p in per_chunk) == len(chunks) - 1
