"""Budgets shared across processes: a SQLite file (one host) and a real PostgreSQL server.

Four spawned processes share each budget: a request budget admits exactly its limit, a token
budget (real calls against a FakeEngine) overshoots by no more than the reservations in flight
and settles to the servers' real counts. A store that cannot be reached refuses calls with
``BudgetUnavailable``, whose text never carries the password.
"""

from __future__ import annotations

import logging
import multiprocessing
import socket
import time
from collections.abc import Iterator
from multiprocessing.managers import SyncManager
from multiprocessing.pool import Pool
from pathlib import Path
from threading import Barrier
from typing import Any

import pytest

from shared_ollama import Endpoint, SyncSharedClient
from shared_ollama.config import Budget, UsageConfig
from shared_ollama.errors import BudgetExceeded, BudgetUnavailable, InvalidRequest
from shared_ollama.testing import FakeEngine, TimingModel
from shared_ollama.usage import Ledger
from shared_ollama.usage.budget import BudgetGate
from shared_ollama.usage.limits import PostgresLimits, SqliteLimits, open_limits
from tests.conftest import client_kwargs
from tests.usage._budget_workers import PROJECT, admit_requests, call_until_refused

PROCS = 4
MODEL = "fake-llama"
STORES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
#: Calls long enough (8 tokens x 2 ms) that the four processes' calls overlap.
TIMING = TimingModel(
    ttft_base_s=0.002, ttft_per_prompt_token_s=0.0, itl_s=0.002, default_max_tokens=8
)


@pytest.fixture(scope="module")
def workers() -> Iterator[tuple[Pool, Barrier]]:
    """Four spawned processes (started once for the module) and a barrier they share."""
    ctx = multiprocessing.get_context("spawn")
    manager: SyncManager = ctx.Manager()
    pool = ctx.Pool(PROCS)
    try:
        yield pool, manager.Barrier(PROCS)
    finally:
        pool.close()
        pool.join()
        manager.shutdown()


