"""The sampler process: a ``SamplerSet`` on a thread of its own interpreter, so that scraping
and parsing never hold the bench's GIL (``SamplerSet(process=True)`` starts and drives it).

The bench writes length-prefixed pickled frames to its stdin, it answers on its stdout:

- ``("start", sys_path, pickled (samplers, interval_s))`` -> ``("ready", pid, CPU seconds
  so far)`` after the first reading, or ``("error", why)``;
- ``("clock", n)`` -> ``("done", n, time.monotonic_ns())``; ``("mark", n)`` -> a reading of
  every sampler, then ``("done", n, None)``;
- ``("stop", n)`` or the end of stdin -> the closing reading, then
  ``("done", n, ([series as dicts], CPU seconds of this process))``, and it exits.

It runs at a lower CPU priority where the OS has one (nice 10), ignores the terminal's
Ctrl-C (the bench stops it), and sends anything printed to stderr, never into the frames.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

__all__ = ["command", "main", "popen_options", "read_frame", "write_frame"]

_HEADER = struct.Struct(">I")
#: Lower priority: the sampler yields the CPU to the bench (and a local server) it observes.
NICENESS = 10


def write_frame(stream: IO[bytes], message: object) -> None:
    """Write one pickled message, length first, and flush."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(stream: IO[bytes]) -> Any:
    """The next message, or ``None`` at the end of the stream."""
    header = _read_exactly(stream, _HEADER.size)
    if header is None:
        return None
    body = _read_exactly(stream, _HEADER.unpack(header)[0])
    if body is None:
        raise EOFError("the stream ended inside a frame")
    return pickle.loads(body)


def command() -> list[str]:
    """The command line that starts a sampler process with this interpreter and library."""
    root = str(Path(__file__).resolve().parents[2])  # the folder holding shared_ollama/
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from shared_ollama.bench.sampler_process import main; sys.exit(main())"
    )
    return [sys.executable, "-c", code, root]


def popen_options() -> dict[str, Any]:
    """Its own session (POSIX) or process group (Windows): the terminal's Ctrl-C reaches the
    bench only, which then collects the readings before stopping the process."""
    if os.name == "nt":
        return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
    return {"start_new_session": True}


def _detach_stdout() -> IO[bytes]:
    # The frames get the original stdout; fd 1 and sys.stdout become stderr, so a stray
    # print (or a C library's) cannot corrupt them.
    frames = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return frames


def _lower_priority() -> None:
    if hasattr(os, "nice"):
        with contextlib.suppress(OSError):
            os.nice(NICENESS)


def main() -> int:
    """Serve one bench: start, marks, stop (see the module docstring)."""
    out = _detach_stdout()
    inp = sys.stdin.buffer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _lower_priority()
    start = read_frame(inp)
    if start is None or start[0] != "start":
        return 2
    _, sys_path, payload = start
    # Before unpickling: the samplers' classes may live where only the bench's path finds.
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    try:
        from .samplers import SamplerSet

        samplers, interval_s = pickle.loads(payload)
        sampler_set = SamplerSet(samplers, interval_s)
        sampler_set.start()
    except Exception as exc:
        write_frame(out, ("error", f"{type(exc).__name__}: {exc}"))
        return 1
    write_frame(out, ("ready", os.getpid(), time.process_time()))
    while True:
        message = read_frame(inp)
        if message is None or message[0] == "stop":
            break
        what, ident = message
        if what == "mark":
            sampler_set.sample_now()
            write_frame(out, ("done", ident, None))
        elif what == "clock":
            write_frame(out, ("done", ident, time.monotonic_ns()))
    series = [one.model_dump() for one in sampler_set.stop()]
    if message is not None:
        write_frame(out, ("done", message[1], (series, time.process_time())))
    return 0
