"""Calibration: synthetic prompts sized in the server's own tokens, and each model's context.

``--prompt-tokens 128`` means 128 prompt tokens as the server counts them. Before the
measured phases, for each endpoint, model and request shape (operation and system prompt)
of the run, ``calibrate_run`` measures:

* word costs: the tokens each vocabulary word adds mid-prompt, by difference against a
  one-word anchor. A group of words whose count equals its size costs one token a word
  (the usual case with a real vocabulary: a few requests settle them all); other groups
  are split in halves. Counted by the server's ``/tokenize`` where it has one (vLLM,
  llama.cpp, TGI), else by 1-token generations and their prompt count (Ollama's
  ``prompt_eval_count``).
* heads: the server's count for one-word prompts sent the workload's own way (chat or
  generate, system prompt: the template and special tokens included), from 1-token
  generations through a ``SharedClient``.
* a check: one sized prompt sent the same way, whose server count must equal the
  prediction (one constant offset is corrected and checked again).

A calibration is kept for the run and on disk (``$SHARED_OLLAMA_BENCH_CACHE``, else
``$XDG_CACHE_HOME/shared_ollama/bench-calibration.json``), keyed by server URL, kind,
served model, operation, system prompt and vocabulary; a cached one is used once its
check passes. ``calibrate_run`` also reads each model's context length (vLLM
``max_model_len``, llama.cpp ``/props`` ``n_ctx``, Ollama ``*.context_length``, TGI
``max_input_tokens``/``max_total_tokens``) for the context sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ValidationError

from .._core.status import error_for_response
from .._core.steps import request_headers
from .._transport import map_transport_error, transport_options
from ..client import SharedClient
from ..config import Endpoint, PoolConfig
from ..errors import (
    AuthError,
    EndpointError,
    NoEndpointAvailable,
    ServerError,
    SharedOllamaError,
)
from ..protocols import WireResponse, codec_for
from .result import BenchResult, PromptCalibration, PromptTokens, RequestRecord
from .workload import WORDS, Drawn, LengthDist, PromptSizer, Workload, request_spec

__all__ = [
    "CACHE_ENV",
    "TOLERANCE",
    "CalibrationFailed",
    "ContextLimit",
    "RunCalibration",
    "cache_path",
    "calibrate_run",
    "context_points",
    "max_output_tokens",
    "prompt_token_lines",
    "prompt_token_report",
    "word_costs",
]

#: How far a server-counted prompt may be from its target and still count as on target.
TOLERANCE = 0.02
CACHE_ENV = "SHARED_OLLAMA_BENCH_CACHE"
Mode = Literal["auto", "refresh", "off"]

_CHUNK = 32  # words per first group: short enough for any context
_HEADS = 4  # words a prompt may start with
_PARALLEL = 4  # calibration requests in flight per endpoint
_CHECK_TOKENS = 96
_CACHE_ENTRIES = 64
_CACHE_VERSION = 1
# Output-length options a 1-token probe must not carry (min_tokens > 1 is a 400 on vLLM).
_NOT_PROBED = frozenset({"num_predict", "max_tokens", "min_tokens"})
# An endpoint down or overloaded: a note here; the warm-up then says what is wrong with it.
_UNREACHABLE = (EndpointError, NoEndpointAvailable)
_VOCAB_DIGEST = hashlib.sha256("\n".join(WORDS).encode()).hexdigest()[:16]


class CalibrationFailed(RuntimeError):
    """Calibration could not finish; the message is one line naming the endpoint and why."""


class _NoCount(Exception):
    """The server gives no count this way (no route, no usage in its replies)."""


# -- counting ------------------------------------------------------------------------------


class _Raw:
    """Requests outside the client's operations (``/tokenize``, ``/props``), with the
    endpoint's own headers, auth and TLS settings, and the library's typed errors."""

    def __init__(self, ep: Endpoint, kind: str, timeout_s: float | None) -> None:
        self.ep = ep
        self.codec = codec_for(kind)
        self.timeout_s = timeout_s
        self._http: httpx.AsyncClient | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            opts = transport_options(self.ep)
            self._http = httpx.AsyncClient(base_url=self.ep.url, timeout=self.timeout_s, **opts)
        return self._http

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """The reply's JSON; None when the server has no such route (or does not take
        this shape). Auth failures and server errors raise the library's typed errors."""
        rid = uuid.uuid4().hex
        headers = request_headers(self.ep, rid, "bench", None)
        try:
            resp = await self.http.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise map_transport_error(
                exc, endpoint=self.ep.url, model=None, got_reply=False, got_chunk=False
            ) from None
        if 200 <= resp.status_code < 300:
            try:
                return resp.json()
            except ValueError:
                return None
        if resp.status_code in (401, 403, 429) or resp.status_code >= 500:
            reply = WireResponse(
                resp.status_code, {k.lower(): v for k, v in resp.headers.items()}, resp.content
            )
            raise error_for_response(
                self.codec,
                reply,
                endpoint=self.ep.url,
                model=None,
                attempts=1,
                request_id=rid,
                now_epoch=time.time(),
            )
        return None  # 404, 405, 400, 422: not a route (or a shape) this server has

    async def aclose(self) -> None:
        """Close the connections (a later call opens new ones). Idle keep-alive connections
        hold a server's HTTP threads: llama-server then made the generations that followed
        wait ~5 s, its keep-alive timeout."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None


class _Counter:
    """Counts prompts through one endpoint for one workload's request shape."""

    def __init__(
        self, client: SharedClient, raw: _Raw, kind: str, w: Workload, model: str, served: str
    ) -> None:
        self.client, self.raw, self.kind = client, raw, kind
        self.w, self.model, self.served = w, model, served
        self.flavour: str | None = None  # the /tokenize shape, once one answered
        self.requests = 0
        self._sem = asyncio.Semaphore(_PARALLEL)
        self._sent: dict[str, int] = {}

    async def sent(self, text: str) -> int:
        """The server's prompt count for ``text`` sent the workload's way (1 token out)."""
        if text in self._sent:
            return self._sent[text]
        options = {k: v for k, v in self.w.options.items() if k not in _NOT_PROBED}
        spec = request_spec(self.w, self.model, prompt=text, max_tokens=1, options=options)
        opts = spec.call_options()
        async with self._sem:
            self.requests += 1
            if spec.operation == "chat":
                reply: Any = await self.client.chat(spec.model, spec.messages, options=opts)
            else:
                reply = await self.client.generate(
                    spec.model, spec.prompt or "", system=spec.system, options=opts
                )
        count = reply.usage.input_tokens
        if count is None:
            raise _NoCount("its replies carry no prompt token count")
        self._sent[text] = int(count)
        return int(count)

    async def tokenized(self, text: str) -> int:
        """The server's ``/tokenize`` count for raw ``text`` (vLLM, llama.cpp or TGI)."""
        async with self._sem:
            self.requests += 1
            if self.flavour is None:
                self.flavour = await self._detect(text)
            count = await self._tokenize(self.flavour, text)
        if count is None:
            raise CalibrationFailed(f"{self.raw.ep.url}: /tokenize stopped answering")
        return count

    async def _detect(self, text: str) -> str:
        shapes = {"openai": ("vllm", "llama.cpp"), "tgi": ("tgi",)}.get(self.kind, ())
        for flavour in shapes:
            # A server failing on a shape it does not know is no count either; a refused
            # key or a dead server is raised (the same would stop the generations).
            with contextlib.suppress(ServerError):
                if await self._tokenize(flavour, text) is not None:
                    return flavour
        raise _NoCount("no /tokenize route")

    async def _tokenize(self, flavour: str, text: str) -> int | None:
        if flavour == "vllm":
            body: Any = {"model": self.served, "prompt": text, "add_special_tokens": False}
            obj = await self.raw.call("POST", "/tokenize", body)
            count = obj.get("count") if isinstance(obj, dict) else None
            return count if isinstance(count, int) else None
        if flavour == "llama.cpp":
            obj = await self.raw.call("POST", "/tokenize", {"content": text, "add_special": False})
            tokens = obj.get("tokens") if isinstance(obj, dict) else None
            # llama.cpp answers a shape it does not know with no tokens: not a count.
            return len(tokens) if isinstance(tokens, list) and (tokens or not text) else None
        obj = await self.raw.call("POST", "/tokenize", {"inputs": text})
        return len(obj) if isinstance(obj, list) else None