@pytest.fixture(params=STORES)
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the ledger (and so the shared budgets) live: a SQLite file or a fresh database."""
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_db"))
    return str(tmp_path / "usage.sqlite3")


def _store_location(ledger: str) -> str:
    # The SQLite budgets live beside the ledger file; PostgreSQL's in the same database.
    return ledger if ledger.startswith("postgresql://") else ledger + ".budgets"


def test_four_processes_admit_exactly_the_request_budget(
    workers: tuple[Pool, Barrier], ledger: str
) -> None:
    pool, barrier = workers
    limit, tries = 100, 60  # 240 attempts against 100 requests/min
    now = time.time()
    args = [(_store_location(ledger), barrier, limit, tries, now)] * PROCS
    admitted = pool.starmap(admit_requests, args, chunksize=1)
    assert sum(admitted) == limit, admitted
    store = open_limits(_store_location(ledger))
    try:
        assert store.usage(PROJECT, now)["requests_per_minute"] == limit
        with pytest.raises(BudgetExceeded) as refused:
            store.admit(PROJECT, Budget(requests_per_minute=limit), 0, now)
        assert refused.value.limit == "requests_per_minute"
        assert refused.value.resets_in is not None and 0 < refused.value.resets_in <= 61
    finally:
        store.close()


def test_four_processes_share_a_token_budget_within_the_reservations_in_flight(
    workers: tuple[Pool, Barrier], ledger: str
) -> None:
    pool, barrier = workers
    limit, max_tokens = 1500, 8
    prompt = "count the tokens of this prompt"
    with FakeEngine(kind="ollama", models=(MODEL,), timing=TIMING, slots=8) as engine:
        args = [(engine.url, MODEL, ledger, barrier, limit, prompt, max_tokens)] * PROCS
        calls = pool.starmap(call_until_refused, args, chunksize=1)
        served = engine.stats().generations
    done = [c for per_process in calls for c in per_process]
    used = sum(i + o for i, o in done)
    assert served == len(done)  # every admitted call ran; every refused one sent nothing
    # What one call may hold in flight: its reservation (prompt estimate + max_tokens), or
    # what it really used where that was more (the estimate is characters / 4).
    reserved = (len(prompt) + 3) // 4 + max_tokens
    per_call = max(reserved, *(i + o for i, o in done))
    in_flight = PROCS * per_call  # each process has at most one call in flight
    assert used - limit <= in_flight, (used, limit, in_flight)
    assert used >= limit - in_flight, (used, limit, in_flight)  # the budget was used, too
    # Every reservation settled to the server's real count (the children flushed at close).
    store = open_limits(_store_location(ledger))
    try:
        assert store.usage(PROJECT, time.time())["tokens_per_minute"] == used
    finally:
        store.close()


@pytest.mark.parametrize("store", STORES)
def test_a_failed_call_releases_its_reservation(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    location = (
        str(request.getfixturevalue("postgres_db"))
        if store == "postgres"
        else str(tmp_path / "u.sqlite3")
    )
    budget = Budget(requests_per_minute=10, tokens_per_minute=1000, reserve_tokens=300)
    with FakeEngine(kind="ollama", models=(MODEL,), timing=TIMING) as engine:
        kw = client_kwargs(usage=UsageConfig(path=location), budgets={"tests": budget})
        with SyncSharedClient(endpoints=[Endpoint(url=engine.url, kind="ollama")], **kw) as c:
            gate = c.usage.gate
            assert gate.limits is not None
            engine.faults.fail(400)
            with pytest.raises(InvalidRequest):
                c.chat(MODEL, [{"role": "user", "content": "abcd"}])  # reserves 1 + 300
            assert gate.flush(30)
            after_failure = gate.usage("tests", 0.0)
            reply = c.chat(MODEL, [{"role": "user", "content": "abcd"}], options={"num_predict": 5})
            assert gate.flush(30)
            after_success = gate.usage("tests", 0.0)
    assert after_failure["requests_per_minute"] == 1
    assert after_failure["tokens_per_minute"] == 0
    real = (reply.prompt_eval_count or 0) + (reply.eval_count or 0)
    assert real > 0
    assert after_success == {
        "requests_per_minute": 2,
        "tokens_per_minute": real,
        "tokens_per_day": 0,
    }


def test_windows_slide_and_tokens_settle(tmp_path: Path) -> None:
    clock = [1_000_000.25]
    gate = BudgetGate(
        {"p": Budget(requests_per_minute=2, tokens_per_minute=100, tokens_per_day=140)},
        limits=open_limits(tmp_path / "b.sqlite3"),
        clock=lambda: clock[0],
    )
    try:
        gate.admit("p", 0.0, request_id="a", prompt_tokens=10, max_tokens=50)
        assert gate.usage("p", 0.0)["tokens_per_minute"] == 60  # reserved
        gate.admit("p", 0.0, request_id="b", prompt_tokens=10, max_tokens=50)
        clock[0] += 30
        with pytest.raises(BudgetExceeded) as refused:
            gate.admit("p", 0.0)
        assert refused.value.limit == "requests_per_minute"
        assert refused.value.resets_in == pytest.approx(31.0 - 0.25)
        # Call "a" ends having used 25 tokens, "b" fails having used none.
        gate.commit(_record("a", "p", 10, 15))
        gate.commit(_record("b", "p", 0, 0))
        assert gate.flush(30)
        assert gate.usage("p", 0.0) == {
            "requests_per_minute": 2,
            "tokens_per_minute": 25,
            "tokens_per_day": 25,
        }
        clock[0] += 31  # the first second's bucket has left the minute window
        gate.admit("p", 0.0, request_id="c", prompt_tokens=0, max_tokens=120)
        with pytest.raises(BudgetExceeded) as refused:
            gate.admit("p", 0.0, prompt_tokens=0, max_tokens=1)
        assert refused.value.limit == "tokens_per_minute"  # 120 reserved >= 100
        gate.commit(_record("c", "p", 0, 120))
        clock[0] += 61
        with pytest.raises(BudgetExceeded) as refused:
            gate.admit("p", 0.0, max_tokens=1)
        assert refused.value.limit == "tokens_per_day"  # 25 + 120 of 140 in a day
    except BudgetExceeded as exc:
        pytest.fail(f"refused too early: {exc}")
    finally:
        gate.close()


def _record(request_id: str, project: str, tokens_in: int, tokens_out: int) -> Any:
    from tests.usage._helpers import make_record

    return make_record(
        request_id, project=project, input_tokens=tokens_in, output_tokens=tokens_out
    )


def test_no_budgets_means_no_store(tmp_path: Path) -> None:
    path = tmp_path / "u.sqlite3"
    kw = client_kwargs(usage=UsageConfig(path=str(path)))
    with SyncSharedClient(endpoints=[Endpoint(url="http://127.0.0.1:9", kind="ollama")], **kw) as c:
        assert c.usage.gate.limits is None
    assert not Path(str(path) + ".budgets").exists()
    budgets = {"p": Budget(requests_per_minute=1)}
    assert BudgetGate.for_usage(budgets, UsageConfig(enabled=False)).limits is None
    assert BudgetGate.for_usage(budgets, UsageConfig(path=":memory:")).limits is None
    shared = BudgetGate.for_usage(budgets, UsageConfig(path=str(path)))
    assert isinstance(shared.limits, SqliteLimits)
    assert shared.limits.path == Path(str(path) + ".budgets")


def test_store_follows_the_ledger_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    budgets = {"p": Budget(requests_per_minute=1)}
    url = "postgresql://u:s3cret-pw@127.0.0.1:1/db"
    monkeypatch.setenv("SHARED_OLLAMA_LEDGER", url)
    gate = BudgetGate.for_usage(budgets, UsageConfig())
    assert isinstance(gate.limits, PostgresLimits)
    assert "s3cret-pw" not in repr(gate.limits)
    monkeypatch.setenv("SHARED_OLLAMA_LEDGER", str(tmp_path / "env.sqlite3"))
    gate = BudgetGate.for_usage(budgets, UsageConfig())
    assert isinstance(gate.limits, SqliteLimits)
    assert gate.limits.path == tmp_path / "env.sqlite3.budgets"
    # An explicit path wins over the environment.
    gate = BudgetGate.for_usage(budgets, UsageConfig(path=str(tmp_path / "own.sqlite3")))
    assert isinstance(gate.limits, SqliteLimits)
    assert gate.limits.path == tmp_path / "own.sqlite3.budgets"
    # The ledger actually open decides: its file, or in-process for a ledger in memory.
    with Ledger(str(tmp_path / "open.sqlite3")) as ledger:
        gate = BudgetGate.for_usage(budgets, UsageConfig(), ledger)
        assert isinstance(gate.limits, SqliteLimits)
        assert gate.limits.path == tmp_path / "open.sqlite3.budgets"
    with Ledger(":memory:") as ledger:
        assert BudgetGate.for_usage(budgets, UsageConfig(), ledger).limits is None


def test_sqlite_store_that_cannot_open_is_a_typed_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = open_limits(blocker / "sub" / "b.sqlite3")
    try:
        with pytest.raises(BudgetUnavailable, match="budget store"):
            store.admit("p", Budget(requests_per_minute=1), 0, time.time())
    finally:
        store.close()


@pytest.mark.postgres
def test_unreachable_postgres_is_a_typed_error_without_the_password(
    postgres_server: Any,
) -> None:
    password = postgres_server.password
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    urls = [
        f"postgresql://{postgres_server.role}:{password}@127.0.0.1:{port}/nowhere",
        postgres_server.url("postgres").replace(password, password + "-wrong"),
    ]
    budgets = {"tests": Budget(requests_per_minute=5)}
    for url in urls:
        gate = BudgetGate.for_usage(budgets, UsageConfig(path=url))
        try:
            assert isinstance(gate.limits, PostgresLimits)
            assert password not in repr(gate.limits)
            with pytest.raises(BudgetUnavailable) as caught:
                gate.admit("tests", 0.0, request_id="r")
        finally:
            gate.close()
        assert isinstance(caught.value, BudgetExceeded)  # refusal handlers catch it too
        for text in (str(caught.value), repr(caught.value), str(caught.value.args)):
            assert password not in text
            assert "***" in text


@pytest.mark.postgres
def test_database_lost_under_a_client_refuses_its_calls(
    postgres_server: Any, postgres_db: str
) -> None:
    password = postgres_server.password
    budgets = {"tests": Budget(requests_per_minute=50, tokens_per_minute=10_000)}
    kw = client_kwargs(usage=UsageConfig(path=postgres_db), budgets=budgets)
    with FakeEngine(kind="ollama", models=(MODEL,), timing=TIMING) as engine:
        with SyncSharedClient(endpoints=[Endpoint(url=engine.url, kind="ollama")], **kw) as c:
            c.chat(MODEL, [{"role": "user", "content": "hi"}])
            _drop(postgres_server, postgres_db)
            with pytest.raises(BudgetUnavailable) as caught:
                c.chat(MODEL, [{"role": "user", "content": "hi"}])
        assert engine.stats().generations == 1  # the refused call sent nothing
    assert password not in str(caught.value)
    assert password not in repr(caught.value)


def _drop(server: Any, url: str) -> None:
    """Drop the database of ``url`` under its open connections."""
    import psycopg  # the `postgres` extra; the SQLite tests run without it

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(server.url(superuser=True), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)'.encode())


@pytest.mark.postgres
def test_lost_settlement_is_logged_without_the_password(
    postgres_server: Any, postgres_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    password = postgres_server.password
    budget = Budget(tokens_per_minute=1000)
    gate = BudgetGate({"p": budget}, limits=open_limits(postgres_db))
    try:
        gate.admit("p", 0.0, request_id="r1", max_tokens=10)
        _drop(postgres_server, postgres_db)  # the database goes away under the connection
        with caplog.at_level(logging.WARNING, logger="shared_ollama.usage"):
            gate.commit(_record("r1", "p", 3, 4))
            assert gate.flush(30)
        assert "budget settlement lost" in caplog.text
        assert password not in caplog.text
        with pytest.raises(BudgetUnavailable) as caught:
            gate.admit("p", 0.0)
        assert password not in str(caught.value)
    finally:
        gate.close()


@pytest.mark.parametrize("shape", ["call", "stream", "list", "ps"])
async def test_async_budget_check_waits_off_the_event_loop(tmp_path: Path, shape: str) -> None:
    """While another process holds the shared store's lock, a call's budget check waits in
    a worker thread: the event loop keeps running, and here it is the loop itself that lets
    the lock go. Checked inline, the wait would stall the loop until the store's busy
    timeout and the call would fail with ``BudgetUnavailable``."""
    import asyncio
    import sqlite3
    import threading

    from shared_ollama import SharedClient

    location = str(tmp_path / "u.sqlite3")
    budget = Budget(requests_per_minute=100)
    with FakeEngine(kind="ollama", models=(MODEL,), timing=TIMING) as engine:
        kw = client_kwargs(usage=UsageConfig(path=location), budgets={"tests": budget})
        async with SharedClient(endpoints=[Endpoint(url=engine.url, kind="ollama")], **kw) as c:
            limits = c.usage.gate.limits
            assert limits is not None and c.usage.shared
            entered = threading.Event()
            admit = limits.admit

            def watched(*args: Any, **kwargs: Any) -> Any:
                entered.set()
                return admit(*args, **kwargs)

            messages = [{"role": "user", "content": "hi"}]
            await c.chat(MODEL, messages)  # the store exists (its schema, WAL mode)
            limits.admit = watched  # type: ignore[method-assign]
            holder = sqlite3.connect(_store_location(location), isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")  # what another process's admission holds
            call: asyncio.Future[Any]
            if shape == "stream":

                async def streamed() -> int:
                    return len([x async for x in await c.chat(MODEL, messages, stream=True)])

                call = asyncio.ensure_future(streamed())
            elif shape in ("list", "ps"):  # every call shape, not only chat and generate
                call = asyncio.ensure_future(c.list() if shape == "list" else c.ps())
            else:
                call = asyncio.ensure_future(c.chat(MODEL, messages))
            await asyncio.to_thread(entered.wait, 30)  # the check is waiting for the lock
            assert not call.done()
            holder.execute("ROLLBACK")  # the loop runs: it lets the other "process" finish
            holder.close()
            result = await call
    assert result
    assert engine.stats.requests["/api/chat"] == (1 if shape in ("list", "ps") else 2)
