"""A stream parser over a framing decoder (NDJSON lines or SSE events).

Each protocol only says how one frame becomes pieces; feeding, flushing, holding back an
error until what came before it is delivered, and the end marker are the same for all.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Sequence
from typing import Generic, Protocol, TypeVar

from .base import Piece, StreamParser
from .decoders import PendingError

__all__ = ["FramedStream"]

F = TypeVar("F")
F_co = TypeVar("F_co", covariant=True)


class _Framing(Protocol[F_co]):
    def feed(self, data: bytes) -> Sequence[F_co]: ...

    def flush(self) -> Sequence[F_co]: ...


class FramedStream(StreamParser, Generic[F]):
    """Turns frames into pieces; subclasses implement ``_piece`` and set ``_finished``."""

    def __init__(self, frames: _Framing[F], what: str) -> None:
        self._frames = frames
        self._what = what
        self._pending = PendingError()
        self._finished = False

    def feed(self, data: bytes) -> list[Piece]:
        """Pieces completed by ``data``."""
        self._pending.raise_if_set()
        return self._pending.collect(self._piece, self._frames.feed(data))

    def flush(self) -> list[Piece]:
        """End of stream: the pieces of what is left."""
        self._pending.raise_if_set()
        return self._pending.collect(self._piece, self._frames.flush())

    @property
    def finished(self) -> bool:
        """Whether the protocol's end marker was seen."""
        return self._finished

    @abstractmethod
    def _piece(self, frame: F) -> Iterable[Piece]:
        """The pieces one frame carries (raises ProtocolError/ServerError on bad frames)."""
