"""Deterministic token accounting for the FakeEngine: prompt counts, output plans, embeddings.
Pure functions; every wire protocol derives its counts and texts from here."""

from __future__ import annotations

import hashlib
import math
import random
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "EMBED_DIM",
    "VOCAB",
    "Finish",
    "Plan",
    "Token",
    "chat_ids",
    "chat_prompt",
    "count_words",
    "embedding",
    "plan",
    "prompt_ids",
]

# Words never contain spaces, so each token is exactly one word and counts stay obvious.
VOCAB: tuple[str, ...] = (
    "the", "sky", "is", "blue", "because", "light", "scatters", "in", "air",
    "and", "a", "model", "answers", "with", "small", "plain", "words", "that",
    "are", "easy", "to", "count", "every", "token", "one", "word", "so", "tests",
    "stay", "exact", "over", "time",
)  # fmt: skip
TOKEN_ID_BASE = 1000
EMBED_DIM = 8
CHAT_TOKENS_PER_MESSAGE = 3
# Ids of the chat template's markers (ids past the word range, so no word collides).
_TEMPLATE_START, _TEMPLATE_END = 32001, 32002

# "length": the request's own limit was reached; "eos": default_max_tokens reached with no
# limit asked (the model "chose" to stop); "stop": a stop string ended it.
Finish = Literal["length", "eos", "stop"]


@dataclass(frozen=True)
class Token:
    """One output token: its id in the fake vocabulary and its text (" word", or "word" first)."""

    id: int
    text: str


@dataclass(frozen=True)
class Plan:
    """The whole output of one generation, decided before any time passes."""

    tokens: tuple[Token, ...]
    finish: Finish

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)


def count_words(text: str) -> int:
    """Prompt tokens of a text: its whitespace-separated words."""
    return len(text.split())


def content_text(content: Any) -> str:
    """The text of a chat message content: a string, or OpenAI-style parts with "text"."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)
        )
    return ""


def chat_prompt(messages: Iterable[Mapping[str, Any]]) -> tuple[str, int]:
    """(prompt text, prompt tokens) of a chat: contents joined by newlines; words + 3 a message."""
    texts = [content_text(m.get("content")) for m in messages]
    tokens = sum(count_words(t) + CHAT_TOKENS_PER_MESSAGE for t in texts)
    return "\n".join(texts), tokens


def chat_ids(messages: Iterable[Mapping[str, Any]]) -> list[int]:
    """A chat's prompt as token ids, as many as ``chat_prompt`` counts: per message three
    template tokens (the role's start marker, the role, the end marker), then its words."""
    ids: list[int] = []
    for m in messages:
        role = m.get("role")
        role_id = zlib.crc32(role.encode()) % 32000 if isinstance(role, str) else 0
        ids += [_TEMPLATE_START, role_id, _TEMPLATE_END]
        ids += prompt_ids(content_text(m.get("content")))
    return ids


def _rng(seed: int, text: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def plan(
    seed: int, prompt_text: str, limit: int | None, default_max: int, stop: Sequence[str] = ()
) -> Plan:
    """Output tokens for a prompt: ``limit`` of them (finish "length"), else ``default_max``
    (finish "eos"); a stop string found from the second token on ends it early (finish
    "stop") before the token that would complete it. At least one token is always produced.
    """
    rng = _rng(seed, prompt_text)
    wanted = limit if limit is not None else default_max
    stops = [s for s in stop if s]
    tokens: list[Token] = []
    text = ""
    for i in range(wanted):
        index = rng.randrange(len(VOCAB))
        piece = VOCAB[index] if i == 0 else " " + VOCAB[index]
        if i > 0 and any(_completes(text, piece, s) for s in stops):
            return Plan(tuple(tokens), "stop")
        tokens.append(Token(TOKEN_ID_BASE + index, piece))
        text += piece
    return Plan(tuple(tokens), "length" if limit is not None else "eos")


def _completes(text: str, piece: str, stop: str) -> bool:
    """Whether appending ``piece`` to ``text`` completes an occurrence of ``stop``."""
    return stop in (text + piece)[max(len(text) - len(stop) + 1, 0) :]


def prompt_ids(text: str) -> list[int]:
    """Stable fake token ids for the words of a prompt (Ollama's ``context``, TGI's prefill)."""
    return [zlib.crc32(w.encode()) % 32000 for w in text.split()]


def embedding(text: str) -> list[float]:
    """A deterministic unit vector of ``EMBED_DIM`` floats from a hash of the text."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [v / 32768.0 - 1.0 for v in struct.unpack(f">{EMBED_DIM}H", digest[: 2 * EMBED_DIM])]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]
