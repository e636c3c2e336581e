"""An *instant* loopback server: canned Ollama/OpenAI replies, nothing computed.

For measuring clients, not servers (``benchmarks/overhead.py``, the calls-per-request
guard): a few dozen lines of asyncio in its own process, HTTP/1.1 keep-alive, the same
bytes for every request to a path. ``python -m tests.instant_server`` prints its port.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from typing import Any

from tests.realservers._process import server_cpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "bench-model"
MESSAGES = [{"role": "user", "content": "one two three"}]

_OLLAMA_CHAT = {
    "model": MODEL,
    "created_at": "2026-01-01T00:00:00Z",
    "message": {"role": "assistant", "content": "four five six"},
    "done": True,
    "done_reason": "stop",
    "total_duration": 1000,
    "load_duration": 10,
    "prompt_eval_count": 3,
    "prompt_eval_duration": 100,
    "eval_count": 3,
    "eval_duration": 500,
}
_OPENAI_CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1767225600,
    "model": MODEL,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "four five six"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
}
_REPLIES = {
    b"/api/chat": _OLLAMA_CHAT,
    b"/v1/chat/completions": _OPENAI_CHAT,
    b"/api/version": {"version": "0.9.0"},
    b"/api/tags": {"models": [{"name": MODEL, "model": MODEL, "size": 1}]},
    b"/api/ps": {"models": []},
}


# -- the instant server ----------------------------------------------------------------------
def _response(body: dict[str, Any] | None) -> bytes:
    if body is None:
        return b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
    data = json.dumps(body).encode()
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(data)}"
    return head.encode() + b"\r\n\r\n" + data


def make_handler() -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """The connection handler: canned replies by path, keep-alive, until the peer closes."""
    canned = {path: _response(body) for path, body in _REPLIES.items()}
    missing = _response(None)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, _, rest = head.partition(b"\r\n")
                path = line.split(b" ")[1].split(b"?")[0]
                length = 0
                for header in rest.lower().split(b"\r\n"):
                    if header.startswith(b"content-length:"):
                        length = int(header[15:])
                if length:
                    await reader.readexactly(length)
                writer.write(canned.get(path, missing))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    return handle


async def _serve(port: int) -> None:
    if cpus := os.environ.get("OVERHEAD_SERVER_CPUS"):
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    server = await asyncio.start_server(make_handler(), "0.0.0.0", port, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def start_server(stack: ExitStack) -> int:
    """The instant server in its own process, on the CPU the real servers get (the client
    keeps the others: see ``tests/realservers/_process.py``); returns its port."""
    cpus = server_cpus()
    env = {**os.environ, "OVERHEAD_SERVER_CPUS": ",".join(map(str, sorted(cpus or ())))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.instant_server"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    stack.callback(proc.wait, 10)
    stack.callback(proc.terminate)
    assert proc.stdout is not None
    return int(proc.stdout.readline())


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