async def word_costs(
    count: Callable[[str], Awaitable[int]], words: Sequence[str]
) -> dict[str, int]:
    """Tokens each of ``words`` adds after a space, from counts of word groups appended to
    an anchor word (``count`` gives a text's tokens). Raises ``ValueError`` where counts
    are not additive over words."""
    anchor = words[0]
    base = await count(anchor)

    async def total(group: Sequence[str]) -> int:
        return await count(anchor + " " + " ".join(group)) - base

    costs: dict[str, int] = {}

    async def settle(group: Sequence[str], tokens: int) -> None:
        if tokens < len(group):
            raise ValueError(
                f"{len(group)} words counted as {tokens} tokens: counts are not additive"
            )
        if tokens == len(group):  # every word costs at least one: here exactly one
            costs.update(dict.fromkeys(group, 1))
            return
        if len(group) == 1:
            costs[group[0]] = tokens
            return
        half = len(group) // 2
        left = await total(group[:half])
        await asyncio.gather(settle(group[:half], left), settle(group[half:], tokens - left))

    chunks = [words[i : i + _CHUNK] for i in range(0, len(words), _CHUNK)]
    totals = await asyncio.gather(*(total(c) for c in chunks))
    await asyncio.gather(*(settle(c, t) for c, t in zip(chunks, totals, strict=True)))
    return costs


