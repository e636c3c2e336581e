"""The ledger keeps its word, over real processes: the kill -9 loss window, a second writer
holding the lock (bounded queue, counted overflow, callers never blocked), a full volume."""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from shared_ollama.config import UsageConfig
from shared_ollama.usage import Ledger
from tests.instant_server import start_server

from . import _workers
from ._durability import RATE, kill_window
from ._helpers import make_record

#: The documented promise: a crash loses no call that finished more than the flush interval
#: (plus 100 ms for the write itself) before it.
PROMISE_S = UsageConfig().flush_interval_s + 0.1


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "usage.sqlite3")


def test_kill9_loses_at_most_the_flush_window(db: str) -> None:
    """Four kills at 1,000 calls/s, each at a different phase of the writer's timer."""
    kills = [kill_window(db, f"k{run}", kill_at=1500 + 137 * run) for run in range(4)]
    for k in kills:
        assert k.submitted >= 1500
        assert k.oldest_lost_age_s <= PROMISE_S, (kills, PROMISE_S)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_kill9_through_the_client_loses_at_most_the_flush_window(db: str) -> None:
    """The same promise for calls finished by ``SyncSharedClient`` (its hot path shares the
    GIL with the writer), against the instant server at 1,000 calls/s."""
    ctx = multiprocessing.get_context("spawn")
    with ExitStack() as stack:
        port = start_server(stack)
        for run in range(2):
            kill_at = 1500 + 173 * run
            times = ctx.Array("d", kill_at + 10_000, lock=False)
            receiver, sender = ctx.Pipe(duplex=False)
            child = ctx.Process(
                target=_workers.client_until_killed,
                args=(db, port, RATE, times, kill_at, sender),
            )
            child.start()
            sender.close()
            try:
                assert receiver.recv() == kill_at
                t_kill = time.time()
                child.kill()
            finally:
                child.join()
            finished = {i for i, t in enumerate(times) if t > 0}
            with Ledger(db) as ledger:
                rows = ledger.rows(project="client-kill")
            kept = {int(r.tags["i"]) for r in rows}
            lost = finished - kept
            oldest = t_kill - min(times[i] for i in lost) if lost else 0.0
            assert len(finished) >= kill_at
            assert oldest <= PROMISE_S, (run, len(lost), oldest)
            with sqlite3.connect(db) as conn:  # the next run starts from an empty table
                conn.execute("DELETE FROM calls")


def test_a_second_writer_holding_the_lock_bounds_the_queue(db: str) -> None:
    ledger = Ledger(db, batch_size=100, max_queue=1000, flush_interval_s=0.05, busy_timeout_s=0.05)
    ledger.submit(make_record("before"))
    assert ledger.flush()
    ctx = multiprocessing.get_context("spawn")
    parent, child_end = ctx.Pipe()
    holder = ctx.Process(target=_workers.hold_write_lock, args=(db, child_end))
    holder.start()
    try:
        assert parent.recv() == "locked"
        for i in range(5000):
            ledger.submit(make_record(f"locked-{i}"))  # every one returns: never blocked
        during = ledger.stats()
        # The lock is still held (we have not told the holder yet), so none of those
        # submits waited for it.
        probe = sqlite3.connect(db, timeout=0, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            probe.execute("BEGIN IMMEDIATE")
        probe.close()
        assert ledger.flush(timeout=0) is False
    finally:
        parent.send("release")
        assert parent.recv() == "released"
        holder.join()
    # Bounded: the queue plus the one batch the writer holds while it waits.
    assert during.pending <= 1000 + 1
    assert during.overflowed >= 5000 - 1000 - 100
    assert ledger.flush() is False  # the overflow is reported once ...
    assert ledger.flush() is True  # ... and nothing was lost since
    stats = ledger.stats()
    assert stats.dropped == stats.overflowed == during.overflowed
    assert stats.failed == 0
    summary = ledger.summary(group_by=())
    assert summary.dropped == stats.overflowed
    assert not summary.complete
    assert summary.persisted
    # Exactly what was accepted is there; the oldest records were kept.
    assert summary[0].requests == 1 + 5000 - stats.overflowed == ledger.count()
    kept = {r.request_id for r in ledger.rows()}
    assert {f"locked-{i}" for i in range(1000)} <= kept
    ledger.close()


@contextlib.contextmanager
def _tiny_volume(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {done.stderr}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(path: Path) -> None:
    """Write ``path`` until the volume is full."""
    chunk = b"\0" * 65536
    with path.open("wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk = chunk[: len(chunk) // 2]
                if not chunk:
                    return


def test_a_full_volume_recovers_once_space_is_freed(tmp_path: Path) -> None:
    with _tiny_volume(tmp_path / "vol", "2m") as vol:
        db = vol / "usage.sqlite3"
        ledger = Ledger(str(db), batch_size=200, flush_interval_s=0.05)
        ledger.submit(make_record("first"))
        assert ledger.flush()
        ballast = vol / "ballast"
        _fill(ballast)
        for i in range(3000):
            ledger.submit(make_record(f"full-{i}", tags={"pad": "x" * 200}))
        assert ledger.flush() is False  # writes failed, and flush says so
        failed = ledger.stats().failed
        assert failed > 0
        assert ledger.summary(group_by=()).dropped == failed
        ballast.unlink()  # space is back
        for i in range(1000):
            ledger.submit(make_record(f"after-{i}", tags={"pad": "x" * 200}))
        assert ledger.flush() is True  # the ledger writes again
        assert ledger.stats().failed == failed
        after = {r.request_id for r in ledger.rows() if r.request_id.startswith("after-")}
        assert len(after) == 1000
        ledger.close()
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # The WAL was checkpointed and cut back, not left at its largest.
        wal = Path(f"{db}-wal")
        assert not wal.exists() or wal.stat().st_size <= 4 * 1024 * 1024
        assert os.statvfs(vol).f_bfree > 0
