"""Per-request timing derivation: TTFT, TPOT and per-token ITLs from raw chunk timestamps.

Pure functions over the raw values a CallRecord holds; nothing here reads a clock or text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Derived", "apportion_tokens", "derive"]


def apportion_tokens(
    chunk_tokens: Sequence[int | None],
    output_tokens: int | None,
    content: Sequence[bool] | None = None,
    offsets_ns: Sequence[int] | None = None,
) -> list[int]:
    """Tokens carried by each chunk, from the server's counts.

    Rule (docs/bench.md, "Apportioning"): a chunk without content (Ollama's final ``done``
    object, an OpenAI ``finish_reason`` chunk with an empty delta) carries 0 tokens; a
    count the server gave for a chunk is used as is; the output tokens not accounted for
    that way are split evenly over the remaining content chunks, the first chunks taking
    one more when the split is uneven. So N content chunks for N tokens are 1 token each.
    Without an output count every content chunk counts as 1 token.

    With the chunks' arrival times (``offsets_ns``), the unaccounted tokens are shared in
    proportion to the wait before each chunk instead, at least one each: a chunk that
    waited three inter-token latencies most likely carries three tokens (Ollama sends
    several when the client fell behind). The first chunk's wait includes the prefill, so
    it weighs as the median of the others'.

    >>> apportion_tokens([None] * 5, 7, offsets_ns=[100, 120, 140, 160, 220])
    [1, 1, 1, 1, 3]

    >>> apportion_tokens([None, None, None], 10)
    [4, 3, 3]
    >>> apportion_tokens([None, None, None], 2, content=[True, True, False])
    [1, 1, 0]
    >>> apportion_tokens([1, 1, 1], 3)
    [1, 1, 1]
    """
    n = len(chunk_tokens)
    has = list(content) if content is not None else [True] * n
    if len(has) != n:
        raise ValueError(f"{len(has)} content flags for {n} chunks")
    out = [0] * n
    unknown: list[int] = []
    for i, (tokens, is_content) in enumerate(zip(chunk_tokens, has, strict=True)):
        if tokens is not None:
            out[i] = tokens
        elif is_content:
            unknown.append(i)
    if not unknown:
        return out
    if output_tokens is None:
        for i in unknown:
            out[i] = 1
        return out
    rest = max(0, output_tokens - sum(out))
    if offsets_ns is not None and len(unknown) > 1 and rest > len(unknown):
        return _by_waits(out, unknown, rest, has, offsets_ns)
    share, extra = divmod(rest, len(unknown))
    for rank, i in enumerate(unknown):
        out[i] = share + (1 if rank < extra else 0)
    return out


def _by_waits(
    out: list[int], unknown: list[int], rest: int, has: list[bool], offsets_ns: Sequence[int]
) -> list[int]:
    """``rest`` tokens over the ``unknown`` chunks in proportion to the wait before each."""
    waits: dict[int, float] = {}
    prev: int | None = None
    for i, is_content in enumerate(has):
        if not is_content:
            continue
        if prev is not None:
            waits[i] = max(1.0, float(offsets_ns[i] - offsets_ns[prev]))
        prev = i
    later = sorted(w for i, w in waits.items() if i in set(unknown))
    typical = later[len(later) // 2] if later else 1.0
    weights = [waits.get(i, typical) for i in unknown]
    shares = [1] * len(unknown)
    # Chunks whose share would be under one token carry one; the rest is shared again.
    pool, left = list(range(len(unknown))), rest
    while pool:
        total = sum(weights[r] for r in pool)
        small = [r for r in pool if left * weights[r] / total < 1]
        if not small:
            break
        left -= len(small)
        pool = [r for r in pool if r not in small]
    if pool:
        total = sum(weights[r] for r in pool)
        quotas = {r: left * weights[r] / total for r in pool}
        for r in pool:
            shares[r] = int(quotas[r])
        # Largest remainders first; on a tie the earlier chunk (the even split's order).
        order = sorted(pool, key=lambda r: (-(quotas[r] - shares[r]), r))
        for r in order[: left - sum(shares[r] for r in pool)]:
            shares[r] += 1
    for i, share in zip(unknown, shares, strict=True):
        out[i] = share
    return out


@dataclass(frozen=True, slots=True)
class Derived:
    """What one request's raw timestamps say, in nanoseconds (None: not measurable)."""

    e2e_ns: int
    ttft_ns: int | None = None
    tpot_ns: float | None = None
    #: One value per output token after the first chunk (a k-token chunk gives k).
    itls_ns: list[float] = field(default_factory=list)
    #: Tokens per chunk after apportioning (see ``apportion_tokens``).
    tokens: list[int] = field(default_factory=list)


def derive(
    t_start_ns: int,
    t_end_ns: int,
    chunk_offsets_ns: Sequence[int],
    chunk_tokens: Sequence[int | None],
    output_tokens: int | None,
    content: Sequence[bool] | None = None,
) -> Derived:
    """TTFT, TPOT and ITLs of one streamed request (non-streams get E2E only).

    TTFT is the first content chunk's offset. Each later chunk carrying k tokens adds k
    intervals of (gap to the previous token-carrying chunk) / k. TPOT is the mean of those
    intervals: (last token chunk - first token chunk) / (tokens after the first chunk); the
    first chunk's own extra tokens arrived with it, so their intervals are unobservable.
    """
    e2e = t_end_ns - t_start_ns
    if not chunk_offsets_ns:
        return Derived(e2e_ns=e2e)
    tokens = apportion_tokens(chunk_tokens, output_tokens, content, chunk_offsets_ns)
    has = list(content) if content is not None else [True] * len(tokens)
    first_content = next((i for i, c in enumerate(has) if c), None)
    ttft = None if first_content is None else chunk_offsets_ns[first_content]
    carrying = [i for i, k in enumerate(tokens) if k > 0]
    if not carrying:
        return Derived(e2e_ns=e2e, ttft_ns=ttft, tokens=tokens)
    itls: list[float] = []
    prev = carrying[0]
    for i in carrying[1:]:
        k = tokens[i]
        itls.extend([(chunk_offsets_ns[i] - chunk_offsets_ns[prev]) / k] * k)
        prev = i
    tpot = sum(itls) / len(itls) if itls else None
    return Derived(e2e_ns=e2e, ttft_ns=ttft, tpot_ns=tpot, itls_ns=itls, tokens=tokens)
