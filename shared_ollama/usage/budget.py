"""Per-project budgets: sliding windows of requests and tokens, checked before a call is sent.

In-process by default: every method takes ``now`` (monotonic seconds); one lock makes it
thread-safe. Tokens are the servers' own counts, added when a call's record arrives. With a
``LimitStore`` (``usage.limits``: SQLite or PostgreSQL) the windows live in the store instead and
hold across processes and hosts, with token reservations settled when each call ends.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import Budget, UsageConfig
from ..errors import BudgetExceeded
from ..records import CallRecord
from .limits import Admission, LimitStore, limits_location, open_limits

if TYPE_CHECKING:
    from .ledger import Ledger

__all__ = ["DEFAULT_PROJECT_KEY", "BudgetGate"]

#: A budget under this key applies to every project without its own (each project
#: gets its own windows).
DEFAULT_PROJECT_KEY = "*"

_MINUTE = 60.0
_DAY = 86400.0
#: The day window keeps one bucket per minute (at most 1440 entries per project) instead of
#: one entry per call; a bucket's tokens expire when its last second does.
_DAY_BUCKET_S = 60.0


class _Window:
    """Amounts in a sliding window of ``span`` seconds, in buckets of ``bucket`` seconds.

    ``bucket == 0`` keeps each timestamp exactly. An amount added at ``t`` counts until
    ``bucket_start(t) + bucket + span``: never less than ``span`` seconds, so the limit holds.
    """

    __slots__ = ("_entries", "_total", "bucket", "span")

    def __init__(self, span: float, bucket: float = 0.0) -> None:
        self.span = span
        self.bucket = bucket
        self._entries: deque[list[float]] = deque()  # [expires_at, amount], oldest first
        self._total = 0.0

    def add(self, now: float, amount: float) -> None:
        if amount <= 0:
            return
        if self.bucket:
            expires = math.floor(now / self.bucket) * self.bucket + self.bucket + self.span
        else:
            expires = now + self.span
        # Records may arrive slightly out of order (calls end in any order); keep the
        # deque sorted by merging into an equal or later tail entry.
        if self._entries and self._entries[-1][0] >= expires:
            self._entries[-1][1] += amount
        else:
            self._entries.append([expires, amount])
        self._total += amount

    def used(self, now: float) -> float:
        while self._entries and self._entries[0][0] <= now:
            self._total -= self._entries.popleft()[1]
        if not self._entries:
            self._total = 0.0  # no float drift once the window is empty
        return self._total

    def resets_in(self, now: float, limit: float) -> float:
        """Seconds until ``used`` drops below ``limit`` (0 if it already is)."""
        remaining = self.used(now)
        if remaining < limit:
            return 0.0
        for expires, amount in self._entries:
            remaining -= amount
            if remaining < limit:
                return expires - now
        return 0.0  # unreachable: an empty window is below any positive limit


@dataclass(slots=True)
class _ProjectWindows:
    requests: _Window = field(default_factory=lambda: _Window(_MINUTE))
    tokens_minute: _Window = field(default_factory=lambda: _Window(_MINUTE))
    tokens_day: _Window = field(default_factory=lambda: _Window(_DAY, _DAY_BUCKET_S))


class BudgetGate:
    """Enforces ``Budget``s per project: requests/min, tokens/min, tokens/day.

    ``check`` raises ``BudgetExceeded`` when a limit is already used up; ``admit`` does the
    same and, when it passes, counts the request (atomically); ``commit`` adds a finished
    call's tokens. A budget under ``"*"`` applies to projects without their own.

    With ``limits`` (a shared ``LimitStore``) the counts live there, read on the ``clock``
    (wall-clock seconds, the same on every host), and ``admit`` also reserves the call's tokens
    until ``commit`` settles them; without budgets nothing is done per call either way.
    """

    def __init__(
        self,
        budgets: Mapping[str, Budget],
        *,
        limits: LimitStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._budgets = dict(budgets)
        self._windows: dict[str, _ProjectWindows] = {}
        self._lock = threading.Lock()
        self.limits = limits
        self._clock = clock
        self._admitted: dict[str, Admission] = {}  # request id -> its open reservation

    @classmethod
    def for_usage(
        cls, budgets: Mapping[str, Budget], usage: UsageConfig, ledger: Ledger | None = None
    ) -> BudgetGate:
        """Shared through the ledger's location (``usage.path``, else ``$SHARED_OLLAMA_LEDGER``,
        else the per-user default) when there are budgets and a ledger that persists; else
        in-process (no ledger, ``":memory:"``, or a default file that could not be opened).
        Opens no connection yet."""
        if not budgets or not usage.enabled or (ledger is not None and not ledger.persisted):
            return cls(budgets)
        location = limits_location(usage.path)
        if ledger is not None and ledger.backend == "sqlite" and ledger.path:
            location = limits_location(ledger.path)  # beside the file actually open
        return cls(budgets, limits=open_limits(location) if location else None)

    def budget_for(self, project: str) -> Budget | None:
        """The budget that applies to ``project``, if any."""
        return self._budgets.get(project) or self._budgets.get(DEFAULT_PROJECT_KEY)

    def check(self, project: str, now: float) -> None:
        """Raise ``BudgetExceeded`` if a limit of ``project`` is used up at ``now``."""
        budget = self.budget_for(project)
        if budget is None:
            return
        if self.limits is not None:
            self.limits.check(project, budget, self._clock())
            return
        with self._lock:
            self._check(project, budget, self._windows_of(project), now)

    def admit(
        self,
        project: str,
        now: float,
        *,
        request_id: str | None = None,
        prompt_tokens: int = 0,
        max_tokens: int | None = None,
    ) -> None:
        """``check``, then count one request against ``project`` (one call, not one attempt).

        A shared store also reserves ``prompt_tokens`` plus ``max_tokens`` (or the budget's
        ``reserve_tokens``), settled by the ``commit`` of the record with ``request_id``.
        """
        budget = self.budget_for(project)
        if budget is None:
            return
        if self.limits is not None:
            output = max_tokens if max_tokens is not None else budget.reserve_tokens
            admission = self.limits.admit(project, budget, prompt_tokens + output, self._clock())
            if request_id is not None and admission.reserved:
                with self._lock:
                    self._admitted[request_id] = admission
            return
        with self._lock:
            windows = self._windows_of(project)
            self._check(project, budget, windows, now)
            if budget.requests_per_minute is not None:
                windows.requests.add(now, 1)

    def commit(self, record: CallRecord) -> None:
        """Count the tokens the server reported for a finished call (success or not)."""
        budget = self.budget_for(record.project)
        if budget is None:
            return
        tokens = (record.input_tokens or 0) + (record.output_tokens or 0)
        if self.limits is not None:
            with self._lock:
                admission = self._admitted.pop(record.request_id, None)
            if admission is not None:
                self.limits.settle(admission, tokens)
            return
        if tokens <= 0:
            return
        now = (record.t_end_ns or record.t_start_ns) / 1e9
        with self._lock:
            windows = self._windows_of(record.project)
            if budget.tokens_per_minute is not None:
                windows.tokens_minute.add(now, tokens)
            if budget.tokens_per_day is not None:
                windows.tokens_day.add(now, tokens)

    def usage(self, project: str, now: float) -> dict[str, int]:
        """What ``project`` has used in each window at ``now`` (for status displays).

        Shared: read from the store at the gate's clock, reservations in flight included.
        """
        if self.limits is not None:
            return self.limits.usage(project, self._clock())
        with self._lock:
            windows = self._windows_of(project)
            return {
                "requests_per_minute": int(windows.requests.used(now)),
                "tokens_per_minute": int(windows.tokens_minute.used(now)),
                "tokens_per_day": int(windows.tokens_day.used(now)),
            }

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every settlement so far reached the shared store; False on timeout."""
        return True if self.limits is None else self.limits.flush(timeout)

    def close(self) -> None:
        """Apply pending settlements and close the shared store, if any (idempotent)."""
        if self.limits is not None:
            self.limits.close()

    def _windows_of(self, project: str) -> _ProjectWindows:
        windows = self._windows.get(project)
        if windows is None:
            windows = self._windows[project] = _ProjectWindows()
        return windows

    @staticmethod
    def _check(project: str, budget: Budget, windows: _ProjectWindows, now: float) -> None:
        limits = (
            ("requests_per_minute", budget.requests_per_minute, windows.requests),
            ("tokens_per_minute", budget.tokens_per_minute, windows.tokens_minute),
            ("tokens_per_day", budget.tokens_per_day, windows.tokens_day),
        )
        for name, limit, window in limits:
            if limit is None:
                continue
            used = window.used(now)
            if used >= limit:
                resets_in = window.resets_in(now, limit)
                raise BudgetExceeded(
                    f"project {project!r} used {int(used)} of its {name} limit {limit}; "
                    f"resets in {resets_in:.1f}s",
                    project=project,
                    limit=name,
                    resets_in=resets_in,
                )