# -- context length ------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextLimit:
    """A model's context on one endpoint: prompt plus output (``total``), and the prompt
    alone where the server limits it separately (TGI's ``max_input_tokens``)."""

    total: int
    max_input: int | None = None
    source: str = ""

    def max_prompt(self, output_tokens: int) -> int:
        """The longest prompt that leaves room for ``output_tokens``."""
        room = self.total - output_tokens
        return room if self.max_input is None else min(room, self.max_input)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


async def _context_limit(
    client: SharedClient, raw: _Raw, kind: str, model: str
) -> ContextLimit | None:
    """What the endpoint says about the model's context; None when it says nothing."""
    with contextlib.suppress(SharedOllamaError):
        shown = await client.show(model)
        details = shown.details.model_dump()
        if kind == "ollama":
            for key, value in shown.modelinfo.items():
                if key.endswith(".context_length") and _int(value):
                    return ContextLimit(value, None, f"show {key}")
        elif kind == "tgi":
            total, max_input = (
                _int(details.get("max_total_tokens")),
                _int(details.get("max_input_tokens")),
            )
            if total:
                return ContextLimit(total, max_input, "/info max_total_tokens")
        elif n := _int(details.get("max_model_len")):
            return ContextLimit(n, None, "/v1/models max_model_len")
    if kind == "openai":  # llama.cpp: the context of one slot is what a request gets
        props = await raw.call("GET", "/props")
        if isinstance(props, dict):
            settings = props.get("default_generation_settings")
            n = _int(settings.get("n_ctx")) if isinstance(settings, dict) else None
            if n := n or _int(props.get("n_ctx")):
                return ContextLimit(n, None, "/props n_ctx")
    return None


# -- the disk cache ------------------------------------------------------------------------


class _Entry(BaseModel):
    key: str
    url: str
    kind: str
    model: str
    operation: str
    method: str
    heads: dict[str, int]
    costs: dict[str, int]
    saved_at: float


