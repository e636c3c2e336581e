"""Workloads: what each request asks for (operation, prompt, lengths), never when it is sent.

Length distributions, synthetic prompts of a target length, JSONL prompt files and weighted
mixes; everything is drawn from one seeded ``random.Random`` so a run is reproducible.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "LengthDist",
    "PromptItem",
    "RequestSpec",
    "Workload",
    "WorkloadMix",
    "load_prompts",
    "parse_length",
    "synthetic_prompt",
]

# Short, common English words: each is one token for the usual BPE vocabularies, and one
# whitespace-separated word for the FakeEngine, so N words ask for about N prompt tokens.
_WORDS = (
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "it",
    "you",
    "that",
    "he",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "his",
    "they",
    "be",
    "at",
    "one",
    "have",
    "this",
    "from",
    "or",
    "had",
    "by",
    "hot",
    "word",
    "but",
    "what",
    "some",
    "we",
    "can",
    "out",
    "other",
    "were",
    "all",
    "there",
    "when",
    "up",
    "use",
    "your",
    "how",
    "said",
    "an",
    "each",
    "she",
    "which",
    "do",
    "their",
    "time",
    "if",
    "will",
    "way",
    "about",
    "many",
    "then",
    "them",
    "write",
    "would",
    "like",
    "so",
    "these",
    "her",
    "long",
    "make",
    "thing",
    "see",
    "him",
    "two",
    "has",
    "look",
    "more",
    "day",
    "could",
    "go",
    "come",
    "did",
    "number",
    "sound",
    "no",
    "most",
    "people",
    "my",
    "over",
    "know",
    "water",
    "than",
    "call",
    "first",
    "who",
    "may",
    "down",
    "side",
    "been",
    "now",
    "find",
    "any",
    "new",
    "work",
    "part",
    "take",
    "get",
    "place",
    "made",
    "live",
    "where",
    "after",
    "back",
    "little",
    "only",
    "round",
    "man",
    "year",
    "came",
    "show",
    "every",
    "good",
    "me",
    "give",
    "our",
    "under",
    "name",
    "very",
    "through",
    "just",
    "form",
    "great",
    "think",
    "say",
    "help",
    "low",
    "line",
    "turn",
    "cause",
    "much",
    "mean",
    "before",
    "move",
    "right",
    "boy",
    "old",
    "too",
    "same",
    "tell",
    "does",
    "set",
    "three",
    "want",
    "air",
    "well",
    "also",
    "play",
    "small",
    "end",
    "put",
    "home",
    "read",
    "hand",
    "port",
    "large",
    "spell",
    "add",
    "even",
    "land",
    "here",
    "must",
    "big",
    "high",
    "such",
    "follow",
    "act",
    "why",
    "ask",
    "men",
    "change",
    "went",
    "light",
)


class LengthDist(BaseModel):
    """A token-length distribution: ``fixed``, ``uniform`` or ``normal`` (clipped)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dist: Literal["fixed", "uniform", "normal"] = "fixed"
    #: fixed: the length; normal: the mean.
    mean: float = Field(default=128, gt=0)
    #: normal only.
    stdev: float = Field(default=0, ge=0)
    #: uniform: the bounds (inclusive); normal: where samples are clipped.
    min: int = Field(default=1, ge=1)
    max: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> LengthDist:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        if self.dist == "uniform" and self.max is None:
            raise ValueError("a uniform distribution needs max")
        if self.dist == "normal" and self.stdev == 0:
            raise ValueError("a normal distribution needs stdev > 0 (or use fixed)")
        return self

    def sample(self, rng: random.Random) -> int:
        """One length, at least ``min`` and at most ``max``."""
        if self.dist == "fixed":
            return round(self.mean)
        if self.dist == "uniform":
            assert self.max is not None
            return rng.randint(self.min, self.max)
        value = round(rng.gauss(self.mean, self.stdev))
        return max(self.min, value if self.max is None else min(self.max, value))

    def describe(self) -> str:
        """Short text form, the one ``parse_length`` reads."""
        if self.dist == "fixed":
            return str(round(self.mean))
        if self.dist == "uniform":
            return f"uniform:{self.min}:{self.max}"
        bounds = f":{self.min}:{self.max}" if self.max is not None else ""
        return f"normal:{self.mean:g}:{self.stdev:g}{bounds}"


def parse_length(spec: str | int | float | dict[str, Any] | LengthDist) -> LengthDist:
    """``128``, ``uniform:64:256``, ``normal:MEAN:STDEV[:MIN:MAX]`` or a table of fields."""
    if isinstance(spec, LengthDist):
        return spec
    if isinstance(spec, dict):
        return LengthDist.model_validate(spec)
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return LengthDist(mean=spec)
    if not isinstance(spec, str):
        raise ValueError(f"a length is a number or a string like 'uniform:64:256', got {spec!r}")
    head, *args = spec.strip().split(":")
    try:
        nums = [float(a) for a in args]
        if not args and head.replace(".", "", 1).isdigit():
            return LengthDist(mean=float(head))
        if head == "uniform" and len(nums) == 2:
            return LengthDist(dist="uniform", min=int(nums[0]), max=int(nums[1]), mean=nums[0])
        if head == "normal" and len(nums) in (2, 4):
            bounds = {"min": int(nums[2]), "max": int(nums[3])} if len(nums) == 4 else {}
            return LengthDist(dist="normal", mean=nums[0], stdev=nums[1], **bounds)
    except ValueError as exc:
        raise ValueError(f"bad length {spec!r}: {exc}") from None
    raise ValueError(f"bad length {spec!r}: use N, uniform:MIN:MAX or normal:MEAN:STDEV[:MIN:MAX]")


