"""The instant loopback server (``shared_ollama.testing.instant``) in its own process, on the
CPU the real servers get: for measuring clients (``benchmarks/overhead.py``, the
calls-per-request guards)."""

from __future__ import annotations

import subprocess
import sys
from contextlib import ExitStack

from shared_ollama.testing.instant import MESSAGES, MODEL, make_handler
from tests.realservers._process import server_cpus

__all__ = ["MESSAGES", "MODEL", "make_handler", "start_server"]


def start_server(stack: ExitStack) -> int:
    """The instant server in its own process, on the CPU the real servers get (the client
    keeps the others: see ``tests/realservers/_process.py``); returns its port."""
    command = [sys.executable, "-m", "shared_ollama.testing.instant"]
    if cpus := server_cpus():
        command += ["--cpus", ",".join(map(str, sorted(cpus)))]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    stack.callback(proc.wait, 10)
    stack.callback(proc.terminate)
    assert proc.stdout is not None
    return int(proc.stdout.readline())
