"""The SQLite ledger: counts under concurrency, duplicates, crashes, busy files, migrations."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import threading
from pathlib import Path

import pytest

from shared_ollama.config import UsageConfig
from shared_ollama.errors import ConfigError
from shared_ollama.usage import Ledger, UsageTracker, default_ledger_path
from shared_ollama.usage.schema import SCHEMA_VERSION

from . import _workers
from ._helpers import API_KEY, MS, make_record


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "ledger" / "usage.sqlite3")


def _count(path: str) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0])


def test_threads_row_count_equals_submitted(db: str) -> None:
    ledger = Ledger(db, batch_size=100)
    threads, per_thread = 8, 1000

    def work(t: int) -> None:
        for i in range(per_thread):
            ledger.submit(make_record(f"t{t}-{i}"))

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert ledger.flush()
    assert ledger.count() == threads * per_thread
    assert ledger.dropped == 0
    ledger.close()
    assert _count(db) == threads * per_thread


def test_processes_and_threads_share_one_file(db: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs, threads, per_thread = 4, 3, 500
    start = ctx.Barrier(procs + 1)
    children = [
        ctx.Process(
            target=_workers.write_from_threads, args=(db, f"p{p}", threads, per_thread, start)
        )
        for p in range(procs)
    ]
    for child in children:
        child.start()
    # The parent creates the file together with the children and writes too, so that
    # five processes migrate and then contend for one new file at once.
    start.wait()
    parent = Ledger(db, batch_size=50, flush_interval_s=0.01)
    for i in range(2000):
        parent.submit(make_record(f"parent-{i}"))
    for child in children:
        child.join()
        assert child.exitcode == 0
    parent.close()
    assert parent.dropped == 0
    assert _count(db) == procs * threads * per_thread + 2000


def test_request_id_duplicates_are_counted_once(db: str) -> None:
    ledger = Ledger(db)
    record = make_record("same-id")
    ledger.submit(record)
    ledger.submit(record)  # same batch
    ledger.flush()
    ledger.submit(make_record("same-id", input_tokens=999))  # a later batch
    ledger.submit(make_record("other-id"))
    ledger.close()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT request_id, input_tokens FROM calls ORDER BY id").fetchall()
    assert rows == [("same-id", 10), ("other-id", 10)]


def test_sigkill_mid_write_leaves_a_sound_ledger(db: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_workers.write_until_killed, args=(db, sender, 2000))
    child.start()
    sender.close()
    committed = 0
    for _ in range(5):  # the child keeps writing the next batch while we read
        committed = receiver.recv()
    child.kill()  # SIGKILL
    child.join()
    assert child.exitcode == -9
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        found = conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    assert found >= committed
    # Whole batches only: a batch is one transaction.
    assert found % 2000 == 0
    # The file is still writable after the crash.
    with Ledger(db) as again:
        again.submit(make_record("after-crash"))
    assert _count(db) == found + 1


def test_busy_file_is_retried_and_submit_does_not_block(db: str) -> None:
    ledger = Ledger(db, busy_timeout_s=0.01, flush_interval_s=0.01)
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
    try:
        for i in range(1000):
            ledger.submit(make_record(f"b{i}"))  # returns although the file is locked
        assert ledger.flush(timeout=0) is False
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    assert ledger.flush()
    assert ledger.count() == 1000
    assert ledger.dropped == 0
    ledger.close()


def test_close_on_a_locked_file_gives_up_within_its_bound_and_counts_the_loss(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holds the write lock through the close: the close retries the queued
    batch for one busy wait and one retry (2 x ``busy_timeout_s``), not its 20 retries
    (~20 busy waits and 14 s of backoff), then drops the batch, counted and logged."""
    ledger = Ledger(db, busy_timeout_s=0.2, flush_interval_s=60)
    writes = 0
    write = ledger._backend.write  # type: ignore[union-attr]

    def counted(*args: object) -> None:
        nonlocal writes
        writes += 1
        write(*args)  # type: ignore[arg-type]

    ledger._backend.write = counted  # type: ignore[method-assign,union-attr]
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # held until the close has returned
    try:
        for i in range(10):
            ledger.submit(make_record(f"c{i}"))
        with caplog.at_level("ERROR", logger="shared_ollama.usage"):
            ledger.close()
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    assert 1 <= writes <= 3, writes
    assert ledger.dropped == 10
    assert "dropped 10 records" in caplog.text


async def test_submit_from_event_loop(db: str) -> None:
    ledger = Ledger(db)
    for i in range(100):
        ledger.submit(make_record(f"a{i}"))
        await asyncio.sleep(0)
    tracker = UsageTracker(ledger=ledger)
    assert await tracker.aflush()
    assert ledger.count() == 100
    await tracker.aclose()