def cache_path() -> Path:
    """``$SHARED_OLLAMA_BENCH_CACHE``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)
    ``/shared_ollama/bench-calibration.json``."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "shared_ollama" / "bench-calibration.json"


def _key(url: str, kind: str, served: str, w: Workload) -> str:
    parts = [url, kind, served, w.operation, w.system or "", _VOCAB_DIGEST]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def _load_cache(path: Path) -> dict[str, _Entry]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != _CACHE_VERSION:
            return {}
        entries = [_Entry.model_validate(e) for e in data.get("entries", [])]
    except (OSError, ValueError, AttributeError, ValidationError):
        return {}  # missing or unreadable: measure again
    return {e.key: e for e in entries}


def _save_cache(path: Path, entries: Iterable[_Entry]) -> None:
    newest = sorted(entries, key=lambda e: e.saved_at, reverse=True)[:_CACHE_ENTRIES]
    data = {"version": _CACHE_VERSION, "entries": [e.model_dump() for e in newest]}
    with contextlib.suppress(OSError):  # a cache that cannot be written costs a re-measure
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, path)


# -- one endpoint, one request shape -------------------------------------------------------


@dataclass
class _Outcome:
    sizer: PromptSizer | None
    record: PromptCalibration


async def _check(counter: _Counter, sizer: PromptSizer, seed: int) -> tuple[int, int]:
    """(predicted, counted) for one sized prompt sent the workload's way."""
    target = max(_CHECK_TOKENS, sizer.shortest + 2 * max(sizer.costs.values()))
    text, predicted = sizer.prompt(target, random.Random(seed))
    return predicted, await counter.sent(text)


#: (url, served model) -> word costs and how they were counted: the same for every request
#: shape (mid-prompt words are tokenized alike whatever surrounds them).
_Costs = dict[tuple[str, str], tuple[dict[str, int], str]]


async def _measure(
    counter: _Counter, url: str, known: _Costs
) -> tuple[PromptSizer, str, str | None]:
    """Measure costs (unless ``known``) and heads; (sizer, method, note)."""
    note = None
    if (url, counter.served) in known:
        costs, method = known[url, counter.served]
        if method.startswith("tokenize:"):
            counter.flavour = method.removeprefix("tokenize:")
    else:
        try:
            await counter.tokenized(WORDS[0])
            count, method = counter.tokenized, f"tokenize:{counter.flavour}"
        except _NoCount:
            count, method = counter.sent, "generation"
        costs = await word_costs(count, WORDS)
        await counter.raw.aclose()
        known[url, counter.served] = costs, method
    firsts = sorted(WORDS, key=lambda w: costs[w])[:_HEADS]  # stable: vocabulary order
    try:
        counts = await asyncio.gather(*(counter.sent(w) for w in firsts))
    except _NoCount:
        if method == "generation":
            raise
        # Replies without usage: the raw count of a one-word prompt, the template unknown.
        counts = await asyncio.gather(*(counter.tokenized(w) for w in firsts))
        note = "no prompt count in the server's replies: the chat template is not counted"
    return PromptSizer(dict(zip(firsts, counts, strict=True)), costs), method, note


