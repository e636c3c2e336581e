"""Issue #14's real-server proof: affinity routing against least-loaded and round-robin on
two real llama.cpp ``llama-server`` processes, one multi-turn workload through ``SharedClient``.

Run from the repository root: ``python benchmarks/affinity.py [--out DIR]``.

It builds (or finds) llama-server the way the test suite does, writes the tiny model in its
letters variant (a reply reads back as the tokens that produced it, as with a real model: see
``make_tiny_gguf``), and for each strategy starts two fresh servers, runs the same sessions
(same seed, same prompts, same think times) and reads every call's record. A call's history is
its prompt after the shared system prompt; the servers' own counts (llama.cpp's
``timings.cache_n``/``usage.prompt_tokens_details.cached_tokens``, parsed by the client into
``CallRecord.cached_tokens``) say how much of it came from their caches. It prints per strategy
the history-token hit ratio, TTFT p50/p99 and the busiest endpoint's share, then the ratios the
issue asks for last; it exits 1 when a target is missed (or the workload breaks its own rules).
Why these server settings: docs/routing_measured.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from shared_ollama import Endpoint, SharedClient
from shared_ollama.config import Strategy
from shared_ollama.records import CallRecord
from tests.realservers._process import client_cpus, pinned
from tests.realservers.llama_server import (
    ALLOWED_WORDS,
    TINY,
    LlamaServer,
    ModelShape,
    find_llama_server,
    make_tiny_gguf,
)

# -- The workload and the servers: every strategy runs exactly this -------------------------
# (settled by the exploratory runs in docs/routing_measured.md, each choice explained there)
SEED = 14  # draws every text, think time and start offset; the same for every strategy
SERVERS = 2  # real llama-servers in the pool
SLOTS_PER_SERVER = 2  # -np; the slots of both servers are counted on /props at start-up
SESSIONS = 4 * SERVERS * SLOTS_PER_SERVER  # 16 conversations open at once: 4x all the slots
SESSIONS_PER_SYSTEM_PROMPT = 4  # each system prompt opens 4 sessions: 4 system prompts
TURNS = 5  # requests per session (each: the whole conversation so far + a new message)
# Lengths in tokens: the tiny model reads text as one token per character.
SYSTEM_TOKENS = 150  # the shared system prompt
DOCUMENT_TOKENS = 300  # the first user message: a document to talk about, the session's own
# Every later user message. With the chat template and the reply's last token it makes 87
# new tokens a turn: llama.cpp's CPU flash attention prefills fewer than 64 new tokens a
# row at a time (slower than 200 tokens tiled; docs/routing_measured.md).
USER_TOKENS = 64
REPLY_TOKENS = 240  # every reply (the tiny model never stops early: exactly this many)
# A user's pause between a reply and the next message (exponential): the two servers' one
# CPU is about a fifth busy, as a chat deployment runs (not saturated).
THINK_MEAN_S = 8.0
# Server flags: llama.cpp's defaults but for these two (and -t, one thread per pinned CPU).
# Placement: each server on a CPU of its own (as each would have its own machine in a
# deployment), the light client (16 sessions pausing between turns) beside them. Two servers on
# one shared CPU made every prefill wait for the other server's decoding.
SERVER_PER_CPU = True
CTX_SIZE = 2 * 2048  # -c: 2,048 tokens a slot (the tiny model's trained context, the cap)
PARALLEL = SLOTS_PER_SERVER  # -np (explicit slots: a KV region each, not one unified)
# Kept at their defaults, and why they matter: --cache-ram 8192 (MiB of host memory for
# prompts moved out of slots), --cache-idle-slots (an idle slot's prompt is moved there when
# a new task starts), --slot-prompt-similarity 0.10, --cache-reuse 0.

# -- The targets (issue #14) -------------------------------------------------------------------
MIN_HIT_RATIO = 0.80  # affinity: history tokens served from the servers' caches
MIN_TTFT_CUT = 2.0  # TTFT p50 of least_loaded and of round_robin over affinity's
MAX_BUSIEST_SHARE = 1.25  # affinity: the busiest endpoint's calls over the mean
MIN_LAST_TURN_HISTORY = 0.60  # the workload: history share of the last turn's prompt

MODEL = "tiny-llama"
STRATEGIES: tuple[Strategy, ...] = ("affinity", "least_loaded", "round_robin")


@dataclasses.dataclass(frozen=True)
class Workload:
    """The sessions one strategy runs (defaults: the header above)."""

    seed: int = SEED
    sessions: int = SESSIONS
    sessions_per_system_prompt: int = SESSIONS_PER_SYSTEM_PROMPT
    turns: int = TURNS
    system_tokens: int = SYSTEM_TOKENS
    document_tokens: int = DOCUMENT_TOKENS
    user_tokens: int = USER_TOKENS
    reply_tokens: int = REPLY_TOKENS
    think_mean_s: float = THINK_MEAN_S
    #: One call at a time, every session's turn t before any turn t+1 (no think times): the
    #: order the test uses, where only the routing decides which server sees which turn.
    lockstep: bool = False

    @property
    def system_prompts(self) -> int:
        """How many distinct system prompts the sessions share."""
        return math.ceil(self.sessions / self.sessions_per_system_prompt)


@dataclasses.dataclass(frozen=True)
class Call:
    """One call as the servers counted it."""

    session: int
    turn: int
    endpoint: str
    reason: str
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    system_tokens: int
    #: The server's own prefill time of the uncached tokens (llama.cpp's ``prompt_ms``).
    prefill_ms: float

    @property
    def history(self) -> int:
        """Prompt tokens after the shared system prompt."""
        return self.prompt_tokens - self.system_tokens

    @property
    def history_cached(self) -> int:
        """Of them, those the server took from its cache (the system prompt's own hits are
        not counted: every policy gets those)."""
        return min(max(self.cached_tokens - self.system_tokens, 0), self.history)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One strategy's run, summarised."""

    strategy: str
    calls: list[Call]
    failures: list[str]

    @property
    def hit_ratio(self) -> float:
        """History tokens served from the servers' caches, over all history tokens."""
        total = sum(c.history for c in self.calls)
        return sum(c.history_cached for c in self.calls) / total if total else 0.0

    def ttft_ms(self, q: float) -> float:
        """TTFT quantile ``q`` (0-1) in ms, nearest rank."""
        return 1000 * _quantile([c.ttft_s for c in self.calls], q)

    def prefill_ms(self, q: float) -> float:
        """The servers' prefill time, quantile ``q``, in ms."""
        return _quantile([c.prefill_ms for c in self.calls], q)

    def uncached(self, q: float) -> float:
        """Prompt tokens the servers had to prefill, quantile ``q``."""
        return _quantile([c.prompt_tokens - c.cached_tokens for c in self.calls], q)

    def rest_ms(self, q: float) -> float:
        """TTFT at the client minus the server's prefill, quantile ``q``, in ms: the part no
        routing changes (HTTP, chat template, tokenizing, waiting for the other slot)."""
        return _quantile([1000 * c.ttft_s - c.prefill_ms for c in self.calls], q)

    def first_turns(self) -> Outcome:
        """The sessions' first calls (a new document for every strategy) alone."""
        return dataclasses.replace(self, calls=[c for c in self.calls if c.turn == 0])

    def later_turns(self) -> Outcome:
        """The calls a routing decision can serve from a cache (every turn but the first)."""
        return dataclasses.replace(self, calls=[c for c in self.calls if c.turn > 0])

    def returned(self) -> tuple[int, int]:
        """Later turns sent to the endpoint of the session's previous turn, and all later
        turns: a cache-blind policy on two servers returns about half of them by chance."""
        previous: dict[int, str] = {}
        back = later = 0
        for call in sorted(self.calls, key=lambda c: (c.session, c.turn)):
            if call.turn > 0 and call.session in previous:
                later += 1
                back += call.endpoint == previous[call.session]
            previous[call.session] = call.endpoint
        return back, later

    def per_endpoint(self) -> Counter[str]:
        """Calls per endpoint."""
        return Counter(c.endpoint for c in self.calls)

    @property
    def busiest_share(self) -> float:
        """The busiest endpoint's calls over the mean of all ``SERVERS`` (NaN: no calls)."""
        counts = self.per_endpoint()
        mean = len(self.calls) / SERVERS
        return max(counts.values()) / mean if counts else math.nan

    def last_turn_history(self) -> float:
        """The smallest history share of a last-turn prompt (0 with no calls)."""
        last = max((c.turn for c in self.calls), default=0)
        shares = [c.history / c.prompt_tokens for c in self.calls if c.turn == last]
        return min(shares, default=0.0)


