"""Model management (``pull``, ``push``, ``create``, ``delete``, ``copy``) over a pool: on
every Ollama endpoint or one, progress streamed per endpoint, a clear ``NotSupported`` where
no Ollama endpoint can take it; legacy ``embeddings`` wherever embedding is served."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from shared_ollama import (
    Endpoint,
    ModelNotFound,
    NotSupported,
    ProgressResponse,
    ResponseError,
    StatusResponse,
)
from shared_ollama.testing import FakeEngine
from tests.conftest import FAST, MODEL

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def pool() -> Iterator[list[FakeEngine]]:
    engines = [
        FakeEngine(kind="ollama", models=(MODEL,), timing=FAST),
        FakeEngine(kind="ollama", models=(MODEL,), timing=FAST),
        FakeEngine(kind="openai", models=(MODEL,), timing=FAST),
    ]
    for eng in engines:
        eng.start()
    yield engines
    for eng in engines:
        eng.stop()


def endpoints(engines: list[FakeEngine]) -> list[Endpoint]:
    return [Endpoint(e.url, kind=e.kind, name=f"{e.kind}-{i}") for i, e in enumerate(engines)]


async def test_pull_on_every_ollama_endpoint_then_the_model_is_routed(
    pool: list[FakeEngine], make_driver: Any
) -> None:
    ollamas = [e.url for e in pool if e.kind == "ollama"]
    async with make_driver(endpoints(pool)) as d:
        with pytest.raises(ModelNotFound):
            await d.call("chat", model="new-model", messages=HI)
        done = await d.call("pull", "new-model")
        assert isinstance(done, ProgressResponse) and done.status == "success"
        assert done.endpoints == dict.fromkeys(ollamas, "success")
        r = await d.call("chat", model="new-model", messages=HI)
        assert r.endpoint in ollamas  # listed again after the pull: routable at once
        progress = await d.stream("pull", "other-model")
        assert [p.endpoint for p in progress if p.status == "success"] == ollamas
        assert any(p.total and p.completed == p.total for p in progress)


async def test_delete_copy_create_and_push(pool: list[FakeEngine], make_driver: Any) -> None:
    first = pool[0].url
    async with make_driver(endpoints(pool)) as d:
        copied = await d.call("copy", MODEL, "my-copy", endpoint="ollama-0")
        assert isinstance(copied, StatusResponse) and copied.endpoints == {first: "success"}
        assert (await d.call("chat", model="my-copy", messages=HI)).endpoint == first
        made = await d.call("create", "made", from_=MODEL)
        assert made.status == "success" and len(made.endpoints) == 2
        pushed = await d.call("push", "made", endpoint=first)
        assert pushed.endpoints == {first: "success"}
        gone = await d.call("delete", "my-copy", endpoint=first)
        assert gone.endpoints == {first: "success"}
        with pytest.raises(ModelNotFound):
            await d.call("chat", model="my-copy", messages=HI)
        with pytest.raises(ResponseError) as info:  # ollama's way to catch it
            await d.call("delete", "never-there")
        assert info.value.status_code == 404


async def test_not_supported_where_no_ollama_endpoint_can_take_it(
    pool: list[FakeEngine], make_driver: Any
) -> None:
    openai = [e for e in pool if e.kind == "openai"]
    async with make_driver(endpoints(openai)) as d:
        before = openai[0].stats.total_requests
        with pytest.raises(NotSupported) as info:
            await d.call("pull", MODEL)
        assert "Ollama call" in str(info.value) and openai[0].stats.total_requests == before
        r = await d.call("embeddings", MODEL, "one two three")
        assert len(r.embedding) >= 8 and r.endpoint == openai[0].url
    async with make_driver(endpoints(pool)) as d:
        with pytest.raises(NotSupported):
            await d.call("delete", MODEL, endpoint=pool[2].url)