async def _calibrate_one(
    counter: _Counter, url: str, cache: dict[str, _Entry] | None, refresh: bool, known: _Costs
) -> _Outcome:
    t0 = time.monotonic()
    w = counter.w
    record = PromptCalibration(
        endpoint=url, model=counter.model, operation=w.operation, system=w.system is not None,
        workloads=[w.name], method="none",
    )  # fmt: skip
    key = _key(url, counter.kind, counter.served, w)
    sizer: PromptSizer | None = None
    entry = None if cache is None or refresh else cache.get(key)
    try:
        if entry is not None:
            cached = PromptSizer(entry.heads, entry.costs)
            predicted, counted = await _check(counter, cached, 0)
            if predicted == counted:
                sizer, record.method, record.cached = cached, entry.method, True
                known.setdefault((url, counter.served), (dict(entry.costs), entry.method))
                record.check_predicted, record.check_counted = predicted, counted
        if sizer is None:
            sizer, record.method, record.note = await _measure(counter, url, known)
            predicted, counted = await _check(counter, sizer, 0)
            if counted != predicted:  # a constant the heads missed (e.g. a template's end)
                offset = counted - predicted
                sizer = PromptSizer({k: v + offset for k, v in sizer.heads.items()}, sizer.costs)
                predicted, counted = await _check(counter, sizer, 1)
            record.check_predicted, record.check_counted = predicted, counted
            if cache is not None and counted == predicted and record.note is None:
                cache[key] = _Entry(
                    key=key, url=url, kind=counter.kind, model=counter.served,
                    operation=w.operation, method=record.method, heads=dict(sizer.heads),
                    costs=dict(sizer.costs), saved_at=time.time(),
                )  # fmt: skip
    except _NoCount as exc:
        record.note = f"cannot count prompt tokens ({exc}): prompt lengths are in words"
        sizer = None
    except ValueError as exc:
        raise CalibrationFailed(f"{url}: {exc}; run with --no-calibrate") from None
    except _UNREACHABLE as exc:  # the warm-up reports the pool's health in full
        record.note = f"not calibrated, no answer ({_one_line(exc)}): prompt lengths are in words"
        sizer = None
    except SharedOllamaError as exc:
        why = "credentials refused" if isinstance(exc, AuthError) else _one_line(exc)
        raise CalibrationFailed(f"{url} ({counter.model}): {why}") from None
    record.requests = counter.requests
    record.seconds = round(time.monotonic() - t0, 3)
    if sizer is not None:
        record.shortest_prompt = sizer.shortest
        record.tokens_per_word = round(sum(sizer.costs.values()) / len(sizer.costs), 4)
        if record.check_counted != record.check_predicted:
            record.note = (
                f"check: predicted {record.check_predicted} prompt tokens, the server counted "
                f"{record.check_counted}"
            )
    return _Outcome(sizer, record)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- the run -------------------------------------------------------------------------------


@dataclass
class RunCalibration:
    """What ``calibrate_run`` found: a sizer per synthetic workload (absent: sized in
    words), one record per endpoint and request shape, context limits, notes."""

    sizers: dict[str, PromptSizer] = field(default_factory=dict)
    records: list[PromptCalibration] = field(default_factory=list)
    #: model -> endpoint url -> its context limit.
    limits: dict[str, dict[str, ContextLimit]] = field(default_factory=dict)
    #: endpoint url -> kind.
    kinds: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def max_prompt(self, model: str, output_tokens: int) -> int | None:
        """The longest prompt every endpoint serving ``model`` takes; None: none says."""
        limits = self.limits.get(model, {})
        return min((lim.max_prompt(output_tokens) for lim in limits.values()), default=None)


def _serves(models: Sequence[str], model: str) -> bool:
    return not models or model in models or f"{model}:latest" in models