def _quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile ``q`` (0-1); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _text(rng: random.Random, tokens: int) -> str:
    """Words of the tiny model's vocabulary, ``tokens`` characters (= its tokens) long."""
    words: list[str] = []
    length = -1
    while length < tokens:
        word = rng.choice(ALLOWED_WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:tokens]


def system_prompts(w: Workload) -> list[str]:
    """The shared system prompts."""
    rng = random.Random(f"{w.seed}:system")
    return [_text(rng, w.system_tokens) for _ in range(w.system_prompts)]


def start_servers(
    model: Path,
    logs: Path,
    *,
    binary: Path | None = None,
    parallel: int = PARALLEL,
    cpus: frozenset[int] | None = None,
) -> list[LlamaServer]:
    """``SERVERS`` llama-servers with llama.cpp's defaults but ``-c``/``-np`` (and ``-t``),
    placed as the header says (or all on ``cpus``); all stopped again if one fails to start."""
    servers: list[LlamaServer] = []
    mine = sorted(os.sched_getaffinity(0))
    try:
        for index in range(SERVERS):
            own: frozenset[int] | str = "policy"
            if cpus is not None:
                own = cpus
            elif SERVER_PER_CPU:
                own = frozenset({mine[index % len(mine)]})
            server = LlamaServer(
                model,
                binary=binary,
                log_path=logs / f"llama-server-{index}.log",
                parallel=parallel,
                ctx_size=CTX_SIZE,
                test_flags=False,
                cpus=own,
            )
            servers.append(server.start())
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


