"""A quiet project's TTFT beside a project flooding at 10x its rate, with admission on and off.

Run: ``python benchmarks/fairness.py [--seconds 15] [--slots 4] [--quiet-rate 4]``.

One FakeEngine (Ollama protocol, its own process) with ``--slots`` parallel slots; the client
caps the endpoint at the same ``max_in_flight``, so calls beyond it wait in the client, where
admission orders them. The quiet project streams at a steady ``--quiet-rate`` calls a second
(class ``interactive``); the flood sends 10x that (class ``batch``: sheddable, leaving one
slot of headroom, waiting at most 2 s) — more than the engine can serve. ``--quiet-class``
and ``--flood-class`` change the classes (``standard`` for both: fair share alone). Three runs of
``--seconds`` each: the quiet project alone, beside the flood with admission on, and beside
the flood with admission off (waiters race for freed slots). Prints the quiet project's
TTFT p50/p99 per run and the ratio to the run alone; exits 1 when the ratio with admission
on is above ``--target`` (1.5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from shared_ollama import Endpoint, SharedClient
from shared_ollama.config import (
    AdmissionPolicy,
    HealthPolicy,
    PoolConfig,
    ServiceClass,
    Timeouts,
    UsageConfig,
)
from shared_ollama.errors import Overloaded, SharedOllamaError
from shared_ollama.records import CallRecord
from shared_ollama.testing import TimingModel, engine_process

MODEL = "fake-llama"
CLASSES = {
    "interactive": ServiceClass(rank=0),
    "standard": ServiceClass(rank=1),
    "batch": ServiceClass(rank=2, sheddable=True, headroom=1, max_wait_s=2.0),
}


@dataclass
class Run:
    """One scenario's outcome."""

    name: str
    quiet_ttft_s: list[float] = field(default_factory=list)
    flood_ok: int = 0
    flood_refused: int = 0
    flood_other: int = 0

    def p(self, q: float) -> float:
        xs = sorted(self.quiet_ttft_s)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def scenario(url: str, name: str, *, slots: int, seconds: float, quiet_rate: float,
                   flood: bool, admission: bool, quiet_class: str,
                   flood_class: str) -> Run:  # fmt: skip
    """Run one scenario; only quiet calls that completed count toward its TTFT."""
    run = Run(name)
    records: list[CallRecord] = []
    config = PoolConfig(admission=AdmissionPolicy(enabled=admission, classes=CLASSES))
    client = SharedClient(
        endpoints=[Endpoint(url, kind="ollama", models=[MODEL], max_in_flight=slots)],
        config=config,
        health=HealthPolicy(enabled=False),
        usage=UsageConfig(enabled=False),
        timeouts=Timeouts(total_s=60.0, first_chunk_s=60.0),
        listeners=[records.append],
    )
    messages = [{"role": "user", "content": "tell me something"}]

    async def call(project: str, cls: str) -> None:
        try:
            stream = await client.chat(model=MODEL, messages=messages, stream=True,
                                       project=project, service_class=cls)  # fmt: skip
            async for _ in stream:
                pass
        except Overloaded:
            run.flood_refused += project == "flood"
        except SharedOllamaError:
            run.flood_other += project == "flood"

    async with client:
        for _ in range(slots):  # warm the connections up
            await call("warmup", "interactive")
        records.clear()
        quiet: list[asyncio.Task[None]] = []
        floods: list[asyncio.Task[None]] = []
        loop = asyncio.get_running_loop()
        start = loop.time()
        q_every, f_every = 1.0 / quiet_rate, 1.0 / (10 * quiet_rate)
        q_next, f_next = start, start + f_every / 2
        while (now := loop.time()) < start + seconds:
            if now >= q_next:
                quiet.append(asyncio.create_task(call("quiet", quiet_class)))
                q_next += q_every
            if flood and now >= f_next:
                floods.append(asyncio.create_task(call("flood", flood_class)))
                f_next += f_every
            await asyncio.sleep(max(0.0, min(q_next, f_next if flood else q_next) - loop.time()))
        # The flood stops with the run: quiet calls still waiting then (admission off) get
        # their slot and count a TTFT that is a lower bound of what the flood cost them.
        for task in floods:
            task.cancel()
        await asyncio.gather(*floods, return_exceptions=True)
        await asyncio.gather(*quiet)
    for rec in records:
        if rec.project == "quiet" and rec.outcome == "ok" and rec.ttft_s is not None:
            run.quiet_ttft_s.append(rec.ttft_s)
        elif rec.project == "flood" and rec.outcome == "ok":
            run.flood_ok += 1
    return run