async def calibrate_run(
    pool: PoolConfig,
    workloads: Sequence[Workload],
    model: str,
    *,
    mode: Mode = "auto",
    disk: bool = True,
    context: bool = False,
) -> RunCalibration:
    """Calibrate every synthetic workload of the run on every endpoint serving its model
    (``mode``: "auto" uses the disk cache, "refresh" measures again, "off" sizes prompts
    in words). Each model's context length is read too (also with "off" when ``context``:
    a context sweep needs it). An endpoint that is down or does not answer gets a note and
    no calibration (the warm-up reports it); any other failure (refused credentials, an
    unknown model, counts that do not add up) raises ``CalibrationFailed`` (one line)."""
    out = RunCalibration()
    synthetic = [w for w in workloads if not w.prompts_file]
    if mode == "off" and not context:
        if synthetic:
            out.notes.append("calibration off: synthetic prompt lengths are in words")
        return out
    path = cache_path()
    cache = _load_cache(path) if disk and mode != "off" else None
    before = dict(cache or {})
    timeout = pool.timeouts.first_chunk_s
    async with contextlib.AsyncExitStack() as stack:
        eps: list[tuple[Endpoint, SharedClient, _Raw, str, list[str]]] = []
        for ep in pool.endpoints:
            one = pool.model_copy(update={"endpoints": [ep]})
            client = await stack.enter_async_context(
                SharedClient(config=one, project="bench", usage=False)
            )
            status = client.pool_status()[0]
            if status.kind not in ("ollama", "openai", "tgi") or status.health == "down":
                # Left to the warm-up, which reports the endpoint's health in full.
                why = status.last_error or status.kind
                out.notes.append(f"{ep.url}: not calibrated ({status.health}: {why})")
                continue
            raw = _Raw(ep, status.kind, timeout)
            stack.push_async_callback(raw.aclose)
            out.kinds[ep.url] = status.kind
            eps.append((ep, client, raw, status.kind, list(status.models)))
        models = {w.model or model for w in synthetic}
        if context or mode != "off":  # one cheap request each: recorded with the calibration
            for m in models:
                for ep, client, raw, kind, served_models in eps:
                    if _serves(served_models, m):
                        try:
                            lim = await _context_limit(client, raw, kind, m)
                        except _UNREACHABLE as exc:
                            out.notes.append(f"{ep.url}: no context length ({_one_line(exc)})")
                            continue
                        except SharedOllamaError as exc:
                            raise CalibrationFailed(f"{ep.url} ({m}): {_one_line(exc)}") from None
                        await raw.aclose()
                        if lim is not None:
                            out.limits.setdefault(m, {})[ep.url] = lim
        if mode != "off":
            await _calibrate_shapes(out, eps, synthetic, model, cache, mode == "refresh")
        else:
            out.notes.append("calibration off: synthetic prompt lengths are in words")
    if cache is not None and cache != before:
        _save_cache(path, cache.values())
    return out


async def _calibrate_shapes(
    out: RunCalibration,
    eps: Sequence[tuple[Endpoint, SharedClient, _Raw, str, list[str]]],
    synthetic: Sequence[Workload],
    model: str,
    cache: dict[str, _Entry] | None,
    refresh: bool,
) -> None:
    """One calibration per endpoint and request shape (model, operation, system, options);
    workloads of the same shape share it."""
    shapes: dict[str, list[Workload]] = {}
    known: _Costs = {}
    for w in synthetic:
        options = {k: v for k, v in w.options.items() if k not in _NOT_PROBED}
        shape = json.dumps(
            [w.model or model, w.operation, w.system, options], sort_keys=True, default=str
        )
        shapes.setdefault(shape, []).append(w)
    for group in shapes.values():
        w, m = group[0], group[0].model or model
        names = [x.name for x in group]
        chosen: PromptSizer | None = None
        serving = [e for e in eps if _serves(e[4], m)]
        counters = [
            _Counter(c, raw, kind, w, m, ep.models.get(m, m)) for ep, c, raw, kind, _ in serving
        ]
        # Endpoints in parallel (each its own server), shapes one after another (they share
        # an endpoint's word costs).
        outcomes = await asyncio.gather(
            *(
                _calibrate_one(n, e[0].url, cache, refresh, known)
                for n, e in zip(counters, serving, strict=True)
            )
        )
        for (ep, *_), done in zip(serving, outcomes, strict=True):
            done.record.workloads = names
            ctx = out.limits.get(m, {}).get(ep.url)
            if ctx is not None:
                done.record.context_tokens = ctx.total
                done.record.context_source = ctx.source
            out.records.append(done.record)
            if done.record.note:
                out.notes.append(f"calibration {ep.url} ({', '.join(names)}): {done.record.note}")
            if done.sizer is None:
                continue
            if chosen is None:
                chosen = done.sizer
            elif done.sizer != chosen:
                out.notes.append(
                    f"{ep.url} counts {', '.join(names)}'s prompts differently from the first "
                    "endpoint: its prompt lengths follow the first endpoint's tokenizer"
                )
        if chosen is not None:
            out.sizers.update(dict.fromkeys(names, chosen))


# -- the context sweep ---------------------------------------------------------------------


def max_output_tokens(dist: LengthDist) -> int:
    """The most output tokens a workload asks for (normal without a bound: mean + 4 sd)."""
    if dist.dist == "fixed":
        return round(dist.mean)
    if dist.max is not None:
        return dist.max
    return math.ceil(dist.mean + 4 * dist.stdev)