async def _prepare(servers: Sequence[LlamaServer], systems: Sequence[str]) -> list[int]:
    """Warm each server up with a prompt that shares nothing with the workload, and count
    each system prompt's tokens as the chat template lays it out (the server's tokenizer)."""
    async with httpx.AsyncClient(timeout=60) as http:
        for server in servers:
            body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "?"}]}
            (await http.post(f"{server.url}/v1/chat/completions", json=body)).raise_for_status()
        lengths = []
        for system in systems:
            templated = f"<|im_start|>system\n{system}<|im_end|>\n"
            body2 = {"content": templated, "add_special": True, "parse_special": True}
            reply = await http.post(f"{servers[0].url}/tokenize", json=body2)
            reply.raise_for_status()
            lengths.append(len(reply.json()["tokens"]))
    return lengths


async def total_slots(servers: Sequence[LlamaServer]) -> int:
    """The slots the servers say they have (``/props``)."""
    async with httpx.AsyncClient(timeout=30) as http:
        replies = [await http.get(f"{s.url}/props") for s in servers]
    return sum(int(r.json()["total_slots"]) for r in replies)


class _Conversation:
    """One session's messages so far and its own random stream."""

    def __init__(self, w: Workload, index: int, systems: Sequence[str]) -> None:
        self.w = w
        self.index = index
        self.rng = random.Random(f"{w.seed}:session:{index}")
        self.system = index % w.system_prompts
        self.turns_done = 0
        self.messages: list[dict[str, str]] = [
            {"role": "system", "content": systems[self.system]},
            {"role": "user", "content": _text(self.rng, w.document_tokens)},
        ]

    async def turn(self, client: SharedClient, failures: list[str]) -> bool:
        """Send the conversation so far, append the reply and the next user message; False
        (and the failure noted) when the call failed."""
        turn = self.turns_done
        tags = {"session": str(self.index), "turn": str(turn), "system": str(self.system)}
        try:
            stream = await client.chat(
                MODEL,
                self.messages,
                stream=True,
                options={"num_predict": self.w.reply_tokens},
                session=f"conversation-{self.index}",
                tags=tags,
            )
            reply = "".join([chunk.message.content async for chunk in stream])
        except Exception as exc:  # reported and counted as a miss, never hidden
            failures.append(f"session {self.index} turn {turn}: {type(exc).__name__}: {exc}")
            return False
        self.turns_done += 1
        self.messages.append({"role": "assistant", "content": reply})
        self.messages.append({"role": "user", "content": _text(self.rng, self.w.user_tokens)})
        return True


