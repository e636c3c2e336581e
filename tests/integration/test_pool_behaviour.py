"""Pool behaviour over real HTTP: auto-detection, health probes, hedging, config, status."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared_ollama import (
    BreakerPolicy,
    ConfigError,
    Endpoint,
    HealthPolicy,
    RetryPolicy,
    ServerError,
    SharedClient,
    SyncSharedClient,
    load_config,
)
from shared_ollama.records import CallRecord
from shared_ollama.testing import FakeEngine, TimingModel
from tests.conftest import FAST, client_kwargs
from tests.realservers.fixtures import HOSTILE, report_line

MODEL = "fake-llama"
MESSAGES = [{"role": "user", "content": "hi there"}]


@pytest.fixture
def trio() -> Iterator[list[FakeEngine]]:
    engines = [
        FakeEngine(kind=k, models=(MODEL,), timing=FAST) for k in ("ollama", "openai", "tgi")
    ]  # type: ignore[arg-type]
    for eng in engines:
        eng.start()
    yield engines
    for eng in engines:
        eng.stop()


async def test_auto_detects_each_protocol(trio: list[FakeEngine]) -> None:
    async with SharedClient(endpoints=[e.url for e in trio], **client_kwargs()) as client:
        kinds = {s.url: s.kind for s in client.pool_status()}
        assert kinds == {e.url: e.kind for e in trio}
        for _ in range(6):
            r = await client.chat(model=MODEL, messages=MESSAGES)
            assert r.message.content


async def wait_for(pred: Any, timeout: float = 10.0) -> None:
    """Poll a condition of the pool, bounded (the probes run on their own schedule)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_health_probes_mark_down_and_up_and_stop_on_close() -> None:
    eng = FakeEngine(kind="ollama", models=(MODEL,), timing=FAST)
    eng.start()
    fast_probes = HealthPolicy(interval_s=0.05, jitter=0.1, timeout_s=0.5, models_refresh_s=0.1)
    kw = client_kwargs(health=fast_probes)
    client = SharedClient(endpoints=[Endpoint(eng.url, kind="ollama")], **kw)
    async with client:
        assert client.pool_status()[0].health == "up"
        eng.stop()
        await wait_for(lambda: client.pool_status()[0].health == "down")
        assert client.pool_status()[0].last_error
        eng.restart()
        await wait_for(lambda: client.pool_status()[0].health == "up")
        task = client._health_task
    assert task is not None and task.done()
    eng.stop()


def test_sync_health_thread_stops_on_close(trio: list[FakeEngine]) -> None:
    before = set(threading.enumerate())
    probes = HealthPolicy(interval_s=0.05)
    with SyncSharedClient(endpoints=[trio[0].url], **client_kwargs(health=probes)) as client:
        assert client.chat(model=MODEL, messages=MESSAGES).message.content
        assert any(t.name == "shared_ollama-health" for t in threading.enumerate())
    assert set(threading.enumerate()) <= before


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_hedging_sends_a_second_copy_to_another_endpoint(mode: str) -> None:
    slow_timing = TimingModel(ttft_base_s=0.001, itl_s=0.0005, default_max_tokens=4)
    with (
        FakeEngine(kind="ollama", models=(MODEL,), timing=slow_timing) as primary,
        FakeEngine(kind="ollama", models=(MODEL,), timing=slow_timing) as backup,
    ):
        eps = [
            Endpoint(primary.url, kind="ollama", priority=0),
            Endpoint(backup.url, kind="ollama", priority=1),
        ]
        records: list[CallRecord] = []
        kw = client_kwargs(strategy="priority", listeners=[records.append])
        kw["config"] = None
        if mode == "async":
            client: Any = SharedClient(endpoints=eps, **kw)
            await client.start()
        else:
            client = SyncSharedClient(endpoints=eps, **kw)
            client.start()
        call = client.chat if mode == "async" else None

        async def chat() -> Any:
            if mode == "async":
                return await call(model=MODEL, messages=MESSAGES)  # type: ignore[misc]
            return await asyncio.to_thread(client.chat, model=MODEL, messages=MESSAGES)

        for _ in range(25):  # latencies are learnt with or without hedging
            assert (await chat()).endpoint == primary.url
        # Turned on only now: with hedging, ~5% of calls (those past the p95) are hedged.
        client.config = client.config.model_copy(update={"hedging": True})
        primary.faults.delay_first_byte(1.0, times=3)
        hedged = [await chat() for _ in range(3)]
        if mode == "async":
            await client.aclose()
        else:
            await asyncio.to_thread(client.close)
    assert all(r.endpoint == backup.url for r in hedged)  # the faster copy won
    assert all(r.attempts == 2 for r in hedged)
    for rec in records[-3:]:
        assert [a.endpoint for a in rec.attempts] == [primary.url, backup.url]
        assert rec.ok and rec.endpoint == backup.url


