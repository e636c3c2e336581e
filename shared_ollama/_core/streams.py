"""One streamed reply as the drivers see it: bytes in, deliverable pieces out.

Holds back the piece that ends the generation until the stream closes, because OpenAI
servers send usage in a later event; a stream that closes without the protocol's end
marker is truncated and raises ``ProtocolError``.
"""

from __future__ import annotations

from ..errors import ProtocolError
from ..protocols import Piece, StreamParser
from .plan import CallPlan

__all__ = ["StreamState"]


class StreamState:
    """Feeds a protocol's stream parser and decides what reaches the caller, and when."""

    def __init__(self, plan: CallPlan, parser: StreamParser) -> None:
        self.plan = plan
        self.parser = parser
        self._held: Piece | None = None

    def feed(self, data: bytes, now_ns: int) -> list[Piece]:
        """Pieces ready to deliver after ``data`` arrived."""
        return self._route(self.parser.feed(data), now_ns)

    def end(self, now_ns: int) -> list[Piece]:
        """The connection closed: the last pieces, or ProtocolError if it was cut short."""
        out = self._route(self.parser.flush(), now_ns)
        if not self.parser.finished:
            raise ProtocolError(
                "stream ended before its end marker (truncated)",
                endpoint=self.plan.record.endpoint,
                model=self.plan.model,
            )
        if self._held is not None:
            out.append(self._held)
            self._held = None
        return out

    def _route(self, pieces: list[Piece], now_ns: int) -> list[Piece]:
        out: list[Piece] = []
        for piece in pieces:
            if not self.plan.on_piece(piece, now_ns):
                continue
            if piece.done:
                self._held = piece
            else:
                out.append(piece)
        return out