def context_points(start: int, top: int, points: int) -> list[int]:
    """``points`` prompt lengths from ``start`` to ``top``, evenly spaced in log scale."""
    if top <= start or points < 2:
        return [min(start, top)]
    ratio = (top / start) ** (1 / (points - 1))
    out = sorted({round(start * ratio**i) for i in range(points - 1)} | {top})
    return out


# -- the report ----------------------------------------------------------------------------


def prompt_token_report(
    workloads: Sequence[Workload],
    sizers: Mapping[str, PromptSizer],
    records: Sequence[PromptCalibration],
    requests: Sequence[RequestRecord],
    drawn: Sequence[Drawn],
) -> list[PromptTokens]:
    """Target vs server-counted prompt tokens per workload, over the measured requests.

    Each request's target comes from the mix's draws (the runner numbers its sends in draw
    order; a workload name that does not match there drops the per-request comparison)."""
    aligned = all(
        0 < r.seq <= len(drawn) and drawn[r.seq - 1].workload == r.workload for r in requests
    )
    methods: dict[str, list[str]] = {}
    for rec in records:
        for name in rec.workloads:
            if rec.method not in methods.setdefault(name, []):
                methods[name].append(rec.method)
    out: list[PromptTokens] = []
    for w in workloads:
        mine = [r for r in requests if r.workload == w.name and r.input_tokens is not None]
        report = PromptTokens(
            workload=w.name,
            target="prompts file" if w.prompts_file else w.prompt_tokens.describe(),
            method="file"
            if w.prompts_file
            else (", ".join(methods.get(w.name, ["words"])) if w.name in sizers else "words"),
            tolerance_pct=TOLERANCE * 100,
            requests=len(mine),
        )
        counts = [r.input_tokens for r in mine if r.input_tokens is not None]
        if counts:
            report.server_mean = round(sum(counts) / len(counts), 3)
            report.server_min, report.server_max = min(counts), max(counts)
        if w.prompts_file or not mine:
            out.append(report)
            continue
        pairs: list[tuple[int, int, int | None]] = []
        for r in mine:
            assert r.input_tokens is not None
            d = drawn[r.seq - 1] if aligned else None
            if d is not None and d.prompt_tokens is not None:
                pairs.append((d.prompt_tokens, r.input_tokens, d.expected_prompt_tokens))
            elif w.prompt_tokens.dist == "fixed":
                pairs.append((round(w.prompt_tokens.mean), r.input_tokens, None))
        if pairs:
            errors = [(got - want) / want for want, got, _ in pairs]
            report.target_mean = round(sum(p[0] for p in pairs) / len(pairs), 3)
            expected = [p[2] for p in pairs if p[2] is not None]
            if expected:
                report.expected_mean = round(sum(expected) / len(expected), 3)
            report.mean_error_pct = round(100 * sum(errors) / len(errors), 3)
            report.max_abs_error_pct = round(100 * max(abs(e) for e in errors), 3)
            inside = sum(abs(e) <= TOLERANCE + 1e-12 for e in errors)
            report.within_tolerance = round(inside / len(errors), 4)
        out.append(report)
    return out


def prompt_token_lines(result: BenchResult) -> list[str]:
    """The terminal's account of prompt lengths: per workload, target vs server count."""
    lines: list[str] = []
    for p in result.prompt_tokens:
        if p.server_mean is None:
            continue
        asked = p.target
        if p.target_mean is not None and asked != f"{p.target_mean:g}":
            asked += f" (mean {p.target_mean:g})"
        line = f"prompt tokens {p.workload}: asked {asked}, server counted "
        line += f"{p.server_mean:g} mean ({p.server_min}-{p.server_max})"
        if p.max_abs_error_pct is not None and p.within_tolerance is not None:
            line += (
                f", error max {p.max_abs_error_pct:.1f}%, "
                f"{100 * p.within_tolerance:.0f}% within {p.tolerance_pct:g}%"
            )
        lines.append(f"{line} [{p.method}]")
    return lines
