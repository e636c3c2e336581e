"""An *instant* loopback server: canned Ollama/OpenAI replies and streams, nothing computed.

For measuring clients, not servers: the bench's ``selftest`` (the driver's own ceiling),
``benchmarks/overhead.py`` and the calls-per-request guards. Plain asyncio and the standard
library, HTTP/1.1 keep-alive; a stream (``"stream": true`` in the body) is written whole in
one go: ``max_tokens`` (or ``options.num_predict``) one-token chunks, then the usage chunk
and ``[DONE]`` for OpenAI, the final ``done`` line for Ollama. Replies are cached by
(path, stream, tokens), so a request costs a head parse and a small ``json.loads``.

``python -m shared_ollama.testing.instant [--port N] [--cpus 0,1]`` prints its port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["MESSAGES", "MODEL", "make_handler", "serve"]

MODEL = "bench-model"
MESSAGES = [{"role": "user", "content": "one two three"}]
_DEFAULT_TOKENS = 16

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
_REPLIES: dict[bytes, dict[str, Any]] = {
    b"/api/chat": _OLLAMA_CHAT,
    b"/v1/chat/completions": _OPENAI_CHAT,
    b"/api/version": {"version": "0.9.0"},
    b"/api/tags": {"models": [{"name": MODEL, "model": MODEL, "size": 1}]},
    b"/api/ps": {"models": []},
    b"/v1/models": {"object": "list", "data": [{"id": MODEL, "object": "model"}]},
}
_STREAMS = (b"/v1/completions", b"/v1/chat/completions", b"/api/chat", b"/api/generate")


def _response(body: dict[str, Any] | None) -> bytes:
    if body is None:
        return b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
    data = json.dumps(body).encode()
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(data)}"
    return head.encode() + b"\r\n\r\n" + data


def _chunked(content_type: str, parts: list[bytes]) -> bytes:
    head = f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked"
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
    return head.encode() + b"\r\n\r\n" + body + b"0\r\n\r\n"


def _stream(path: bytes, tokens: int) -> bytes:
    """A whole stream of ``tokens`` one-token chunks, as the server of ``path`` sends it."""
    if path.startswith(b"/v1/"):
        chat = path == b"/v1/chat/completions"
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> bytes:
            data = {"id": "cmpl-1", "object": obj, "created": 1767225600, "model": MODEL}
            data["choices"] = [] if choice is None else [choice]
            if usage is not None:
                data["usage"] = usage
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        def piece(i: int) -> dict[str, Any]:
            last = "length" if i == tokens - 1 else None
            if chat:
                return {"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": last}
            return {"index": 0, "text": f" t{i}", "finish_reason": last}

        usage = {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": tokens + 3}
        events = [event(piece(i)) for i in range(tokens)]
        events += [event(None, usage), b"data: [DONE]\n\n"]
        return _chunked("text/event-stream", events)
    chat = path == b"/api/chat"
    lines = []
    for i in range(tokens):
        line: dict[str, Any] = {"model": MODEL, "created_at": "2026-01-01T00:00:00Z"}
        if chat:
            line["message"] = {"role": "assistant", "content": f" t{i}"}
        else:
            line["response"] = f" t{i}"
        line["done"] = False
        lines.append(json.dumps(line).encode() + b"\n")
    final: dict[str, Any] = {"model": MODEL, "created_at": "2026-01-01T00:00:00Z", "done": True}
    if chat:
        final["message"] = {"role": "assistant", "content": ""}
    else:
        final["response"] = ""
    final.update(done_reason="length", prompt_eval_count=3, eval_count=tokens)
    lines.append(json.dumps(final).encode() + b"\n")
    return _chunked("application/x-ndjson", lines)


def _tokens(body: dict[str, Any]) -> int:
    options = body.get("options")
    n = body.get("max_tokens") or body.get("max_completion_tokens")
    if n is None and isinstance(options, dict):
        n = options.get("num_predict")
    return n if isinstance(n, int) and 0 < n <= 100_000 else _DEFAULT_TOKENS


def make_handler() -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """The connection handler: canned replies by path, keep-alive, until the peer closes."""
    canned = {path: _response(body) for path, body in _REPLIES.items()}
    streams: dict[tuple[bytes, int], bytes] = {}
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
                data = await reader.readexactly(length) if length else b""
                if path in _STREAMS and b'"stream"' in data:
                    body = json.loads(data)
                    if body.get("stream") is True:
                        key = (path, _tokens(body))
                        reply = streams.get(key)
                        if reply is None:
                            reply = streams[key] = _stream(*key)
                        writer.write(reply)
                        continue
                writer.write(canned.get(path, missing))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, ValueError):
            pass
        finally:
            writer.close()

    return handle


async def serve(port: int = 0, *, ready: Callable[[int], None] | None = None) -> None:
    """Serve on 0.0.0.0:``port`` until cancelled; ``ready`` gets the bound port."""
    server = await asyncio.start_server(make_handler(), "0.0.0.0", port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready(bound)
    async with server:
        await server.serve_forever()


def main() -> None:
    """``python -m shared_ollama.testing.instant``: print the port, serve until killed."""
    parser = argparse.ArgumentParser(description="instant loopback LLM server (canned replies)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cpus", help="pin the server to these CPUs (comma-separated)")
    args = parser.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    asyncio.run(serve(args.port, ready=lambda p: print(p, flush=True)))


if __name__ == "__main__":
    main()