async def run_sessions(
    urls: Sequence[str],
    strategy: Strategy,
    w: Workload,
    system_lengths: Sequence[int],
    *,
    max_in_flight: int | None = None,
) -> Outcome:
    """Every session of ``w`` through one ``SharedClient`` with ``strategy``; each call's
    record read back into a ``Call``. ``max_in_flight`` caps each endpoint's calls."""
    systems = system_prompts(w)
    records: list[CallRecord] = []
    failures: list[str] = []
    endpoints = [Endpoint(url, kind="openai", max_in_flight=max_in_flight) for url in urls]

    conversations = [_Conversation(w, index, systems) for index in range(w.sessions)]

    async def session(client: SharedClient, talk: _Conversation) -> None:
        # The first message at a random moment: sessions interleave from the start.
        await asyncio.sleep(talk.rng.uniform(0, w.think_mean_s))
        for _ in range(w.turns):
            if not await talk.turn(client, failures):
                return
            await asyncio.sleep(talk.rng.expovariate(1 / w.think_mean_s))

    async with SharedClient(
        endpoints, strategy=strategy, usage=False, listeners=[records.append]
    ) as client:
        if w.lockstep:
            for _ in range(w.turns):
                for talk in conversations:
                    await talk.turn(client, failures)
        else:
            await asyncio.gather(*(session(client, talk) for talk in conversations))
    calls = []
    for rec in records:
        if not rec.ok:
            failures.append(f"{rec.tags.get('session')}/{rec.tags.get('turn')}: {rec.outcome}")
            continue
        missing = [
            name
            for name, value in (
                ("input_tokens", rec.input_tokens),
                ("cached_tokens", rec.cached_tokens),
                ("ttft", rec.ttft_s),
            )
            if value is None
        ]
        if missing or rec.endpoint is None:
            failures.append(f"call without {', '.join(missing) or 'endpoint'}: {rec.request_id}")
            continue
        assert rec.input_tokens is not None and rec.cached_tokens is not None
        assert rec.ttft_s is not None
        calls.append(
            Call(
                session=int(rec.tags["session"]),
                turn=int(rec.tags["turn"]),
                endpoint=rec.endpoint,
                reason=rec.routing.reason if rec.routing is not None else "?",
                ttft_s=rec.ttft_s,
                prompt_tokens=rec.input_tokens,
                cached_tokens=rec.cached_tokens,
                system_tokens=system_lengths[int(rec.tags["system"])],
                prefill_ms=rec.server_timings.get("prompt_eval_duration_ns", math.nan) / 1e6,
            )
        )
    return Outcome(strategy, calls, failures)


def run_strategy(
    model: Path,
    logs: Path,
    strategy: Strategy,
    w: Workload,
    *,
    binary: Path | None = None,
    max_in_flight: int | None = None,
) -> Outcome:
    """Two fresh servers (empty caches), the workload through ``strategy``, servers stopped."""
    servers = start_servers(model, logs / strategy, binary=binary)
    try:
        lengths = asyncio.run(_prepare(servers, system_prompts(w)))
        urls = [s.url for s in servers]
        outcome = asyncio.run(run_sessions(urls, strategy, w, lengths, max_in_flight=max_in_flight))
        if outcome.failures:  # the servers' side of the story
            outcome.failures.extend(f"{s.log_path}:\n{s.log_text(1500)}" for s in servers)
        return outcome
    finally:
        for server in servers:
            server.stop()


