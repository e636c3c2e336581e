"""Deadlines hold against a server that trickles bytes, in both clients.

httpx's timeouts bound each socket read: a byte every 0.25 s never trips a 1.5 s read timeout.
The clients bound the whole phase instead (async: ``asyncio.timeout``; sync: a watchdog that
shuts the socket down), so a trickled head, body or stream start ends in ``Timeout`` at the
phase's deadline, and ``total_s`` binds when it is the nearer one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shared_ollama import Endpoint, RetryPolicy, Timeout, Timeouts
from tests.hostile import HostileServer, http_reply
from tests.realservers.fixtures import HOSTILE, report_line

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
    name = type(error).__name__
    client = "sync" if d.sync else "async"
    bounds = f"first_chunk_s={timeouts.first_chunk_s}, total_s={timeouts.total_s}"
    report_line(f"trickled {case} [{client}]: {name} after {elapsed:.2f} s ({bounds})", HOSTILE)
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


def test_an_operation_without_deadline_never_stops_the_watchdog() -> None:
    """A send or read with no deadline (timeouts set to None) is armed only for a close: it
    never enters the deadline heap, whose thread could not wait an infinite time (an
    ``OverflowError`` once killed it, and no later deadline rang)."""
    from shared_ollama._watchdog import Watchdog

    dog = Watchdog()
    forever = dog.arm(None)
    assert dog._heap == [] and dog._thread is None
    soon = dog.arm(60.0)
    assert [entry[2] for entry in dog._heap] == [soon]
    assert dog.ring_all() == {threading.get_ident()}
    assert forever.fired and soon.fired
    dog.disarm(forever)
    dog.disarm(soon)
    dog.close()


def test_disarmed_alarms_do_not_pile_up() -> None:
    from shared_ollama._watchdog import Watchdog

    dog = Watchdog()
    for _ in range(10_000):  # calls that ended long before their 120 s deadline
        dog.disarm(dog.arm(120.0))
    assert len(dog._heap) <= 64 + 1
    dog.close()


def test_sync_deadline_holds_after_a_call_without_deadline() -> None:
    """The same client: a call with no deadline at all (armed for a close only), then one with
    ``timeout=1.5`` against a trickling server, which still ends in ``Timeout`` in time."""
    from shared_ollama import HealthPolicy, SyncSharedClient, UsageConfig

    calls = {"n": 0}

    def respond(method: str, path: str) -> bytes | Iterator[bytes]:
        if path.startswith("/api/") and method == "GET":
            return LISTING
        calls["n"] += 1
        if calls["n"] == 1:
            time.sleep(0.3)  # the server's own pacing: the first call is in flight a while
            return head(len(BODY)) + BODY
        return trickle(BODY, prefix=head(len(BODY)))

    none = Timeouts(connect_s=2, first_chunk_s=None, between_chunks_s=None, total_s=None)
    with HostileServer(respond) as server:
        endpoint = Endpoint(server.url, kind="ollama", models={"m": "m"})
        settings = {
            "timeouts": none,
            "retry": RetryPolicy(max_attempts=1),
            "health": HealthPolicy(enabled=False),
            "usage": UsageConfig(enabled=False),
        }
        with SyncSharedClient(endpoints=[endpoint], **settings) as c:  # type: ignore[arg-type]
            assert c.chat(model="m", messages=[{"role": "user", "content": "hi"}]).message.content
            started = time.monotonic()
            with pytest.raises(Timeout) as info:
                c.chat(model="m", messages=[{"role": "user", "content": "hi"}], timeout=1.5)
            elapsed = time.monotonic() - started
    assert info.value.phase == "total"
    assert elapsed < 5 * 1.5, elapsed
