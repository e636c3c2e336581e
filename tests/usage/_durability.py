"""Parent side of the kill -9 tests, for either backend: how much a crash lost, and how old."""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass

from shared_ollama.usage import Ledger

from . import _workers

#: The call rate the durability promise is stated for.
RATE = 1000.0


@dataclass(frozen=True)
class Kill:
    """One kill -9 run."""

    submitted: int
    lost: int
    #: Seconds between the oldest lost record's submit and the kill (0 when none was lost).
    oldest_lost_age_s: float


def kill_window(target: str, tag: str, kill_at: int, rate: float = RATE) -> Kill:
    """Run a child submitting at ``rate`` into ``target``, SIGKILL it once it submitted
    ``kill_at`` records, and compare what it submitted with what the ledger kept."""
    ctx = multiprocessing.get_context("spawn")
    times = ctx.Array("d", kill_at + int(rate) * 10, lock=False)
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=_workers.paced_until_killed, args=(target, tag, rate, times, kill_at, sender)
    )
    child.start()
    sender.close()
    try:
        reached = receiver.recv()
        t_kill = time.time()
        child.kill()
    finally:
        child.join()
    assert reached == kill_at, "the child stopped before it was killed"
    assert child.exitcode == -9
    submitted = sum(1 for t in times if t > 0)
    with Ledger(target) as ledger:
        ids = {r.request_id for r in ledger.rows(project=tag)}
    # The writer commits in submit order, so what survived is a prefix of what was sent.
    assert ids == {f"{tag}-{i:09d}" for i in range(len(ids))}, "a gap in the committed records"
    lost = submitted - len(ids)
    return Kill(submitted, lost, t_kill - times[len(ids)] if lost else 0.0)