def _row(o: Outcome) -> str:
    counts = "/".join(str(n) for _, n in sorted(o.per_endpoint().items()))
    reasons = ",".join(f"{r}:{n}" for r, n in sorted(Counter(c.reason for c in o.calls).items()))
    return (
        f"{o.strategy:<13}{len(o.calls):>6}  {counts:<9}{o.busiest_share:>8.2f}"
        f"{o.hit_ratio:>10.3f}{o.uncached(0.5):>10.0f}{o.prefill_ms(0.5):>10.1f}"
        f"{o.ttft_ms(0.5):>10.1f}{o.ttft_ms(0.99):>9.1f}   {reasons}"
    )


def report(outcomes: dict[str, Outcome], w: Workload, slots: int) -> list[str]:
    """Print the table and the targets (ratios last); the targets missed, as lines."""
    print(
        f"\n{'':<13}{'':>6}  {'calls':<9}{'busiest':>8}{'history':>10}{'uncached':>10}"
        f"{'prefill':>10}{'TTFT':>10}{'TTFT':>9}"
    )
    print(f"{'strategy':<13}{'calls':>6}  {'per ep':<9}{'/mean':>8}{'hit':>10}{'p50 tok':>10}"
          f"{'p50 ms':>10}{'p50 ms':>10}{'p99 ms':>9}   routing reasons")  # fmt: skip
    for outcome in outcomes.values():
        print(_row(outcome))
    missed: list[str] = []
    for outcome in outcomes.values():
        missed += [f"{outcome.strategy}: {failure}" for failure in outcome.failures[:5]]
    aff = outcomes["affinity"]
    history = min(o.last_turn_history() for o in outcomes.values())
    rules = [
        (f"sessions {w.sessions} >= 4 x {slots} slots", w.sessions >= 4 * slots),
        (f"turns {w.turns} >= 5", w.turns >= 5),
        (f"sessions per system prompt {w.sessions_per_system_prompt} >= 4",
         w.sessions_per_system_prompt >= 4),
        (f"last-turn history share {history:.2f} >= {MIN_LAST_TURN_HISTORY}",
         history >= MIN_LAST_TURN_HISTORY),
    ]  # fmt: skip
    targets = [
        (f"affinity history hit ratio {aff.hit_ratio:.3f} >= {MIN_HIT_RATIO}",
         aff.hit_ratio >= MIN_HIT_RATIO),
        (f"affinity busiest/mean {aff.busiest_share:.2f} <= {MAX_BUSIEST_SHARE}",
         aff.busiest_share <= MAX_BUSIEST_SHARE),
    ]  # fmt: skip
    for name in ("least_loaded", "round_robin"):
        other = outcomes[name]
        print(f"history hit ratio affinity/{name}: {aff.hit_ratio / max(other.hit_ratio, 1e-9):.2f}"
              f" ({aff.hit_ratio:.3f} vs {other.hit_ratio:.3f})")  # fmt: skip
        cut = other.ttft_ms(0.5) / aff.ttft_ms(0.5)
        targets.append((f"TTFT p50 {name}/affinity {cut:.2f} >= {MIN_TTFT_CUT}",
                        cut >= MIN_TTFT_CUT))  # fmt: skip
    print("\nwhere the TTFT goes, p50 (rest: TTFT at the client minus the server's prefill):")
    for outcome in outcomes.values():
        for label, part in (("first", outcome.first_turns()), ("later", outcome.later_turns())):
            print(f"  {outcome.strategy:<13}{label} turns {len(part.calls):>3} calls"
                  f"  TTFT {part.ttft_ms(0.5):5.1f}  prefill {part.prefill_ms(0.5):5.1f}"
                  f"  rest {part.rest_ms(0.5):4.1f} ms"
                  f"  uncached {part.uncached(0.5):4.0f} tok")  # fmt: skip
    for outcome in outcomes.values():
        back, later_turns = outcome.returned()
        print(f"  {outcome.strategy:<13}later turns on the previous turn's endpoint: "
              f"{back}/{later_turns}")  # fmt: skip
    for name in ("least_loaded", "round_robin"):
        later = outcomes[name].later_turns().ttft_ms(0.5) / aff.later_turns().ttft_ms(0.5)
        p90 = outcomes[name].ttft_ms(0.9) / aff.ttft_ms(0.9)
        print(f"not targets: TTFT p50 of later turns {name}/affinity {later:.2f},"
              f" TTFT p90 of all calls {p90:.2f}")  # fmt: skip
    print("\nworkload rules:")
    for text, ok in rules:
        print(f"  {'ok  ' if ok else 'MISS'} {text}")
    print("targets:")
    for text, ok in targets:
        print(f"  {'ok  ' if ok else 'MISS'} {text}")
    missed += [text for text, ok in rules + targets if not ok]
    return missed


