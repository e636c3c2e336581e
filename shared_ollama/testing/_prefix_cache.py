"""The FakeEngine's prompt (prefix) cache: blocks of prompt tokens kept per engine, LRU evicted.

Modelled on vLLM's automatic prefix caching: a prompt is cut into blocks of ``block``
tokens; each full block is keyed by its tokens and everything before it (a hash chain), so
a block hits only when the whole prefix up to its end is cached. Pure and synchronous: the
runtime calls it from its event loop, never from two threads at once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CacheHit", "PrefixCache"]


@dataclass(frozen=True, slots=True)
class CacheHit:
    """One lookup: prompt tokens served from the cache, and tokens evicted to make room."""

    cached: int
    evicted: int


class PrefixCache:
    """Full blocks of recent prompts, at most ``capacity // block`` of them, LRU evicted."""

    def __init__(self) -> None:
        # block key -> None; the order is the eviction order (first: least recently used).
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        """Blocks held."""
        return len(self._blocks)

    def clear(self) -> None:
        """Forget every block."""
        self._blocks.clear()

    def lookup(self, model: str, ids: Sequence[int], capacity: int, block: int) -> CacheHit:
        """Serve ``ids`` (a prompt's token ids): how many leading tokens hit, then keep the
        prompt's full blocks as the most recently used. ``capacity`` in tokens; 0: off.

        As on vLLM, the last prompt token is always computed (its logits start the
        output), so a block ending on it never counts as a hit.
        """
        if capacity <= 0 or block < 1:
            if self._blocks:
                self._blocks.clear()
            return CacheHit(0, 0)
        keys = _block_keys(model, ids, block)
        hits = 0
        for key in keys[: (len(ids) - 1) // block]:
            if key not in self._blocks:
                break
            hits += 1
        # Touched deepest first, so the prompt's first block is the most recent: eviction
        # trims cached prompts from their tail, keeping the prefixes others share.
        for key in reversed(keys):
            self._blocks[key] = None
            self._blocks.move_to_end(key)
        evicted = 0
        limit = capacity // block
        while len(self._blocks) > limit:
            self._blocks.popitem(last=False)
            evicted += 1
        return CacheHit(hits * block, evicted * block)


def _block_keys(model: str, ids: Sequence[int], block: int) -> list[int]:
    """A chained key per full block: block ``i``'s key depends on blocks ``0..i``."""
    key = hash(("prefix-cache", model))
    keys = []
    for start in range(0, len(ids) - block + 1, block):
        key = hash((key, tuple(ids[start : start + block])))
        keys.append(key)
    return keys