def test_close_flushes_pending_and_is_idempotent(db: str) -> None:
    ledger = Ledger(db, batch_size=10_000, flush_interval_s=3600)
    for i in range(123):
        ledger.submit(make_record(f"c{i}"))
    ledger.close()
    ledger.close()
    assert _count(db) == 123
    ledger.submit(make_record("late"))  # dropped (and counted), never raises
    assert ledger.dropped == 1
    assert ledger.flush() is False  # the late record was lost, and flush says so
    assert ledger.flush() is True  # nothing lost since


def test_wal_mode_and_schema_version(db: str) -> None:
    Ledger(db).close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_newer_schema_is_refused(db: str) -> None:
    Ledger(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigError, match="newer"):
        Ledger(db)


def test_unopenable_path_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot open usage ledger"):
        Ledger(tmp_path / "file" / "usage.sqlite3")


def test_row_contents(db: str) -> None:
    t0 = 1_800_000_000 * 1_000_000_000
    record = make_record(
        "r1",
        t_start_ns=t0,
        duration_ms=250,
        ttft_ms=40,
        attempts=2,
        stream=True,
        endpoint=f"http://user:{API_KEY}@gpu-b:8000/v1?api_key={API_KEY}",
        protocol="openai",
        served_model="meta-llama/Llama-3.2-3B-Instruct",
        finish_reason="stop",
        endpoint_name="gpu-b",
        server_timings={"load_duration_ns": 5e6, "eval_duration_ns": 2e8, "queue_time_ms": 3.0},
        tags={"phase": "warmup"},
        error_message=f"bad key {API_KEY}",
    )
    ledger = Ledger(db, epoch_offset_ns=0)
    ledger.submit(record)
    [row] = ledger.rows()
    ledger.close()
    assert row.ts == 1_800_000_000.0
    assert row.ts_end == pytest.approx(1_800_000_000.25)
    assert row.duration_ms == pytest.approx(250)
    assert row.ttft_ms == pytest.approx(40)
    assert row.attempts == 2
    assert row.stream is True
    assert row.endpoint == "http://gpu-b:8000/v1"
    assert row.endpoint_name == "gpu-b"
    assert (row.model, row.served_model) == ("llama3.2", "meta-llama/Llama-3.2-3B-Instruct")
    assert (row.server_load_ms, row.server_eval_ms, row.server_queue_ms) == (5.0, 200.0, 3.0)
    assert row.server_timings["eval_duration_ns"] == 2e8
    assert row.tags == {"phase": "warmup"}
    assert row.finish_reason == "stop"
    # The key appears in neither the row nor anywhere in the file.
    assert API_KEY not in row.model_dump_json()
    assert API_KEY.encode() not in Path(db).read_bytes()


def test_monotonic_to_epoch_offset_is_applied(db: str) -> None:
    ledger = Ledger(db, epoch_offset_ns=10 * 1_000_000_000)
    ledger.submit(make_record("o", t_start_ns=5 * 1_000_000_000))
    [row] = ledger.rows()
    ledger.close()
    assert row.ts == 15.0


def test_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SHARED_OLLAMA_LEDGER", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_ledger_path() == tmp_path / "xdg" / "shared_ollama" / "usage.sqlite3"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_ledger_path() == Path.home() / ".local/share/shared_ollama/usage.sqlite3"
    monkeypatch.setenv("SHARED_OLLAMA_LEDGER", str(tmp_path / "mine.db"))
    assert default_ledger_path() == tmp_path / "mine.db"
    with UsageTracker(UsageConfig()) as tracker:
        assert tracker.ledger.path == str(tmp_path / "mine.db")
    assert (tmp_path / "mine.db").exists()


def test_disabled_ledger_writes_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHARED_OLLAMA_LEDGER", str(tmp_path / "never.db"))
    with UsageTracker(UsageConfig(enabled=False)) as tracker:
        tracker(make_record("x"))
        assert tracker.flush()
        assert tracker.summary() == []
        assert tracker.rows() == []
        assert not tracker.ledger.enabled
    assert not (tmp_path / "never.db").exists()


def test_memory_ledger() -> None:
    with Ledger(":memory:") as ledger:
        for i in range(10):
            ledger.submit(make_record(f"m{i}", t_start_ns=i * MS))
        assert [r.requests for r in ledger.summary()] == [10]
        assert ledger.count() == 10


def test_the_writer_is_not_woken_per_record(db: str) -> None:
    """Submitting only enqueues: the writer wakes on its timer, a full batch or a flush, so
    2,000 quick submits cost it a handful of turns, not one hand-off of the GIL each."""
    ledger = Ledger(db, batch_size=500, flush_interval_s=60)
    writer = ledger._writer
    assert writer is not None
    before = writer.turns
    for i in range(2000):
        ledger.submit(make_record(f"quick-{i}"))
    assert ledger.flush()
    assert ledger.count() == 2000
    assert writer.turns - before <= 6, writer.turns - before
    ledger.close()
