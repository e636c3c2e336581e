"""CallRecord: the single source of truth about one call, emitted once per call.

Usage accounting, telemetry and the bench all read CallRecords; none of them re-measures.
Timestamps are ``time.monotonic_ns()`` values taken by the drivers.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator, MutableSequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, overload

__all__ = [
    "AttemptRecord",
    "CallListener",
    "CallRecord",
    "Outcome",
    "PoolEvent",
    "RoutingDecision",
    "TokenCounts",
]

Outcome: TypeAlias = Literal["ok", "error", "interrupted", "cancelled"]


def _packed_ns() -> MutableSequence[int]:
    return array("q")


class TokenCounts(MutableSequence[int | None]):
    """Tokens per streamed chunk, packed: 2 bytes a chunk (4 once a count passes 32,767),
    ``None`` (the server did not say) kept as -1. A list would cost 8 bytes a chunk, and an
    endless stream a chunk of memory each second."""

    __slots__ = ("_data",)

    def __init__(self, values: Iterable[int | None] = ()) -> None:
        self._data = array("h")
        for value in values:
            self.append(value)

    def __len__(self) -> int:
        return len(self._data)

    @overload
    def __getitem__(self, index: int) -> int | None: ...
    @overload
    def __getitem__(self, index: slice) -> list[int | None]: ...
    def __getitem__(self, index: int | slice) -> int | list[int | None] | None:
        if isinstance(index, slice):
            return [None if v < 0 else v for v in self._data[index]]
        value = self._data[index]
        return None if value < 0 else value

    def __setitem__(self, index: Any, value: Any) -> None:
        if isinstance(index, slice):
            raise TypeError("TokenCounts takes one count at a time")
        self._fit(value)
        self._data[index] = -1 if value is None else value

    def __delitem__(self, index: int | slice) -> None:
        del self._data[index]

    def insert(self, index: int, value: int | None) -> None:
        """Insert one count (None: unknown)."""
        self._fit(value)
        self._data.insert(index, -1 if value is None else value)

    def append(self, value: int | None) -> None:
        """Add the next chunk's count (None: unknown)."""
        self._fit(value)
        self._data.append(-1 if value is None else value)

    def _fit(self, value: int | None) -> None:
        if value is not None and value > 32767 and self._data.typecode == "h":
            self._data = array("i", self._data)

    def __iter__(self) -> Iterator[int | None]:
        return (None if v < 0 else v for v in self._data)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TokenCounts | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TokenCounts({list(self)!r})"


@dataclass(slots=True)
class AttemptRecord:
    """One try of a call against one endpoint."""

    endpoint: str
    t_start_ns: int
    t_end_ns: int = 0
    status_code: int | None = None
    error_type: str | None = None
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class PoolEvent:
    """Something the pool did: a breaker changing state, an endpoint going up or down."""

    kind: Literal["breaker", "health"]
    endpoint: str
    old: str
    new: str
    t_ns: int


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """Why the call's (last) attempt went where it went.

    ``reason`` is one of ``affinity`` (the key's own ring endpoint), ``spill`` (the key's
    endpoint was over its load bound, or could not take calls: the next one on the ring),
    ``least_loaded``, ``loaded_model`` (least loaded won because it has the model in memory),
    ``round_robin``, ``weighted``, ``priority``, ``only_candidate`` and ``failover`` (a retry
    that avoided the endpoints already tried). ``key`` is a short hash of the routing key,
    never the key.
    """

    endpoint: str
    reason: str
    candidates: tuple[str, ...] = ()
    key: str | None = None


@dataclass(slots=True)
class CallRecord:
    """Everything known about one call once it has ended (successfully or not)."""

    request_id: str
    project: str
    operation: str
    model: str | None
    stream: bool
    t_start_ns: int
    t_end_ns: int = 0
    t_first_chunk_ns: int | None = None
    #: Arrival of the last chunk that carried content (a token, thinking, a tool call): a
    #: stream's generation ends there, before the server's closing events.
    t_last_token_ns: int | None = None
    served_model: str | None = None
    endpoint: str | None = None
    endpoint_name: str | None = None
    protocol: str | None = None
    outcome: Outcome = "ok"
    error_type: str | None = None
    error_message: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None
    attempts: list[AttemptRecord] = field(default_factory=list)
    #: Arrival time of each chunk delivered to the caller (streams only): a packed
    #: ``array('q')``, 8 bytes a chunk, so an endless stream does not cost an int object each.
    chunk_times_ns: MutableSequence[int] = field(default_factory=_packed_ns)
    #: Tokens carried by each chunk, where the server said; None where unknown (packed).
    chunk_tokens: MutableSequence[int | None] = field(default_factory=TokenCounts)
    #: The server's own timings (see ``types.ServerTimings``), by field name.
    server_timings: dict[str, float] = field(default_factory=dict)
    #: Pool events caused by this call (breaker transitions).
    events: list[PoolEvent] = field(default_factory=list)
    #: Free-form tags (the bench marks its workload/phase here).
    tags: dict[str, str] = field(default_factory=dict)
    #: Prompt tokens the server took from its prompt cache, where it says (OpenAI's
    #: ``usage.prompt_tokens_details.cached_tokens``, llama.cpp's ``timings.cache_n``).
    cached_tokens: int | None = None
    #: Where the router sent the call and why (None: the call was never routed).
    routing: RoutingDecision | None = None

    @property
    def duration_s(self) -> float:
        """End-to-end seconds, retries and waits included."""
        return (self.t_end_ns - self.t_start_ns) / 1e9

    @property
    def ttft_s(self) -> float | None:
        """Seconds to the first chunk (stream) or the first body byte, if one came."""
        if self.t_first_chunk_ns is None:
            return None
        return (self.t_first_chunk_ns - self.t_start_ns) / 1e9

    @property
    def ok(self) -> bool:
        """True when the call succeeded."""
        return self.outcome == "ok"

    @property
    def retries(self) -> int:
        """Attempts beyond the first."""
        return max(0, len(self.attempts) - 1)


CallListener: TypeAlias = Callable[[CallRecord], None]
