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
from .query import Summary, UsageRow, When

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
                    max_queue=config.max_queue,
                )
                if config.enabled
                else Ledger.disabled()
            )
        self.ledger = ledger
        # Shared across processes through the ledger's location (see usage.limits).
        self.gate = BudgetGate.for_usage(budgets or {}, config, ledger)
        #: Budgets are checked in a shared store (a database round trip per call): the
        #: clients run the check off the event loop.
        self.shared = self.gate.limits is not None

    def __call__(self, record: CallRecord) -> None:
        """Record a finished call: queue its ledger row, count its tokens. Never blocks."""
        self.ledger.submit(record)
        self.gate.commit(record)

    def check(
        self,
        project: str,
        now: float,
        *,
        request_id: str | None = None,
        prompt_tokens: int = 0,
        max_tokens: int | None = None,
    ) -> None:
        """Admit one call of ``project`` at ``now`` (monotonic s) or raise ``BudgetExceeded``.

        Counts the request when it passes: call it once per call, before sending. A shared
        budget also reserves the call's tokens until the record with ``request_id`` arrives.
        """
        self.gate.admit(
            project, now, request_id=request_id, prompt_tokens=prompt_tokens, max_tokens=max_tokens
        )

    def summary(
        self,
        *,
        project: str | None = None,
        model: str | None = None,
        since: When | None = None,
        until: When | None = None,
        group_by: Sequence[str] = ("project", "model"),
    ) -> Summary:
        """Requests, errors, tokens and latency per group; flushes first (blocks on disk).

        A list of ``SummaryRow``; ``.persisted`` and ``.dropped`` say whether it is complete.
        """
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
    ) -> Summary:
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
        """Wait until every record so far is in the ledger; False on timeout, or when records
        were dropped since the previous flush (see ``Ledger.flush``)."""
        return self.ledger.flush(timeout)

    async def aflush(self) -> bool:
        """``flush`` off the event loop (bound it with ``asyncio.timeout``)."""
        return await asyncio.to_thread(self.ledger.flush)

    def close(self) -> None:
        """Flush and close the ledger and the shared budgets (idempotent)."""
        self.ledger.close()
        self.gate.close()

    async def aclose(self) -> None:
        """``close`` off the event loop."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> UsageTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
