"""A FakeEngine in a process of its own (``python -m shared_ollama.testing``), so that its
timing does not share a GIL with the client under test."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ._runtime import Kind
from ._timing import TimingModel

__all__ = ["EngineProcess", "engine_process"]


@dataclasses.dataclass(frozen=True)
class EngineProcess:
    """The running engine: its URL and its process."""

    url: str
    process: subprocess.Popen[str]


@contextmanager
def engine_process(
    kind: Kind = "ollama",
    *,
    timing: TimingModel | None = None,
    models: Sequence[str] = ("fake-llama",),
    slots: int = 4,
) -> Iterator[EngineProcess]:
    """Start the engine, yield it once it serves; terminate it (and wait) on exit. Every
    field of ``timing`` is passed, so the engine keeps exactly that model."""
    timing = timing or TimingModel()
    argv = [sys.executable, "-m", "shared_ollama.testing", "--kind", kind, "--port", "0",
            "--slots", str(slots)]  # fmt: skip
    for model in models:
        argv += ["--model", model]
    for f in dataclasses.fields(timing):
        argv += [f"--{f.name.replace('_', '-')}", str(getattr(timing, f.name))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()  # printed once serving
        if not url:
            raise RuntimeError(f"the FakeEngine process exited ({proc.wait(10)}) before serving")
        yield EngineProcess(url, proc)
    finally:
        proc.terminate()
        proc.wait(30)
