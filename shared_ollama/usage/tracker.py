"""UsageTracker: the CallListener that feeds the ledger and the budgets, and answers queries.

What ``client.usage`` is; the client calls ``check()`` before a call and the tracker after.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from types import TracebackType

from ..config import Budget, UsageConfig
from ..records import CallRecord
from .budget import BudgetGate
from .ledger import Ledger
from .query import SummaryRow, UsageRow, When

__all__ = ["UsageTracker"]


class UsageTracker:
    """Owns a ``Ledger`` and a ``BudgetGate``; call it with each finished ``CallRecord``."""

    def __init__(
        self,
        config: UsageConfig | None = None,
        budgets: Mapping[str, Budget] | None = None,
        *,
        ledger: Ledger | None = None,
    ) -> None:
        """Open the ledger ``config`` describes (or use ``ledger``) and set up ``budgets``."""
        config = config or UsageConfig()
        if ledger is None:
            ledger = (
                Ledger(
                    config.path,
                    batch_size=config.batch_size,
                    flush_interval_s=config.flush_interval_s,
                )
                if config.enabled
                else Ledger.disabled()
            )
        self.ledger = ledger
        self.gate = BudgetGate(budgets or {})

    def __call__(self, record: CallRecord) -> None:
        """Record a finished call: queue its ledger row, count its tokens. Never blocks."""
        self.ledger.submit(record)
        self.gate.commit(record)

    def check(self, project: str, now: float) -> None:
        """Admit one call of ``project`` at ``now`` (monotonic s) or raise ``BudgetExceeded``.

        Counts the request when it passes: call it once per call, before sending.
        """
        self.gate.admit(project, now)

    def summary(
        self,
        *,
        project: str | None = None,
        model: str | None = None,
        since: When | None = None,
        until: When | None = None,
        group_by: Sequence[str] = ("project", "model"),
    ) -> list[SummaryRow]:
        """Requests, errors, tokens and latency per group; flushes first (blocks on disk)."""
        return self.ledger.summary(
            project=project, model=model, since=since, until=until, group_by=group_by
        )

    async def asummary(
        self,
        *,
        project: str | None = None,
        model: str | None = None,
        since: When | None = None,
        until: When | None = None,
        group_by: Sequence[str] = ("project", "model"),
    ) -> list[SummaryRow]:
        """``summary`` off the event loop."""
        return await asyncio.to_thread(
            self.summary,
            project=project,
            model=model,
            since=since,
            until=until,
            group_by=group_by,
        )

    def rows(
        self,
        *,
        project: str | None = None,
        model: str | None = None,
        since: When | None = None,
        until: When | None = None,
        limit: int | None = None,
    ) -> list[UsageRow]:
        """The raw ledger rows, oldest first; flushes first."""
        return self.ledger.rows(project=project, model=model, since=since, until=until, limit=limit)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record so far is in the ledger; False on timeout."""
        return self.ledger.flush(timeout)

    async def aflush(self) -> bool:
        """``flush`` off the event loop (bound it with ``asyncio.timeout``)."""
        return await asyncio.to_thread(self.ledger.flush)

    def close(self) -> None:
        """Flush and close the ledger (idempotent)."""
        self.ledger.close()

    async def aclose(self) -> None:
        """``close`` off the event loop."""
        await asyncio.to_thread(self.ledger.close)

    def __enter__(self) -> UsageTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
