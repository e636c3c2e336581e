"""``--simulate``: a pool of in-process FakeEngines (one per protocol) and a demo scenario.

Slots and per-active-generation slowdowns are set so that latency grows and throughput
saturates with concurrency, as on real servers; the whole demo takes well under a minute.
``SimulationSpec`` picks other engines and gives them a prefix cache (routing workloads).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from ..config import Endpoint

if TYPE_CHECKING:
    from .scenario import SimulationSpec

__all__ = [
    "ROUTING_SIMULATION",
    "SIM_MODEL",
    "routing_defaults",
    "simulate_defaults",
    "simulated_pool",
]

SIM_MODEL = "fake-llama"


# Ollama's default 4 parallel slots and a model load; a vLLM-like server batching 32
# sequences with a small per-sequence slowdown; TGI in between. Columns: kind, slots,
# ttft_base_s, ttft_per_prompt_token_s, itl_s, itl_per_active_s, load_s.
_ENGINES: tuple[
    tuple[Literal["ollama", "openai", "tgi"], int, float, float, float, float, float], ...
] = (
    ("ollama", 4, 0.030, 0.0001, 0.012, 0.003, 0.3),
    ("openai", 32, 0.020, 0.00005, 0.008, 0.0004, 0.0),
    ("tgi", 16, 0.025, 0.00008, 0.010, 0.0008, 0.0),
)


#: ``--simulate`` with a routing workload and no [simulation] of its own: four vLLM-like
#: engines with a prefix cache each (about 20 prompts of 400 tokens), prefill long enough
#: (0.2 ms a token) for cache hits to show in TTFT.
ROUTING_SIMULATION: dict[str, Any] = {
    "engines": ["openai"] * 4,
    "prefix_cache_tokens": 8192,
    "prefix_block_tokens": 16,
    "prefill_s_per_token": 0.0002,
}


@contextlib.contextmanager
def simulated_pool(spec: SimulationSpec | None = None) -> Iterator[list[Endpoint]]:
    """Start the FakeEngines (default: one per protocol, no cache) on 127.0.0.1; yield their
    endpoints; stop them. Every start is a fresh engine: empty caches, zero counters."""
    try:
        from ..testing import FakeEngine, TimingModel
    except ImportError as exc:  # starlette/uvicorn are the "testing" extra
        raise RuntimeError(
            f"--simulate needs the FakeEngine: pip install 'shared-ollama[bench]' ({exc})"
        ) from None
    rows = {row[0]: row for row in _ENGINES}
    kinds = list(spec.engines) if spec is not None else [row[0] for row in _ENGINES]
    seen: Counter[str] = Counter()
    with contextlib.ExitStack() as stack:
        endpoints = []
        for kind in kinds:
            _, slots, base, per_prompt, itl, per_active, load = rows[kind]
            cache: dict[str, Any] = {}
            if spec is not None:
                if spec.prefill_s_per_token is not None:
                    per_prompt = spec.prefill_s_per_token
                cache = {
                    "prefix_cache_tokens": spec.prefix_cache_tokens,
                    "prefix_block_tokens": spec.prefix_block_tokens,
                }
            timing = TimingModel(
                ttft_base_s=base,
                ttft_per_prompt_token_s=per_prompt,
                itl_s=itl,
                itl_per_active_s=per_active,
                load_s=load,
                **cache,
            )
            engine = FakeEngine(kind=kind, models=(SIM_MODEL,), timing=timing, slots=slots)
            stack.enter_context(engine)
            seen[kind] += 1
            name = f"sim-{kind}" if seen[kind] == 1 else f"sim-{kind}-{seen[kind]}"
            endpoints.append(Endpoint(engine.url, kind=kind, name=name))
        yield endpoints


def routing_defaults(kind: Literal["prefix", "sessions"]) -> dict[str, Any]:
    """A routing workload's scenario values (``--workload``): its workload table, one
    closed-loop schedule and no warm-up (every run starts from the same cold caches)."""
    if kind == "prefix":
        workload: dict[str, Any] = {
            "name": "prefix",
            "prompt_tokens": "uniform:32:96",
            "max_tokens": "uniform:8:24",
            # 32 x 400 words: more than one engine's cache (ROUTING_SIMULATION) holds, a
            # quarter of it less, so only prefix-keeping routing keeps them cached.
            "prefix": {"prefixes": 32, "users": 4, "prefix_tokens": 400},
        }
        schedule: dict[str, Any] = {"kind": "concurrency", "levels": [16], "requests": 256}
    else:
        workload = {
            "name": "sessions",
            "prompt_tokens": "uniform:32:96",
            "max_tokens": "uniform:16:48",
            "sessions": {
                "count": 16,
                "turns": 6,
                "system_tokens": 200,
                "systems": 4,
                "think_s": "exp:0.2:1",
            },
        }
        schedule = {"kind": "concurrency", "levels": [16]}  # every session at once
    return {"workloads": [workload], "schedules": [schedule], "warmup": {"requests": 0}}


def simulate_defaults(routing: Literal["prefix", "sessions"] | None = None) -> dict[str, Any]:
    """Scenario values for the demo (flags and a scenario file still override them); with
    a routing workload, that workload on cached vLLM-like engines (``ROUTING_SIMULATION``)."""
    if routing is not None:
        return {
            "name": f"simulate-{routing}",
            "model": SIM_MODEL,
            **routing_defaults(routing),
            "simulation": dict(ROUTING_SIMULATION),
            "slo": {"ttft_ms": 250, "tpot_ms": 40},
        }
    return {
        "name": "simulate",
        "model": SIM_MODEL,
        "workloads": [
            {
                "name": "chat",
                "weight": 3,
                "operation": "chat",
                "prompt_tokens": "normal:200:80:16:600",
                "max_tokens": "normal:48:16:8:120",
            },
            {
                "name": "generate",
                "weight": 1,
                "operation": "generate",
                "prompt_tokens": "uniform:32:128",
                "max_tokens": "uniform:16:64",
            },
        ],
        "schedules": [{"kind": "concurrency", "levels": [1, 4, 16, 64], "duration_s": 6.0}],
        "warmup": {"requests": 6, "concurrency": 3},
        "slo": {"ttft_ms": 250, "tpot_ms": 40},
    }
