"""Workloads: what each request asks for (operation, prompt, lengths), never when it is sent.

Length distributions, synthetic prompts of a target length, JSONL prompt files and weighted
mixes; everything is drawn from one seeded ``random.Random`` so a run is reproducible.
Synthetic prompt lengths are server-counted tokens once a ``PromptSizer`` (measured by
``bench.calibrate``) is given to the mix; without one they are words.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "WORDS",
    "Drawn",
    "LengthDist",
    "PromptItem",
    "PromptSizer",
    "RequestSpec",
    "Workload",
    "WorkloadMix",
    "load_prompts",
    "parse_length",
    "request_spec",
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
#: The synthetic prompts' vocabulary (calibration measures each word's tokens).
WORDS: tuple[str, ...] = _WORDS


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


@dataclass(frozen=True)
class PromptSizer:
    """Sizes synthetic prompts in one server's tokens, for one request shape.

    ``heads``: the server's prompt count for a one-word prompt sent the workload's way
    (chat template, special tokens and that first word), for each word a prompt may start
    with. ``costs``: the tokens each vocabulary word adds after a space. A prompt's count is
    its head plus the costs of the words after it (``bench.calibrate`` checks this holds).
    """

    heads: Mapping[str, int]
    costs: Mapping[str, int]

    def __post_init__(self) -> None:
        if not self.heads or not self.costs:
            raise ValueError("a PromptSizer needs heads and costs")
        if min(self.costs.values()) < 1:
            raise ValueError("every word costs at least one token")

    @property
    def shortest(self) -> int:
        """The fewest tokens a prompt can have (a one-word prompt)."""
        return min(self.heads.values())

    def prompt(self, target: int, rng: random.Random) -> tuple[str, int]:
        """A random prompt the server counts as ``target`` tokens, and the count predicted
        (above ``target`` only when even one word is more; below it only when no word is
        small enough to fill the last tokens)."""
        firsts = sorted(w for w, n in self.heads.items() if n <= target) or [
            min(self.heads, key=lambda w: (self.heads[w], w))
        ]
        first = rng.choice(firsts)
        words, count = [first], self.heads[first]
        vocab = [w for w in _WORDS if w in self.costs] or sorted(self.costs)
        largest = max(self.costs.values())
        while target - count > largest:  # any word fits: draw freely
            word = rng.choice(vocab)
            words.append(word)
            count += self.costs[word]
        while count < target:  # the last few tokens: only words that fit
            fits = [w for w in vocab if self.costs[w] <= target - count]
            if not fits:
                break
            word = rng.choice(fits)
            words.append(word)
            count += self.costs[word]
        return " ".join(words), count


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
    #: Synthetic prompts: their length in the server's own tokens (calibrated, see
    #: ``bench.calibrate``), or in words when calibration is off or impossible.
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
    #: Synthetic prompts: the length asked for, and the server count the calibration
    #: predicts for this prompt (None: not calibrated).
    prompt_tokens: int | None = None
    expected_prompt_tokens: int | None = None

    def call_options(self) -> dict[str, Any]:
        """The ``options`` argument: the workload's plus ``num_predict``."""
        return {**self.options, "num_predict": self.max_tokens}


@dataclass(frozen=True, slots=True)
class Drawn:
    """What the mix drew for one request, in draw order (the runner's send order)."""

    workload: str
    prompt_tokens: int | None
    expected_prompt_tokens: int | None


def request_spec(
    w: Workload,
    model: str,
    *,
    prompt: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    max_tokens: int,
    options: Mapping[str, Any] | None = None,
) -> RequestSpec:
    """The request ``w`` sends for this prompt (or message list): chat gets a message list
    with the workload's system message first, generate a prompt and ``system``."""
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
        model=w.model or model,
        max_tokens=max_tokens,
        stream=w.stream,
        prompt=prompt,
        messages=messages,
        system=w.system if w.operation == "generate" else None,
        options=dict(options if options is not None else w.options),
    )


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
        self._sizers: dict[str, PromptSizer] = {}
        self._forced: int | None = None
        self._forced_options: dict[str, Any] = {}
        #: One entry per ``next()``, in order: the target and predicted prompt lengths.
        self.drawn: list[Drawn] = []

    @property
    def model(self) -> str:
        """The default model (workloads may name their own)."""
        return self._model

    def use_sizers(self, sizers: Mapping[str, PromptSizer]) -> None:
        """Size the named workloads' synthetic prompts in server tokens from now on."""
        self._sizers = dict(sizers)

    def force_prompt_tokens(
        self, tokens: int | None, options: Mapping[str, Any] | None = None
    ) -> None:
        """Every synthetic prompt ``tokens`` long (None: the workloads' own lengths again),
        with ``options`` added to each request's (a context sweep's ``num_ctx``)."""
        self._forced = tokens
        self._forced_options = dict(options or {})

    def next(self) -> RequestSpec:
        """The next request of the mix."""
        w = self._rng.choices(self.workloads, self._weights)[0]
        max_tokens = w.max_tokens.sample(self._rng)
        prompt: str | None = None
        messages: list[dict[str, Any]] | None = None
        target = expected = None
        options = dict(w.options)
        if w.name in self._prompts:
            item = self._rng.choice(self._prompts[w.name])
            prompt, messages = item.prompt, item.messages
            max_tokens = item.max_tokens or max_tokens
        else:
            target = w.prompt_tokens.sample(self._rng)
            if self._forced is not None:
                target = self._forced
                options |= self._forced_options
            sizer = self._sizers.get(w.name)
            if sizer is not None:
                prompt, expected = sizer.prompt(target, self._rng)
            else:
                prompt = synthetic_prompt(target, self._rng)
        self.drawn.append(Drawn(w.name, target, expected))
        spec = request_spec(
            w, self._model, prompt=prompt, messages=messages, max_tokens=max_tokens, options=options
        )
        return replace(spec, prompt_tokens=target, expected_prompt_tokens=expected)
