"""Would a heavier model let ``benchmarks/affinity.py`` halve the TTFT p50? What llama-server
prefills for each kind of turn of that workload, for generated models of several sizes.

Run from the repository root: ``python benchmarks/llama_prefill_shapes.py [--sessions 5]``.

Why it matters: with two servers a cache-blind policy (least-loaded, round-robin) sends about
half of the later turns back to the server that holds the conversation, by chance. Those are
full hits, as fast as affinity's, and with the first turns (a fifth of the calls, the same for
every policy) they make up more than half of its calls. So whenever a cache-blind run sends at
least 3/8 of its later turns home, its median call is a first turn, and the p50 cut against
affinity (whose median call is a hit) is about *first turn / hit*, not *miss / hit*. This
script measures those prefills with ``affinity.py``'s header (its lengths, flags and model
alias) for each model shape:

- first: a session's first turn (its own document after a system prompt another session
  already sent);
- hit: a later turn on the server that holds the conversation (the previous reply was decoded
  there: only the new message and the template are new), what affinity pays;
- stale: the same turn on a server that saw the conversation one turn earlier and not the
  reply since, what a cache-blind policy pays when it lands away from home.

Two llama-servers (``-c 4096 -np 2 -t 1``, llama.cpp's defaults otherwise) on the first CPU,
the client on the others; one call at a time, so nothing queues. Times are the server's own
``prompt_ms`` (medians over the sessions' turns) and decode ms a token. The last column adds a
fixed ``--rest`` per call (TTFT at the client minus ``prompt_ms``: ~4 ms in ``affinity.py``'s
runs, see ``llama_fixed_cost.py``) to first and hit. In ``affinity.py``'s concurrent run the
cache-blind policies' larger prefills also delay the calls beside them (first turns included),
which one call at a time cannot show: read the column as the cut from prefill alone.
Prints; asserts nothing. ``python benchmarks/affinity.py --shape 512x2`` runs the workload on
one of these shapes.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.affinity import (
    CTX_SIZE,
    DOCUMENT_TOKENS,
    MODEL,
    PARALLEL,
    REPLY_TOKENS,
    SYSTEM_TOKENS,
    TURNS,
    USER_TOKENS,
    _text,
    parse_shape,
    start_servers,
)
from tests.realservers._process import pinned
from tests.realservers.llama_server import TINY, make_tiny_gguf

#: The test suite's model first, then wider and deeper ones (f32 weights, letters variant),
#: each the model ``affinity.py --shape`` runs under that name.
SHAPES = (TINY, *map(parse_shape, ("256x2", "512x1", "512x2", "1024x2")))

Messages = list[dict[str, str]]


@dataclass
class Prefills:
    """The server's ``prompt_ms`` (and ``prompt_n``) per kind of turn, and decode speed."""

    first: list[tuple[int, float]] = field(default_factory=list)
    hit: list[tuple[int, float]] = field(default_factory=list)
    stale: list[tuple[int, float]] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)


def _call(http: httpx.Client, messages: Messages, max_tokens: int) -> tuple[dict[str, Any], str]:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    reply = http.post("/v1/chat/completions", json=body).raise_for_status().json()
    return reply["timings"], reply["choices"][0]["message"]["content"]


def _sample(timings: dict[str, Any]) -> tuple[int, float]:
    return int(timings["prompt_n"]), float(timings["prompt_ms"])


def measure(home: httpx.Client, away: httpx.Client, sessions: int, seed: int) -> Prefills:
    """``sessions`` conversations of ``TURNS`` turns on ``home``; ``away`` sees each one a
    turn late (the prompt before the last reply, one token decoded)."""
    rng = random.Random(seed)
    out = Prefills()
    for _ in range(sessions):
        system = {"role": "system", "content": _text(rng, SYSTEM_TOKENS)}
        sibling = [system, {"role": "user", "content": _text(rng, DOCUMENT_TOKENS)}]
        _call(home, sibling, 1)  # another session under the same system prompt came first
        messages = [system, {"role": "user", "content": _text(rng, DOCUMENT_TOKENS)}]
        timings, reply = _call(home, messages, REPLY_TOKENS)
        out.first.append(_sample(timings))
        out.decode_ms.append(float(timings["predicted_per_token_ms"]))
        _call(away, messages, 1)  # the other server sees the first turn, not its reply
        for _turn in range(TURNS - 1):
            messages = [
                *messages,
                {"role": "assistant", "content": reply},
                {"role": "user", "content": _text(rng, USER_TOKENS)},
            ]
            timings, reply = _call(home, messages, REPLY_TOKENS)
            out.hit.append(_sample(timings))
            # The other server has the conversation up to the last prompt: the reply since
            # and the new message are uncached there (it then holds this prompt in turn).
            out.stale.append(_sample(_call(away, messages, 1)[0]))
    return out


def main() -> None:
    """For each shape: write the model, start two servers, measure, print one row."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=5, help="conversations per shape")
    parser.add_argument("--rest", type=float, default=4.0, help="ms a call costs besides prefill")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    client_cpus = frozenset(cpus[1:] or cpus)
    out = Path(tempfile.mkdtemp(prefix="llama-prefill-shapes-"))
    print(f"two llama-servers on CPU {cpus[0]}: -c {CTX_SIZE} -np {PARALLEL} -t 1 (else defaults)")
    print(
        f"{args.sessions} sessions x {TURNS} turns: system {SYSTEM_TOKENS}, document "
        f"{DOCUMENT_TOKENS}, messages {USER_TOKENS}, replies {REPLY_TOKENS} tokens\n"
    )
    head = f"{'shape':<16}{'first':>14}{'hit':>14}{'stale':>15}{'first/hit':>11}"
    print(f"{head}{'stale/hit':>11}{'decode':>9}{'cut at p50':>12}")
    for shape in SHAPES:
        model = make_tiny_gguf(
            out / f"letters-{shape.embd}x{shape.layers}.gguf", emit="letters", shape=shape
        )
        logs = out / f"{shape.embd}x{shape.layers}"
        servers = start_servers(model, logs, cpus=frozenset(cpus[:1]))
        try:
            with (
                pinned(client_cpus),
                httpx.Client(base_url=servers[0].url, timeout=120) as home,
                httpx.Client(base_url=servers[1].url, timeout=120) as away,
            ):
                got = measure(home, away, args.sessions, seed=14)
        finally:
            for server in servers:
                server.stop()
        first, hit, stale = (
            (statistics.median(n for n, _ in rows), statistics.median(ms for _, ms in rows))
            for rows in (got.first, got.hit, got.stale)
        )
        cut = (first[1] + args.rest) / (hit[1] + args.rest)
        cells = [f"{ms:6.1f} ({n:.0f})" for n, ms in (first, hit, stale)]
        print(
            f"{shape.label:<16}{cells[0]:>14}{cells[1]:>14}{cells[2]:>15}"
            f"{first[1] / hit[1]:>10.2f}x{stale[1] / hit[1]:>10.2f}x"
            f"{statistics.median(got.decode_ms):>9.2f}{cut:>11.2f}x",
            flush=True,
        )
    print(
        "\nprefill: the server's prompt_ms, median, ms (prompt tokens it prefilled); decode: ms a "
        f"token; cut at p50: (first + {args.rest:g}) / (hit + {args.rest:g}), the p50 cut "
        "when a cache-blind policy sends >= 3/8 of later turns home"
    )


if __name__ == "__main__":
    main()