async def main_async(args: argparse.Namespace) -> list[Run]:
    # The engine in its own process: its timing unaffected by the client's GIL.
    timing = TimingModel(ttft_base_s=0.05, ttft_per_prompt_token_s=0, itl_s=0.01,
                         default_max_tokens=16)  # fmt: skip
    with engine_process(timing=timing, models=[MODEL], slots=args.slots) as engine:
        url = engine.url
        kw: dict[str, Any] = {"slots": args.slots, "seconds": args.seconds,
                              "quiet_rate": args.quiet_rate, "quiet_class": args.quiet_class,
                              "flood_class": args.flood_class}  # fmt: skip
        plan = [
            ("quiet alone", False, True),
            ("beside the flood, admission on", True, True),
            ("beside the flood, admission off", True, False),
        ]
        return [await scenario(url, name, flood=f, admission=a, **kw) for name, f, a in plan]


def main() -> int:
    """Run the three scenarios, print the table, judge the target."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each run")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--quiet-rate", type=float, default=4.0, help="quiet calls a second")
    parser.add_argument("--quiet-class", default="interactive", choices=sorted(CLASSES))
    parser.add_argument("--flood-class", default="batch", choices=sorted(CLASSES))
    parser.add_argument("--target", type=float, default=1.5, help="largest p99 ratio allowed")
    parser.add_argument("--json", action="store_true", help="print the runs as JSON too")
    args = parser.parse_args()
    began = time.monotonic()
    runs = asyncio.run(main_async(args))
    alone = runs[0].p(0.99)
    rates = f"{args.quiet_rate:g}/s {args.quiet_class}; flood: {10 * args.quiet_rate:g}/s"
    print(f"quiet: {rates} {args.flood_class}; engine: {args.slots} slots, TTFT 50 ms, "
          "16 tokens x 10 ms")  # fmt: skip
    head = f"{'run':34} {'quiet calls':>11} {'p50 ms':>8} {'p99 ms':>8} {'p99 ratio':>9}"
    print(head + f" {'flood ok/refused/other':>23}")
    for r in runs:
        ratio = r.p(0.99) / alone
        flood = f"{r.flood_ok}/{r.flood_refused}/{r.flood_other}"
        print(f"{r.name:34} {len(r.quiet_ttft_s):>11} {r.p(0.5) * 1e3:>8.1f} "
              f"{r.p(0.99) * 1e3:>8.1f} {ratio:>8.2f}x {flood:>23}")  # fmt: skip
    ratio_on = runs[1].p(0.99) / alone
    ok = ratio_on <= args.target and len(runs[1].quiet_ttft_s) > 0
    print(f"admission on: quiet TTFT p99 {ratio_on:.2f}x alone (target <= {args.target:g}x): "
          f"{'met' if ok else 'MISSED'}; {time.monotonic() - began:.0f} s in all")  # fmt: skip
    if args.json:
        print(json.dumps([{"run": r.name, "quiet_ttft_p50_s": r.p(0.5),
                           "quiet_ttft_p99_s": r.p(0.99), "quiet_calls": len(r.quiet_ttft_s),
                           "flood_ok": r.flood_ok, "flood_refused": r.flood_refused,
                           "flood_other": r.flood_other} for r in runs]))  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
