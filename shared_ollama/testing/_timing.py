"""The FakeEngine's timing model: how long queueing, loading, prefill and each token take.
Pure data; the runtime reads it at every step, so a change applies to running generations."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["TimingModel"]


@dataclass
class TimingModel:
    """How long a FakeEngine takes; deterministic, all values in seconds.

    One generation (chat, generate, completion; stream or not) runs as:

    1. admission: when no slot is free and ``max_queue`` requests already wait, the request
       is refused at once with the engine's overload reply; otherwise it waits (FIFO) for
       one of ``slots`` slots. That wait is the queue time.
    2. ollama only: the first request for a model since ``start()`` loads it, sleeping
       ``load_s`` while holding its slot; requests arriving during the load wait for the same
       load. The time spent is reported as ``load_duration``.
    3. prefill: sleep ``ttft_base_s + ttft_per_prompt_token_s * uncached``, then emit
       token 1. ``uncached`` is the prompt's token count, less the tokens the engine's
       prefix cache served: with ``prefix_cache_tokens`` > 0 the engine keeps the full
       ``prefix_block_tokens``-token blocks of recent prompts (that many tokens at most, LRU
       evicted) and a prompt's leading blocks that match are not computed again (see
       ``docs/fake_engine.md``, "Prefix cache"). 0, the default: no cache.
    4. decode: before each later token sleep ``itl_s + itl_per_active_s * (active - 1)``,
       where ``active`` is the number of generations holding a slot at that moment (itself
       included).

    Sleeps aim at absolute deadlines, so scheduler jitter does not accumulate: with no queue,
    no load and no other generation, token ``k`` (1-based) leaves at
    ``ttft_base_s + ttft_per_prompt_token_s * P + (k - 1) * itl_s`` after arrival (``P``:
    uncached prompt tokens), and the response ends with the last token. The openai and ollama
    kinds pack ``tokens_per_chunk`` tokens into one chunk, sent when its last token is
    produced (tgi: one token a chunk).
    Embeddings take a slot, then sleep ``ttft_base_s + ttft_per_prompt_token_s * words``.

    Output length is exactly the requested limit, else ``default_max_tokens`` (see
    ``docs/fake_engine.md`` for the token accounting).
    """

    ttft_base_s: float = 0.02
    ttft_per_prompt_token_s: float = 0.0002
    itl_s: float = 0.005
    itl_per_active_s: float = 0.0
    tokens_per_chunk: int = 1
    default_max_tokens: int = 16
    load_s: float = 0.0
    #: Prefix cache capacity in tokens (0: no cache); a change applies at the next request.
    prefix_cache_tokens: int = 0
    #: Cache granularity: only whole blocks of this many prompt tokens are kept and matched.
    prefix_block_tokens: int = 16

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"TimingModel.{f.name} must be >= 0")
        if self.tokens_per_chunk < 1 or self.default_max_tokens < 1:
            raise ValueError("tokens_per_chunk and default_max_tokens must be >= 1")
        if self.prefix_block_tokens < 1:
            raise ValueError("prefix_block_tokens must be >= 1")

    def prefill_s(self, prompt_tokens: int) -> float:
        """Seconds from holding a slot (model loaded) to the first token, for
        ``prompt_tokens`` tokens to compute (those the prefix cache did not serve)."""
        return self.ttft_base_s + self.ttft_per_prompt_token_s * prompt_tokens

    def token_gap_s(self, active: int) -> float:
        """Seconds between two consecutive tokens while ``active`` generations run."""
        return self.itl_s + self.itl_per_active_s * max(active - 1, 0)
