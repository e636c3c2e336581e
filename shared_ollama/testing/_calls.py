"""Count the function calls a piece of work makes, in every thread: a deterministic cost.

Timings vary from run to run and machine to machine; the number of Python and C function
calls a request makes does not (much), so tests can guard it. ``sys.setprofile`` sees the
calling thread only and ``threading.setprofile`` only threads started after it, so install
the counter (``CallCounter.install()``) *before* starting the client whose background
threads (the usage ledger's writer) should be counted, then count windows of work with
``with counter.counting():``.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["CallCounter"]


class CallCounter:
    """Counts ``call`` and ``c_call`` profile events (as cProfile's "function calls" does)
    while a ``counting()`` window is open, in this thread and every thread started after
    ``install()``; ``by_module`` says whose functions they were."""

    def __init__(self, *, by_module: bool = False) -> None:
        self.calls = 0
        self.by_module: Counter[str] = Counter()
        self._detail = by_module
        self._on = False
        self._installed = False
        self._lock = threading.Lock()

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if not self._on or (event != "call" and event != "c_call"):
            return
        with self._lock:  # several threads may count at once
            self.calls += 1
            if self._detail:
                if event == "call":
                    module = frame.f_globals.get("__name__", "?")
                else:
                    module = getattr(arg, "__module__", None) or "builtins"
                self.by_module[str(module).split(".")[0]] += 1

    def install(self) -> None:
        """Profile this thread and every thread started from now on."""
        if not self._installed:
            self._installed = True
            threading.setprofile(self._profile)
            sys.setprofile(self._profile)

    def uninstall(self) -> None:
        """Stop profiling (threads already running keep the hook but count nothing)."""
        self._on = False
        if self._installed:
            self._installed = False
            sys.setprofile(None)
            threading.setprofile(None)

    @contextmanager
    def counting(self) -> Iterator[CallCounter]:
        """Count the calls made inside the block (``calls`` is reset first)."""
        self.install()
        with self._lock:
            self.calls = 0
            self.by_module.clear()
        self._on = True
        try:
            yield self
        finally:
            self._on = False
