"""A pooled connection the server had closed (llama-server closes after every stream while
advertising keep-alive): the request never reached it, so it is sent once more at once, on a
fresh connection, without a retry, a backoff or a breaker failure. Through the transport seam,
for both clients and both ways the failure shows (end to end: tests/integration)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from shared_ollama import (
    ConnectError,
    Endpoint,
    HealthPolicy,
    RetryPolicy,
    SharedClient,
    SyncSharedClient,
    UsageConfig,
)
from shared_ollama.records import CallRecord

MODEL = "m"
BODY = {
    "model": MODEL,
    "message": {"role": "assistant", "content": "hi"},
    "done": True,
    "done_reason": "stop",
    "prompt_eval_count": 3,
    "eval_count": 1,
}
STALE: dict[str, Callable[[httpx.Request], Exception]] = {
    "closed before the reply": lambda r: httpx.RemoteProtocolError(
        "Server disconnected without sending a response.", request=r
    ),
    "request not written": lambda r: httpx.WriteError("[Errno 32] Broken pipe", request=r),
}


def _handler(failures: int, error: Callable[[httpx.Request], Exception]) -> tuple[
    Callable[[httpx.Request], httpx.Response], list[httpx.Request]
]:  # fmt: skip
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/api/chat":  # the model list the client reads at start
            return httpx.Response(200, json={"models": [{"name": MODEL, "model": MODEL}]})
        seen.append(request)
        if len(seen) <= failures:
            raise error(request)
        return httpx.Response(200, json=BODY)

    return handler, seen


def _kwargs(records: list[CallRecord]) -> dict[str, object]:
    return {
        "endpoints": [Endpoint("http://gpu-a:11434", kind="ollama", models=[MODEL])],
        "health": HealthPolicy(enabled=False),
        "usage": UsageConfig(enabled=False),
        "retry": RetryPolicy(max_attempts=1),
        "listeners": [records.append],
    }


@pytest.mark.parametrize("how", sorted(STALE))
def test_the_sync_client_resends_once_without_a_retry(how: str) -> None:
    handler, seen = _handler(1, STALE[how])
    records: list[CallRecord] = []
    with SyncSharedClient(transport=httpx.MockTransport(handler), **_kwargs(records)) as client:
        reply = client.chat(model=MODEL, messages=[{"role": "user", "content": "hello"}])
    assert reply.message.content == "hi"
    assert len(seen) == 2 and seen[0].content == seen[1].content
    (record,) = records
    assert record.ok and record.retries == 0 and len(record.attempts) == 1


@pytest.mark.parametrize("how", sorted(STALE))
def test_the_async_client_resends_once_without_a_retry(how: str) -> None:
    handler, seen = _handler(1, STALE[how])
    records: list[CallRecord] = []

    async def main() -> str:
        transport = httpx.MockTransport(handler)
        async with SharedClient(transport=transport, **_kwargs(records)) as client:
            reply = await client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}])
            return reply.message.content

    assert asyncio.run(main()) == "hi"
    assert len(seen) == 2
    (record,) = records
    assert record.ok and record.retries == 0 and len(record.attempts) == 1


@pytest.mark.parametrize("how", sorted(STALE))
def test_only_once_then_a_typed_error(how: str) -> None:
    # A server that fails every send is down, not stale: the one resend, then ConnectError.
    handler, seen = _handler(10, STALE[how])
    records: list[CallRecord] = []
    with SyncSharedClient(transport=httpx.MockTransport(handler), **_kwargs(records)) as client:
        with pytest.raises(ConnectError):
            client.chat(model=MODEL, messages=[{"role": "user", "content": "hello"}])
    assert len(seen) == 2
    (record,) = records
    assert not record.ok