def synthetic_prompt(n_words: int, rng: random.Random) -> str:
    """``n_words`` common words drawn at random (random, so no two prompts share a prefix)."""
    return " ".join(rng.choices(_WORDS, k=max(1, n_words)))


@dataclass(frozen=True, slots=True)
class PromptItem:
    """One line of a prompt file: a prompt or a message list, with an optional length."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int | None = None


def load_prompts(path: str | Path) -> list[PromptItem]:
    """Read a JSONL file of ``{"prompt": ...}`` or ``{"messages": [...]}`` objects.

    An optional ``max_tokens`` (or ``output_tokens``) per line overrides the workload's.
    """
    items: list[PromptItem] = []
    text = Path(path).read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
        items.append(_prompt_item(obj, f"{path}:{n}"))
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


def _prompt_item(obj: Any, where: str) -> PromptItem:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        raise ValueError(f"{where}: give exactly one of 'prompt' or 'messages'")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"{where}: 'prompt' must be a string")
    if messages is not None and not (
        isinstance(messages, list) and all(isinstance(m, dict) for m in messages) and messages
    ):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of objects")
    max_tokens = obj.get("max_tokens", obj.get("output_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"{where}: 'max_tokens' must be a positive integer")
    return PromptItem(prompt=prompt, messages=messages, max_tokens=max_tokens)


class Workload(BaseModel):
    """One kind of request in the mix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "default"
    #: Relative share of requests in a mix.
    weight: float = Field(default=1.0, gt=0)
    operation: Literal["chat", "generate"] = "chat"
    #: Logical model name; the scenario's ``model`` when not set.
    model: str | None = None
    #: Synthetic prompts: their length in words (one token each for common words).
    prompt_tokens: LengthDist = Field(default_factory=lambda: LengthDist(mean=128))
    #: Completion length, sent as ``num_predict``.
    max_tokens: LengthDist = Field(default_factory=lambda: LengthDist(mean=128))
    stream: bool = True
    #: JSONL prompts instead of synthetic ones (see ``load_prompts``).
    prompts_file: str | None = None
    system: str | None = None
    #: Extra generation options (``temperature``, ``ignore_eos``, ...).
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("prompt_tokens", "max_tokens", mode="before")
    @classmethod
    def _length(cls, value: Any) -> Any:
        # Tables are validated as LengthDist by pydantic itself (precise error locations).
        return value if isinstance(value, dict | LengthDist) else parse_length(value)


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """Everything the runner needs to send one request."""

    workload: str
    operation: Literal["chat", "generate"]
    model: str
    max_tokens: int
    stream: bool
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    #: generate only (chat puts it in ``messages``).
    system: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def call_options(self) -> dict[str, Any]:
        """The ``options`` argument: the workload's plus ``num_predict``."""
        return {**self.options, "num_predict": self.max_tokens}


class WorkloadMix:
    """Draws ``RequestSpec``s from weighted workloads with one seeded generator."""

    def __init__(self, workloads: Sequence[Workload], model: str | None, seed: int) -> None:
        if not workloads:
            raise ValueError("no workloads")
        missing = [w.name for w in workloads if not (w.model or model)]
        if missing:
            raise ValueError(f"no model for workload(s) {', '.join(missing)}: give --model")
        self.workloads = list(workloads)
        self._model = model or ""
        self._rng = random.Random(seed)
        self._weights = [w.weight for w in workloads]
        self._prompts = {w.name: load_prompts(w.prompts_file) for w in workloads if w.prompts_file}

    def next(self) -> RequestSpec:
        """The next request of the mix."""
        w = self._rng.choices(self.workloads, self._weights)[0]
        max_tokens = w.max_tokens.sample(self._rng)
        prompt: str | None = None
        messages: list[dict[str, Any]] | None = None
        if w.name in self._prompts:
            item = self._rng.choice(self._prompts[w.name])
            prompt, messages = item.prompt, item.messages
            max_tokens = item.max_tokens or max_tokens
        else:
            prompt = synthetic_prompt(w.prompt_tokens.sample(self._rng), self._rng)
        if w.operation == "chat":
            messages = messages or [{"role": "user", "content": prompt or ""}]
            if w.system:
                messages = [{"role": "system", "content": w.system}, *messages]
            prompt = None
        elif prompt is None:  # a message list used for generate: join the contents
            prompt = "\n".join(str(m.get("content", "")) for m in messages or ())
            messages = None
        return RequestSpec(
            workload=w.name,
            operation=w.operation,
            model=w.model or self._model,
            max_tokens=max_tokens,
            stream=w.stream,
            prompt=prompt,
            messages=messages,
            system=w.system if w.operation == "generate" else None,
            options=dict(w.options),
        )
