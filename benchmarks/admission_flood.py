"""What a call costs the client while many calls wait for a few slots: CPU per call as the
number of waiting calls grows, side by side in one run.

Run: ``python benchmarks/admission_flood.py [--calls 50 200 800] [--slots 4]``.

One FakeEngine (Ollama protocol, zero latency, in this process) behind an endpoint capped at
``--slots`` calls in flight; each level sends its ``--calls`` chats at once, so all but
``--slots`` of them wait in admission. Prints, per level, the client's CPU time per call
(this process: the FakeEngine's share is the same per call at every level), the admission
decisions per call and the wall time, then the CPU per call of the largest level over the
smallest: near 1 when a release wakes one waiter, growing with the queue when it wakes all
(docs/admission.md).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from shared_ollama import Endpoint, SharedClient
from shared_ollama.config import HealthPolicy, UsageConfig
from shared_ollama.testing import FakeEngine, TimingModel

MODEL = "fake-llama"
MESSAGES = [{"role": "user", "content": "hi"}]
INSTANT = TimingModel(ttft_base_s=0.0, ttft_per_prompt_token_s=0.0, itl_s=0.0,
                      default_max_tokens=2)  # fmt: skip


async def level(calls: int, slots: int) -> tuple[float, float, float]:
    """(CPU seconds per call, admission decisions per call, wall seconds) for one level."""
    with FakeEngine(kind="ollama", models=(MODEL,), timing=INSTANT, slots=slots) as engine:
        ep = Endpoint(engine.url, kind="ollama", models=[MODEL], max_in_flight=slots)
        async with SharedClient(endpoints=[ep], usage=UsageConfig(enabled=False),
                                health=HealthPolicy(enabled=False)) as client:  # fmt: skip
            await asyncio.gather(*(client.chat(MODEL, MESSAGES) for _ in range(slots * 4)))
            adm = client._pool.admission
            looks = adm.decisions
            cpu, wall = time.process_time(), time.perf_counter()
            await asyncio.gather(*(client.chat(MODEL, MESSAGES) for _ in range(calls)))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            looks = adm.decisions - looks
    return cpu / calls, looks / calls, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[50, 200, 800])
    parser.add_argument("--slots", type=int, default=4)
    args = parser.parse_args()
    print(f"{'waiting calls':>14}{'CPU ms/call':>13}{'looks/call':>12}{'wall s':>9}")
    per_call = []
    for calls in args.calls:
        cpu, looks, wall = asyncio.run(level(calls, args.slots))
        per_call.append(cpu)
        print(f"{calls:>14}{cpu * 1e3:>13.2f}{looks:>12.1f}{wall:>9.2f}")
    print(f"CPU per call, {args.calls[-1]} calls over {args.calls[0]}: "
          f"{per_call[-1] / per_call[0]:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
