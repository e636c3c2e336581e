"""Drive a stream parser the way a network would: the same bytes, cut anywhere."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from shared_ollama.protocols import Piece, StreamParser


def run(parser: StreamParser, chunks: Iterable[bytes]) -> tuple[list[Piece], bool]:
    """Feed every chunk, then flush: the pieces and whether the end marker was seen."""
    out: list[Piece] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    out += parser.flush()
    return out, parser.finished


def pieces_anywhere(make: Callable[[], StreamParser], data: bytes) -> tuple[list[Piece], bool]:
    """Decode ``data`` in one chunk, split at every byte position and byte by byte.

    Asserts that every way of cutting gives the very same pieces; returns them.
    """
    whole = run(make(), [data])
    for cut in range(len(data) + 1):
        assert run(make(), [data[:cut], data[cut:]]) == whole, f"split at byte {cut}"
    assert run(make(), [data[i : i + 1] for i in range(len(data))]) == whole, "byte by byte"
    return whole
