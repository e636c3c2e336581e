"""Deadlines hold against a server that trickles bytes, in both clients.

httpx's timeouts bound each socket read: a byte every 0.25 s never trips a 1.5 s read timeout.
The clients bound the whole phase instead (async: ``asyncio.timeout``; sync: a watchdog that
shuts the socket down), so a trickled head, body or stream start ends in ``Timeout`` at the
phase's deadline, and ``total_s`` binds when it is the nearer one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from shared_ollama import Endpoint, RetryPolicy, Timeout, Timeouts
from tests.hostile import HostileServer, http_reply

GAP_S = 0.25  # between two trickled bytes: far below every per-read timeout here
LISTING = http_reply(200, b'{"models": []}')
LINE = (
    b'{"model":"m","created_at":"2024-01-01T00:00:00Z",'
    b'"message":{"role":"assistant","content":"hi"},"done":false}\n'
)


def trickle(data: bytes, prefix: bytes = b"") -> Iterator[bytes]:
    if prefix:
        yield prefix
    for byte in data:
        time.sleep(GAP_S)  # the hostile server's own pacing, not test synchronisation
        yield bytes([byte])


def head(length: int | None, content_type: str = "application/json") -> bytes:
    lines = ["HTTP/1.1 200 OK", f"Content-Type: {content_type}", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


BODY = b'{"model":"m","message":{"role":"assistant","content":"hi"},"done":true}'
CASES = {
    "head": lambda: trickle(head(len(BODY)) + BODY),
    "body": lambda: trickle(BODY, prefix=head(len(BODY))),
    "stream-start": lambda: trickle(LINE * 4, prefix=head(None, "application/x-ndjson")),
}


async def run(make_driver: Any, case: str, timeouts: Timeouts) -> tuple[BaseException, float]:
    def respond(method: str, path: str) -> bytes | Iterator[bytes]:
        return LISTING if path.startswith("/api/") and method == "GET" else CASES[case]()

    with HostileServer(respond) as server:
        endpoint = Endpoint(server.url, kind="ollama", models={"m": "m"})
        retry = RetryPolicy(max_attempts=1)
        async with make_driver([endpoint], timeouts=timeouts, retry=retry) as d:
            started = time.monotonic()
            messages = [{"role": "user", "content": "hi"}]
            if case == "stream-start":
                _, error = await d.stream_collect("chat", model="m", messages=messages)
            else:
                error = None
                try:
                    await d.call("chat", model="m", messages=messages)
                except Exception as exc:
                    error = exc
            elapsed = time.monotonic() - started
    assert error is not None
    return error, elapsed


@pytest.mark.parametrize("case", list(CASES))
async def test_trickle_ends_at_the_first_chunk_deadline(make_driver: Any, case: str) -> None:
    timeouts = Timeouts(connect_s=2, first_chunk_s=1.5, between_chunks_s=1.5, total_s=60)
    error, elapsed = await run(make_driver, case, timeouts)
    assert isinstance(error, Timeout), repr(error)
    assert error.phase == "first_chunk", repr(error)
    # The whole trickle would take far longer (over 25 s); the deadline cut it short.
    assert elapsed < 5 * timeouts.first_chunk_s, elapsed


@pytest.mark.parametrize("case", ["head", "body"])
async def test_trickle_ends_at_the_total_deadline_when_nearer(make_driver: Any, case: str) -> None:
    timeouts = Timeouts(connect_s=2, first_chunk_s=60, between_chunks_s=60, total_s=1.5)
    error, elapsed = await run(make_driver, case, timeouts)
    assert isinstance(error, Timeout), repr(error)
    assert error.phase == "total", repr(error)
    assert elapsed < 10, elapsed
