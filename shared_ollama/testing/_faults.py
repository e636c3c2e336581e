"""Fault knobs of a FakeEngine: armed from any thread, taken one per request by the server.
Only bookkeeping lives here; the HTTP layer carries the faults out."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

__all__ = ["Fault", "FaultAction", "Faults"]

FaultAction = Literal["fail", "delay_first_byte", "reset", "malformed", "truncate"]


@dataclass(frozen=True)
class Fault:
    """One armed fault: what to do, to which requests, and how many more times."""

    action: FaultAction
    times: int = 1
    path: str | None = None
    status: int = 0
    retry_after: float | None = None
    message: str | None = None
    seconds: float = 0.0
    after_chunks: int = 0

    def matches(self, path: str, inference: bool) -> bool:
        """Requests it applies to: ``path`` prefix when given, else every inference request."""
        return path.startswith(self.path) if self.path is not None else inference


class Faults:
    """Faults armed on a FakeEngine; thread-safe, changeable while the engine runs.

    Each request takes at most one fault: the oldest armed one that matches it. A fault with
    ``path=None`` matches inference requests only (chat, generate, completions, embeddings),
    so health probes and model listings never consume it; give ``path`` (a URL path prefix)
    to aim at any route, e.g. ``path="/api/tags"`` or ``path="/"`` for all of them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: list[Fault] = []

    def fail(
        self,
        status: int,
        times: int = 1,
        *,
        retry_after: float | None = None,
        message: str | None = None,
        path: str | None = None,
    ) -> None:
        """Answer ``status`` with the engine's own error body (+ ``Retry-After`` if given)."""
        if not 400 <= status <= 599:
            raise ValueError("fail() needs an HTTP error status (400-599)")
        self._arm(
            Fault("fail", times, path, status=status, retry_after=retry_after, message=message)
        )

    def delay_first_byte(self, seconds: float, times: int = 1, *, path: str | None = None) -> None:
        """Wait ``seconds`` before handling the request, so before any response byte."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        self._arm(Fault("delay_first_byte", times, path, seconds=seconds))

    def reset(self, times: int = 1, *, path: str | None = None) -> None:
        """Abort the TCP connection with an RST before sending any byte."""
        self._arm(Fault("reset", times, path))

    def malformed(self, times: int = 1, *, path: str | None = None) -> None:
        """Reply 200 with a body that is not JSON, or put an invalid line after the first chunk."""
        self._arm(Fault("malformed", times, path))

    def truncate(self, after_chunks: int, times: int = 1, *, path: str | None = None) -> None:
        """Send ``after_chunks`` stream chunks, then close the connection mid-body.

        No final chunk follows (no ``done``, no ``[DONE]``, no end of the chunked body); a
        non-streaming reply is cut in the middle of its body instead.
        """
        if after_chunks < 0:
            raise ValueError("after_chunks must be >= 0")
        self._arm(Fault("truncate", times, path, after_chunks=after_chunks))

    def clear(self) -> None:
        """Disarm every fault."""
        with self._lock:
            self._armed.clear()

    def pending(self) -> list[Fault]:
        """The armed faults, oldest first, each with the number of uses left in ``times``."""
        with self._lock:
            return list(self._armed)

    def take(self, path: str, *, inference: bool) -> Fault | None:
        """Consume one use of the oldest fault matching this request (server side)."""
        with self._lock:
            for i, fault in enumerate(self._armed):
                if fault.matches(path, inference):
                    if fault.times > 1:
                        self._armed[i] = replace(fault, times=fault.times - 1)
                    else:
                        del self._armed[i]
                    return fault
        return None

    def apply(self, spec: Mapping[str, Any]) -> None:
        """Arm from a JSON object such as ``{"action": "fail", "status": 503, "times": 2}``."""
        params = dict(spec)
        action = params.pop("action", None)
        if action == "clear":
            self.clear()
            return
        if action not in ("fail", "delay_first_byte", "reset", "malformed", "truncate"):
            raise ValueError(f"unknown fault action: {action!r}")
        getattr(self, action)(**params)

    def _arm(self, fault: Fault) -> None:
        if fault.times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._armed.append(fault)
