"""``--simulate``: a pool of in-process FakeEngines (one per protocol) and a demo scenario.

Slots and per-active-generation slowdowns are set so that latency grows and throughput
saturates with concurrency, as on real servers; the whole demo takes well under a minute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

from ..config import Endpoint

__all__ = ["SIM_MODEL", "simulate_defaults", "simulated_pool"]

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


@contextlib.contextmanager
def simulated_pool() -> Iterator[list[Endpoint]]:
    """Start one FakeEngine per protocol on 127.0.0.1; yield their endpoints; stop them."""
    try:
        from ..testing import FakeEngine, TimingModel
    except ImportError as exc:  # starlette/uvicorn are the "testing" extra
        raise RuntimeError(
            f"--simulate needs the FakeEngine: pip install 'shared-ollama[bench]' ({exc})"
        ) from None
    with contextlib.ExitStack() as stack:
        endpoints = []
        for kind, slots, base, per_prompt, itl, per_active, load in _ENGINES:
            timing = TimingModel(
                ttft_base_s=base,
                ttft_per_prompt_token_s=per_prompt,
                itl_s=itl,
                itl_per_active_s=per_active,
                load_s=load,
            )
            engine = FakeEngine(kind=kind, models=(SIM_MODEL,), timing=timing, slots=slots)
            stack.enter_context(engine)
            endpoints.append(Endpoint(engine.url, kind=kind, name=f"sim-{kind}"))
        yield endpoints


def simulate_defaults() -> dict[str, Any]:
    """Scenario values for the demo (flags and a scenario file still override them)."""
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
