"""The PostgreSQL ledger against a real server the suite starts (``tests/postgres_server.py``):
exact counts from several processes, the kill -9 window, migrations, the same summary and
``usage`` output as SQLite for the same calls, and no password in any output."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from shared_ollama.config import UsageConfig
from shared_ollama.errors import ConfigError
from shared_ollama.records import RoutingDecision
from shared_ollama.usage import Ledger, UsageTracker
from shared_ollama.usage.cli import usage_main
from shared_ollama.usage.schema import PG_MIGRATIONS, SCHEMA_VERSION
from tests.instant_server import start_server

from ._durability import kill_window
from ._helpers import MS, make_record

pytestmark = pytest.mark.postgres

T0 = 1_800_000_000 * 1_000_000_000


def _connect(url: str) -> Any:
    # Imported here: without psycopg the `postgres_*` fixtures skip, or fail under CI=true.
    import psycopg

    return psycopg.connect(url, autocommit=True)


def _count(url: str) -> int:
    with _connect(url) as conn:
        row = conn.execute("SELECT COUNT(*) FROM calls").fetchone()
        assert row is not None
        return int(row[0])


def test_four_processes_of_5000_calls_give_exactly_20000_rows(
    postgres_db: str, postgres_server: Any
) -> None:
    """Through ``SyncSharedClient`` (4 threads per process) against the instant server."""
    script = textwrap.dedent("""
        import sys
        from concurrent.futures import ThreadPoolExecutor
        from shared_ollama import Endpoint, HealthPolicy, SyncSharedClient, UsageConfig
        from shared_ollama.testing.instant import MESSAGES, MODEL
        port, url, tag = sys.argv[1:4]
        ep = Endpoint(f"http://127.0.0.1:{port}", kind="ollama")
        with SyncSharedClient(endpoints=[ep], project=tag, health=HealthPolicy(enabled=False),
                              usage=UsageConfig(path=url)) as c:
            def call(i):
                c.chat(model=MODEL, messages=MESSAGES, options={"num_predict": 1})
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(call, range(5000)))
            assert c.usage.flush(), "records were dropped"
            print(c.usage.ledger, c.usage.ledger.stats())
    """)
    with ExitStack() as stack:
        port = start_server(stack)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(port), postgres_db, f"p{i}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(4)
        ]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    assert _count(postgres_db) == 20_000
    with Ledger(postgres_db) as ledger:
        summary = ledger.summary(group_by=("project",))
    assert [(r.project, r.requests, r.errors) for r in summary] == [
        (f"p{i}", 5000, 0) for i in range(4)
    ]
    for out in outputs:
        assert "dropped=0" in out
        assert postgres_server.password not in out


def test_kill9_loses_at_most_the_flush_window(postgres_db: str) -> None:
    kills = [kill_window(postgres_db, f"pk{run}", kill_at=1500 + 211 * run) for run in range(3)]
    promise_s = UsageConfig().flush_interval_s + 0.1  # the documented window
    for k in kills:
        assert k.oldest_lost_age_s <= promise_s, kills
    with Ledger(postgres_db) as ledger:  # reopens and writes after the crashes
        ledger.submit(make_record("after-crash"))
        assert ledger.flush()
        assert [r.request_id for r in ledger.rows(project="search")] == ["after-crash"]


def _records() -> list[Any]:
    """Calls of several projects, models, outcomes, days and hours, with new fields set."""
    out = []
    for i in range(240):
        rec = make_record(
            f"same-{i}",
            project=("search", "chat", "Batch", "émoji")[i % 4],
            model=(None, "llama3.2", "qwen")[i % 3],
            t_start_ns=T0 + i * 1_200 * 1_000_000_000,  # 20 min apart: several hours and days
            duration_ms=50.0 + (i * 37) % 400,
            ttft_ms=None if i % 5 == 0 else 5.0 + i % 9,
            outcome=("ok", "ok", "ok", "error", "cancelled", "interrupted")[i % 6],
            error_type="Timeout" if i % 6 == 3 else None,
            attempts=1 + i % 3,
            input_tokens=None if i % 7 == 0 else 10 + i,
            stream=i % 2 == 0,
            tags={"workload": f"w{i % 2}"},
            cached_tokens=i % 4 or None,
            routing=RoutingDecision(endpoint="http://gpu-a:11434", reason="least_loaded"),
        )
        out.append(rec)
    return out


GROUPINGS = ["project,model", "day", "hour", "none", "outcome,error_type", "protocol,endpoint"]


def test_cli_and_api_give_the_same_summary_on_both_backends(
    postgres_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], postgres_server: Any
) -> None:
    sqlite_path = str(tmp_path / "usage.sqlite3")
    for target in (sqlite_path, postgres_db):
        with Ledger(target, epoch_offset_ns=0) as ledger:
            for rec in _records():
                ledger.submit(rec)
            assert ledger.flush()
    with Ledger(sqlite_path) as lite, Ledger(postgres_db) as pg:
        assert lite.backend == "sqlite" and pg.backend == "postgresql"
        rows = lite.rows()
        assert rows == pg.rows()
        assert {r.route_reason for r in rows} == {"least_loaded"}
        assert {r.cached_tokens for r in rows} == {None, 1, 2, 3}
        for group in GROUPINGS:
            keys = () if group == "none" else tuple(group.split(","))
            assert lite.summary(group_by=keys) == pg.summary(group_by=keys), group
        since, until = T0 / 1e9 + 86_400, T0 / 1e9 + 2 * 86_400
        assert lite.summary(since=since, until=until) == pg.summary(since=since, until=until)
    for group in GROUPINGS:
        for fmt in ([], ["--json"], ["--csv"]):
            outs = []
            for target in (sqlite_path, postgres_db):
                assert usage_main(["--ledger", target, "--group-by", group, *fmt]) == 0
                outs.append(capsys.readouterr().out)
            assert outs[0] == outs[1], (group, fmt)
            assert postgres_server.password not in outs[1]
            if fmt == ["--json"]:
                assert sum(r["requests"] for r in json.loads(outs[1])) == 240


def test_cli_reads_the_url_from_the_environment_without_printing_the_password(
    postgres_db: str, postgres_server: Any
) -> None:
    with Ledger(postgres_db) as ledger:
        ledger.submit(make_record("env-1"))
    env = {**os.environ, "SHARED_OLLAMA_LEDGER": postgres_db}
    ok = subprocess.run(
        [sys.executable, "-m", "shared_ollama.usage", "--group-by", "project"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "search" in ok.stdout
    wrong = postgres_db.replace(postgres_server.password, "not-the-password")
    bad = subprocess.run(
        [sys.executable, "-m", "shared_ollama.usage", "--ledger", wrong],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1
    assert "password authentication failed" in bad.stderr
    assert "Traceback" not in bad.stderr
    for text in (ok.stdout, ok.stderr, bad.stdout, bad.stderr):
        assert postgres_server.password not in text
        assert "not-the-password" not in text


def test_no_password_in_reprs_errors_or_logs(
    postgres_db: str, postgres_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    secret = postgres_server.password
    caplog.set_level(logging.DEBUG, "shared_ollama")
    with UsageTracker(ledger=Ledger(postgres_db)) as tracker:
        ledger = tracker.ledger
        shown = [repr(ledger), str(ledger.path), repr(ledger.stats()), repr(tracker.summary())]
        assert "***" in ledger.path if ledger.path else False
    wrong = postgres_db.replace(secret, secret[::-1])
    with pytest.raises(ConfigError) as info:
        Ledger(wrong)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    shown += [str(info.value), repr(info.value)]
    shown += [r.getMessage() for r in caplog.records]
    for text in shown:
        assert secret not in text
        assert secret[::-1] not in text


def test_schema_is_versioned_and_migrated_forward(postgres_db: str) -> None:
    # A database written by version 1 of the schema, with one row.
    with _connect(postgres_db) as conn:
        for statement in PG_MIGRATIONS[0].split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("CREATE TABLE shared_ollama_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO shared_ollama_schema VALUES (1)")
        conn.execute(
            "INSERT INTO calls (request_id, ts, ts_end, project, operation, stream, outcome,"
            " attempts, duration_ms) VALUES ('old', 1, 2, 'legacy', 'chat', 0, 'ok', 1, 1000)"
        )
    with Ledger(postgres_db) as ledger:
        ledger.submit(make_record("new", cached_tokens=7, t_start_ns=T0 + 5 * MS))
        rows = {r.request_id: r for r in ledger.rows()}
    assert rows["old"].cached_tokens is None and rows["old"].duration_ms == 1000
    assert rows["new"].cached_tokens == 7
    with _connect(postgres_db) as conn:
        row = conn.execute("SELECT version FROM shared_ollama_schema").fetchone()
        assert row == (SCHEMA_VERSION,)
        conn.execute("UPDATE shared_ollama_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match="newer than this library"):
        Ledger(postgres_db)
