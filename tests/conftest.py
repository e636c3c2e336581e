"""Shared fixtures: FakeEngines per protocol, and one helper that drives either client.

``both`` runs a test once with ``SharedClient`` and once with ``SyncSharedClient`` (in a
worker thread), so every end-to-end behaviour is proven for both drivers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from shared_ollama import (
    Endpoint,
    HealthPolicy,
    RetryPolicy,
    SharedClient,
    SyncSharedClient,
    Timeouts,
    UsageConfig,
)
from shared_ollama.testing import FakeEngine, TimingModel

pytest_plugins = ["tests.realservers.fixtures"]

FAST = TimingModel(
    ttft_base_s=0.001,
    ttft_per_prompt_token_s=0.0,
    itl_s=0.0005,
    default_max_tokens=8,
)
KINDS = ("ollama", "openai", "tgi")
MODEL = "fake-llama"


@pytest.fixture(scope="session", params=KINDS)
def engine(request: pytest.FixtureRequest) -> Iterator[FakeEngine]:
    """One FakeEngine per protocol, shared by the session (tests reset faults)."""
    with FakeEngine(kind=request.param, models=(MODEL,), timing=FAST, slots=8) as eng:
        yield eng


@pytest.fixture(scope="session", autouse=True)
def _private_default_ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point the per-user default ledger at a temp dir for the whole session (child processes
    inherit it), so no test ever writes the developer's real ledger."""
    import os

    saved = {k: os.environ.get(k) for k in ("XDG_DATA_HOME", "SHARED_OLLAMA_LEDGER")}
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg_data_home"))
    os.environ.pop("SHARED_OLLAMA_LEDGER", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _clean_engine(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "engine" in request.fixturenames:
        eng: FakeEngine = request.getfixturevalue("engine")
        eng.faults.clear()


class Driver:
    """The same awaitable API over SharedClient or SyncSharedClient (run in a thread)."""

    def __init__(self, client: SharedClient | SyncSharedClient) -> None:
        self.client = client
        self.sync = isinstance(client, SyncSharedClient)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self.client, method)
        if self.sync:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return await fn(*args, **kwargs)

    async def stream(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Consume a stream fully and return its chunks (errors propagate)."""
        kwargs["stream"] = True
        if self.sync:

            def consume() -> list[Any]:
                return list(getattr(self.client, method)(*args, **kwargs))

            return await asyncio.to_thread(consume)
        return [c async for c in await getattr(self.client, method)(*args, **kwargs)]

    async def stream_collect(
        self, method: str, *args: Any, **kwargs: Any
    ) -> tuple[list[Any], BaseException | None]:
        """Consume a stream, keeping the chunks received before an error."""
        chunks: list[Any] = []
        kwargs["stream"] = True
        if self.sync:

            def consume() -> BaseException | None:
                try:
                    for c in getattr(self.client, method)(*args, **kwargs):
                        chunks.append(c)
                except Exception as exc:
                    return exc
                return None

            return chunks, await asyncio.to_thread(consume)
        try:
            async for c in await getattr(self.client, method)(*args, **kwargs):
                chunks.append(c)
        except Exception as exc:
            return chunks, exc
        return chunks, None


def client_kwargs(**overrides: Any) -> dict[str, Any]:
    """Test defaults: no background probes, no ledger file, quick backoff."""
    kw: dict[str, Any] = {
        "project": "tests",
        "health": HealthPolicy(enabled=False),
        "usage": UsageConfig(enabled=False),
        "retry": RetryPolicy(backoff_initial_s=0.001, backoff_max_s=0.01, budget_min=1000),
        "timeouts": Timeouts(connect_s=2, first_chunk_s=10, between_chunks_s=10, total_s=30),
    }
    kw.update(overrides)
    return kw


@pytest.fixture(params=["async", "sync"])
def mode(request: pytest.FixtureRequest) -> str:
    """Which client drives the test."""
    return str(request.param)


@pytest.fixture
def make_driver(mode: str) -> Any:
    """Factory: ``async with make_driver(endpoints, **kw) as d:``."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def factory(endpoints: list[Endpoint], **kw: Any) -> AsyncIterator[Driver]:
        kwargs = client_kwargs(**kw)
        if mode == "async":
            async with SharedClient(endpoints=endpoints, **kwargs) as client:
                yield Driver(client)
        else:
            client = SyncSharedClient(endpoints=endpoints, **kwargs)
            await asyncio.to_thread(client.start)
            try:
                yield Driver(client)
            finally:
                await asyncio.to_thread(client.close)

    return factory


# -- PostgreSQL (tests/postgres_server.py) ------------------------------------------------------

_POSTGRES_FIXTURES = frozenset({"postgres_server", "postgres_url", "postgres_db"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tryfirst: the marker must be in place before `-m` deselects.
    for item in items:
        if set(getattr(item, "fixturenames", ())) & _POSTGRES_FIXTURES:
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A throwaway PostgreSQL server on 127.0.0.1 (skips, or fails under ``CI=true``)."""
    from tests.realservers.fixtures import unavailable

    try:
        from tests.postgres_server import PostgresServer, PostgresUnavailable
    except ImportError as exc:  # psycopg missing: the `postgres` extra is not installed
        unavailable(f"PostgreSQL tests need psycopg: {exc}")
    server = PostgresServer()
    try:
        server.start()
    except PostgresUnavailable as exc:
        unavailable(f"PostgreSQL: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: Any) -> str:
    """``postgresql://user:password@127.0.0.1:port/db``: one database for the session."""
    return str(postgres_server.new_database("session"))


@pytest.fixture
def postgres_db(postgres_server: Any) -> str:
    """The URL of a fresh, empty database for this test alone."""
    return str(postgres_server.new_database())
