"""Functions run in child processes by the ledger tests (importable, so ``spawn`` works)."""

from __future__ import annotations

import sqlite3
import threading
import time
from multiprocessing.connection import Connection
from threading import Barrier
from typing import Any

from shared_ollama.usage import Ledger

from ._helpers import make_record


def write_from_threads(
    path: str, tag: str, threads: int, per_thread: int, start: Barrier | None = None
) -> None:
    """Several threads of one process submit to one Ledger; close() flushes."""
    if start is not None:
        start.wait()  # every process opens the (new) file at the same moment
    ledger = Ledger(path, batch_size=64, flush_interval_s=0.05)

    def work(t: int) -> None:
        for i in range(per_thread):
            ledger.submit(make_record(f"{tag}-{t}-{i}"))

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    ledger.close()


def write_until_killed(path: str, conn: Connection, batch: int) -> None:
    """Commit batch after batch, reporting each committed total, until SIGKILL arrives."""
    ledger = Ledger(path, batch_size=batch, flush_interval_s=60.0)
    n = 0
    while True:
        for _ in range(batch):
            ledger.submit(make_record(f"k-{n}"))
            n += 1
        ledger.flush()
        conn.send(n)


def paced_until_killed(
    target: str, tag: str, rate: float, times: Any, kill_at: int, conn: Connection
) -> None:
    """Submit ``{tag}-{i:09d}`` at ``rate`` per second into a default-settings ledger, noting
    each submit's wall time in the shared array ``times`` (it survives SIGKILL); tell the
    parent once ``kill_at`` records are submitted, then keep going until killed."""
    ledger = Ledger(target)
    t0 = time.perf_counter()
    for i in range(len(times)):
        # Pacing the load generator (not synchronisation): catch up when late.
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        times[i] = time.time()
        ledger.submit(make_record(f"{tag}-{i:09d}", project=tag))
        if i + 1 == kill_at:
            conn.send(kill_at)
    conn.send(-1)  # out of room: the parent never killed us


def hold_write_lock(path: str, conn: Connection) -> None:
    """Hold SQLite's write lock on ``path`` (``BEGIN EXCLUSIVE``) until told to let go."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    conn.send("locked")
    conn.recv()
    db.execute("COMMIT")
    db.close()
    conn.send("released")


def client_until_killed(
    target: str, port: int, rate: float, times: Any, kill_at: int, conn: Connection
) -> None:
    """Like ``paced_until_killed`` through ``SyncSharedClient`` (default ledger settings)
    against the instant server: call ``i`` carries tag ``i``, its end goes to ``times[i]``."""
    from shared_ollama import Endpoint, HealthPolicy, SyncSharedClient, UsageConfig
    from shared_ollama.testing.instant import MESSAGES, MODEL

    client = SyncSharedClient(
        endpoints=[Endpoint(f"http://127.0.0.1:{port}", kind="ollama")],
        project="client-kill",
        health=HealthPolicy(enabled=False),
        usage=UsageConfig(path=target),
    )
    t0 = time.perf_counter()
    for i in range(len(times)):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        client.chat(model=MODEL, messages=MESSAGES, options={"num_predict": 1}, tags={"i": str(i)})
        times[i] = time.time()
        if i + 1 == kill_at:
            conn.send(kill_at)
    conn.send(-1)
