"""Per-project usage: the SQLite ledger, budgets, summaries and the ``usage`` command.

``UsageTracker`` is what a client owns: a CallListener feeding a ``Ledger`` and a ``BudgetGate``.
"""

from .budget import DEFAULT_PROJECT_KEY, BudgetGate
from .ledger import MEMORY, Ledger, default_ledger_path
from .query import GROUP_KEYS, GroupKey, SummaryRow, UsageRow, When, parse_when
from .tracker import UsageTracker

__all__ = [
    "DEFAULT_PROJECT_KEY",
    "GROUP_KEYS",
    "MEMORY",
    "BudgetGate",
    "GroupKey",
    "Ledger",
    "SummaryRow",
    "UsageRow",
    "UsageTracker",
    "When",
    "default_ledger_path",
    "parse_when",
]
