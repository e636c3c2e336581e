"""Functions run in child processes by the ledger tests (importable, so ``spawn`` works)."""

from __future__ import annotations

import threading
from multiprocessing.connection import Connection
from threading import Barrier

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
