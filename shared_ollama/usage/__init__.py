"""Per-project usage: the ledger (SQLite or PostgreSQL), budgets, summaries, ``usage`` CLI.

``UsageTracker`` is what a client owns: a CallListener feeding a ``Ledger`` and a ``BudgetGate``.
"""

from .budget import DEFAULT_PROJECT_KEY, BudgetGate
from .ledger import MEMORY, Ledger, LedgerStats, default_ledger_location, default_ledger_path
from .query import GROUP_KEYS, GroupKey, Summary, SummaryRow, UsageRow, When, parse_when
from .tracker import UsageTracker

__all__ = [
    "DEFAULT_PROJECT_KEY",
    "GROUP_KEYS",
    "MEMORY",
    "BudgetGate",
    "GroupKey",
    "Ledger",
    "LedgerStats",
    "Summary",
    "SummaryRow",
    "UsageRow",
    "UsageTracker",
    "When",
    "default_ledger_location",
    "default_ledger_path",
    "parse_when",
]