def _dump(path: Path, outcomes: dict[str, Outcome]) -> None:
    data: dict[str, Any] = {
        name: {
            "failures": o.failures,
            "calls": [
                {**dataclasses.asdict(c), "history": c.history, "hit": c.history_cached}
                for c in o.calls
            ],
        }
        for name, o in outcomes.items()
    }
    path.write_text(json.dumps(data, indent=1) + "\n")


def parse_shape(text: str) -> ModelShape:
    """``WIDTHxLAYERS``: heads of 64 dimensions, a feed-forward 3x the width."""
    try:
        width, layers = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxLAYERS, e.g. 512x2") from None
    if width < 64 or width % 64 or layers < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a width of 64, 128, ... and 1+ layers")
    return ModelShape(embd=width, heads=width // 64, layers=layers, ff=3 * width)


def main() -> int:
    """Run every strategy on fresh servers, print the table and the targets; 1 on a miss."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="keep the server logs and calls.json here")
    parser.add_argument(
        "--shape",
        type=parse_shape,
        default=TINY,
        help="a wider generated model, WIDTHxLAYERS (e.g. 512x2): an experiment, not the "
        "issue's setup (benchmarks/llama_prefill_shapes.py says why one would try it)",
    )
    parser.add_argument(
        "--cap-at-slots",
        action="store_true",
        help="every strategy: at most as many calls in flight on an endpoint as its server has "
        "slots (max_in_flight), so a call waits in the client instead of queueing at a full server",
    )
    args = parser.parse_args()
    cap = SLOTS_PER_SERVER if args.cap_at_slots else None
    out = args.out or Path(tempfile.mkdtemp(prefix="affinity-"))
    out.mkdir(parents=True, exist_ok=True)
    w = Workload()
    binary = find_llama_server()
    model = make_tiny_gguf(out / "tiny-letters.gguf", emit="letters", shape=args.shape)
    print(f"llama-server {binary}\nflags: -c {CTX_SIZE} -np {PARALLEL} -t 1 (else defaults)")
    if args.shape != TINY:
        print(f"model: the letters model at {args.shape.label}, not the tiny one (an experiment)")
    if cap is not None:
        print(f"client: max_in_flight={cap} an endpoint, for every strategy (an experiment)")
    print(f"workload: {dataclasses.asdict(w)}")
    outcomes: dict[str, Outcome] = {}
    servers = start_servers(model, out / "probe", binary=binary)
    try:
        slots = asyncio.run(total_slots(servers))
    finally:
        for server in servers:
            server.stop()
    # The servers (started per strategy) on a CPU each and the client beside them, or the
    # servers on the first CPU and the client on the others.
    with pinned(None if SERVER_PER_CPU else client_cpus()):
        for strategy in STRATEGIES:
            outcomes[strategy] = run_strategy(
                model, out, strategy, w, binary=binary, max_in_flight=cap
            )
            o = outcomes[strategy]
            print(f"{strategy}: {len(o.calls)} calls, hit {o.hit_ratio:.3f}, "
                  f"TTFT p50 {o.ttft_ms(0.5):.1f} ms", flush=True)  # fmt: skip
    _dump(out / "calls.json", outcomes)
    print(f"server logs and calls.json in {out}")
    missed = report(outcomes, w, slots)
    if missed:
        print(f"\n{len(missed)} MISSED:\n  " + "\n  ".join(missed))
    else:
        print("\nall targets met")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