async def test_cancelled_half_open_probe_leaves_the_breaker_half_open() -> None:
    """A caller giving up on the probe proves nothing: the breaker neither closes nor opens."""
    with FakeEngine(kind="ollama", models=(MODEL,), timing=FAST) as engine:
        kw = client_kwargs(
            breaker=BreakerPolicy(failure_threshold=1, reset_timeout_s=60),
            retry=RetryPolicy(max_attempts=1),
        )
        async with SharedClient(endpoints=[Endpoint(engine.url, kind="ollama")], **kw) as client:
            engine.faults.fail(500)
            with pytest.raises(ServerError):
                await client.chat(model=MODEL, messages=MESSAGES)
            breaker = client._pool.endpoints[0].breaker
            assert breaker.state == "open"
            # Age it past its reset timeout instead of waiting 60 s.
            breaker._opened_at -= 61

            engine.faults.delay_first_byte(30)
            probe = asyncio.create_task(client.chat(model=MODEL, messages=MESSAGES))
            await engine.await_stats(lambda s: s.faults_fired.get("delay_first_byte") == 1)
            assert breaker.state == "half_open"
            probe.cancel()
            with pytest.raises(asyncio.CancelledError):
                await probe
            assert breaker.state == "half_open"  # pybreaker alone would have closed it

            engine.faults.clear()
            reply = await client.chat(model=MODEL, messages=MESSAGES)  # the next probe
            assert reply.message.content and breaker.state == "closed"
            states = [(s.url, s.breaker, s.in_flight) for s in client.pool_status()]
            assert states == [(engine.url, "closed", 0)]


def test_config_from_toml_and_env(tmp_path: Path) -> None:
    toml = tmp_path / "pool.toml"
    toml.write_text(
        'project = "team-a"\nstrategy = "round_robin"\n'
        '[[endpoints]]\nurl = "http://127.0.0.1:11434"\nkind = "ollama"\n'
        '[[endpoints]]\nurl = "http://127.0.0.1:8000"\nkind = "openai"\n'
        'api_key = "sk-toml-secret"\nmodels = {llama = "meta/Llama"}\n'
        "[retry]\nmax_attempts = 5\n[budgets.team-a]\nrequests_per_minute = 10\n"
    )
    cfg = load_config(toml, env={})
    assert cfg.project == "team-a" and cfg.strategy == "round_robin"
    assert cfg.retry.max_attempts == 5 and cfg.budgets["team-a"].requests_per_minute == 10
    assert cfg.endpoints[1].models == {"llama": "meta/Llama"}
    assert "sk-toml-secret" not in repr(cfg) and "sk-toml-secret" not in str(cfg.endpoints)
    env = {"SHARED_OLLAMA_ENDPOINTS": "http://h:1=ollama,http://h:2", "SHARED_OLLAMA_PROJECT": "p"}
    from_env = load_config(None, env=env)
    assert [e.kind for e in from_env.endpoints] == ["ollama", "auto"] and from_env.project == "p"
    bad = tmp_path / "bad.toml"
    bad.write_text('[[endpoints]]\nurl = "ftp://nope"\napi_key = "sk-leak"\n')
    with pytest.raises(ConfigError) as err:
        load_config(bad, env={})
    assert "sk-leak" not in str(err.value)
    with pytest.raises(ConfigError):
        SharedClient(endpoints=[])
    with pytest.raises(ConfigError):
        SharedClient(endpoints=["http://a:1", "http://a:1"])


