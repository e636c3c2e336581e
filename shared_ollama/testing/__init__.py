"""Test doubles for inference servers: ``FakeEngine`` speaks Ollama's, vLLM's or TGI's protocol
over real HTTP on loopback, with a deterministic timing model and fault knobs.

Standalone: imports nothing else from ``shared_ollama``. Needs the ``testing`` extra
(starlette, uvicorn). See ``docs/fake_engine.md``.
"""

from ._calls import CallCounter
from ._engine import FakeEngine
from ._faults import Fault, Faults
from ._process import EngineProcess, engine_process
from ._stats import EngineStats
from ._timing import TimingModel

__all__ = [
    "CallCounter",
    "EngineProcess",
    "EngineStats",
    "FakeEngine",
    "Fault",
    "Faults",
    "TimingModel",
    "engine_process",
]