def test_status_cli_json_and_table(trio: list[FakeEngine]) -> None:
    args = [sys.executable, "-m", "shared_ollama", "status"]
    for eng in trio:
        args += ["--endpoint", f"{eng.url},{eng.kind}"]
    out = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["kind"] for r in rows] == ["ollama", "openai", "tgi"]
    assert all(r["health"] == "up" and r["breaker"] == "closed" for r in rows)
    assert all(MODEL in r["models"] or f"{MODEL}:latest" in r["models"] for r in rows)
    table = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "breaker" in table.stdout and "openai" in table.stdout
    models = subprocess.run(
        [*args[:3], "models", *args[4:], "--json"], capture_output=True, text=True, timeout=60
    )
    assert models.returncode == 0 and len(json.loads(models.stdout)) == 3
    down = subprocess.run(
        [sys.executable, "-m", "shared_ollama", "status", "--endpoint", "http://127.0.0.1:9,tgi"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 1 and "down" in down.stdout


def test_secrets_never_in_reprs_or_status(trio: list[FakeEngine]) -> None:
    secret = "sk-super-secret-value"
    ep = Endpoint(trio[1].url, kind="openai", api_key=secret)
    with SyncSharedClient(endpoints=[ep], **client_kwargs()) as client:
        texts = [
            repr(ep),
            str(ep),
            repr(client),
            json.dumps([s.as_dict() for s in client.pool_status()]),
        ]
        texts.append(repr(client.config))
    assert not any(secret in t for t in texts)


async def test_dead_pool_answers_within_the_no_endpoint_wait(make_driver: Any) -> None:
    """Every endpoint refuses connections: each call ends in a typed error after at most the
    short no-endpoint wait, not at the call's total deadline (once 585 s with the defaults)."""
    import socket

    from shared_ollama import ConnectError, NoEndpointAvailable, Timeouts

    ports = []
    for _ in range(2):
        with socket.socket() as sock:  # bound, never listening: connections are refused
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    eps = [Endpoint(f"http://127.0.0.1:{p}", kind="ollama", models={"m": "m"}) for p in ports]
    timeouts = Timeouts(connect_s=2, first_chunk_s=10, between_chunks_s=10, total_s=300,
                        no_endpoint_s=0.5)  # fmt: skip
    breaker = BreakerPolicy(failure_threshold=2, reset_timeout_s=120)
    async with make_driver(eps, timeouts=timeouts, breaker=breaker) as d:
        seen = []
        for _ in range(6):  # connect errors first, then both breakers open
            started = time.monotonic()
            with pytest.raises((ConnectError, NoEndpointAvailable)) as info:
                await d.call("chat", model="m", messages=MESSAGES)
            seen.append((type(info.value).__name__, time.monotonic() - started))
    report_line(
        f"dead pool [{'sync' if d.sync else 'async'}]: "
        + ", ".join(f"{name} {elapsed:.2f} s" for name, elapsed in seen)
        + f" (no_endpoint_s={timeouts.no_endpoint_s}, total_s={timeouts.total_s})",
        HOSTILE,
    )
    assert seen[-1][0] == "NoEndpointAvailable", seen
    assert max(elapsed for _, elapsed in seen) < timeouts.total_s / 10, seen


async def test_a_released_slot_wakes_the_waiting_call(
    make_driver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``max_in_flight=1`` a second call waits for the slot; the release wakes it, so it
    starts as the first ends rather than at the next re-check (a missed-wake-up bound, made
    long here so that only a wake-up can explain a prompt start)."""
    import shared_ollama.pool.pool as pool_module

    monkeypatch.setattr(pool_module, "_SATURATED_RECHECK_S", 30.0)
    slow = TimingModel(ttft_base_s=0.3, ttft_per_prompt_token_s=0.0, itl_s=0.0,
                       default_max_tokens=1)  # fmt: skip
    with FakeEngine(kind="ollama", models=(MODEL,), timing=slow, slots=4) as engine:
        capped = Endpoint(engine.url, kind="ollama", max_in_flight=1)
        async with make_driver([capped]) as d:

            async def timed() -> float:
                await d.call("chat", model=MODEL, messages=MESSAGES)
                return time.monotonic()

            started = time.monotonic()
            first = asyncio.create_task(timed())
            await engine.await_stats(lambda s: s.in_flight == 1)
            second = asyncio.create_task(timed())
            first_end, second_end = await asyncio.gather(first, second)
    own = first_end - started  # one call's own duration, measured here
    # The second ran right after the first: about one call's time later, not a re-check later.
    assert second_end - first_end < 2 * own, (own, second_end - first_end)


@pytest.mark.parametrize(
    ("real", "declared"), [("ollama", "openai"), ("openai", "ollama"), ("ollama", "tgi")]
)
def test_a_wrongly_declared_kind_shows_as_wrong_kind_not_up(real: str, declared: str) -> None:
    """The declared protocol is checked with its own cheap probe: the endpoint shows "wrong
    kind?" in status (and the CLI), stays out of routing, and says why."""
    from shared_ollama import NoEndpointAvailable

    with FakeEngine(kind=real, models=(MODEL,)) as eng:
        ep = Endpoint(eng.url, kind=declared, models=[MODEL])
        with SyncSharedClient(endpoints=[ep], **client_kwargs(health=HealthPolicy())) as client:
            (status,) = client.pool_status()
            assert status.health == "wrong kind?", status
            assert f"declared kind={declared!r}" in (status.last_error or ""), status
            with pytest.raises(NoEndpointAvailable) as info:
                client.chat(model=MODEL, messages=MESSAGES, timeout=5)
            assert "wrong kind?" in str(info.value)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "shared_ollama",
                "status",
                "--endpoint",
                f"{eng.url},{declared}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "wrong kind?" in done.stdout, done.stdout
