"""FakeEngine as a whole: token accounting, slots and queue, lifecycle, stats, admin, CLI."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared_ollama.testing import EngineStats, FakeEngine, TimingModel
from shared_ollama.testing._tokens import VOCAB, chat_prompt, count_words, embedding, plan

EngineFactory = Callable[..., FakeEngine]
TimingFactory = Callable[..., TimingModel]
REPO_ROOT = Path(__file__).resolve().parents[2]


# -- token accounting (pure) -------------------------------------------------------------------


def test_prompt_tokens_are_words_and_chat_adds_three_per_message() -> None:
    assert count_words("  why is\tthe sky\nblue ") == 5
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "why blue"}]},
        {"role": "assistant", "content": None},
    ]
    text, tokens = chat_prompt(messages)
    assert tokens == (2 + 3) + (2 + 3) + (0 + 3)
    assert text == "be brief\nwhy blue\n"


def test_plan_lengths_and_finish_reasons() -> None:
    limited = plan(0, "prompt", 7, 16)
    assert len(limited.tokens) == 7 and limited.finish == "length"
    free = plan(0, "prompt", None, 16)
    assert len(free.tokens) == 16 and free.finish == "eos"
    assert free.tokens[:7] == limited.tokens  # the limit only cuts the same sequence
    assert limited.text == "".join(t.text for t in limited.tokens)
    assert not limited.tokens[0].text.startswith(" ")
    assert all(t.text.startswith(" ") and t.text.strip() in VOCAB for t in limited.tokens[1:])


def test_plan_is_seeded_by_engine_seed_and_prompt() -> None:
    assert plan(1, "a", 20, 16) == plan(1, "a", 20, 16)
    assert plan(1, "a", 20, 16).text != plan(2, "a", 20, 16).text
    assert plan(1, "a", 20, 16).text != plan(1, "b", 20, 16).text


def test_stop_string_ends_before_the_token_completing_it() -> None:
    words = plan(0, "p", 30, 16).text.split()
    stop = next(w for w in words[1:] if w != words[0])
    cut = plan(0, "p", 30, 16, stop=[stop])
    assert cut.finish == "stop"
    assert cut.text == " ".join(words[: words.index(stop, 1)])
    # At least one token, even when the first one contains the stop string.
    assert len(plan(0, "p", 30, 16, stop=[words[0]]).tokens) >= 1


def test_embedding_is_a_deterministic_unit_vector() -> None:
    vector = embedding("hello world")
    assert len(vector) == 8 and math.isclose(sum(v * v for v in vector), 1.0)
    assert vector == embedding("hello world") != embedding("hello")


def test_timing_model_validates() -> None:
    with pytest.raises(ValueError, match="itl_s"):
        TimingModel(itl_s=-1)
    with pytest.raises(ValueError, match="tokens_per_chunk"):
        TimingModel(tokens_per_chunk=0)
    model = TimingModel(
        ttft_base_s=0.1, ttft_per_prompt_token_s=0.01, itl_s=0.2, itl_per_active_s=0.5
    )
    assert model.prefill_s(10) == pytest.approx(0.2)
    assert model.token_gap_s(1) == pytest.approx(0.2)
    assert model.token_gap_s(3) == pytest.approx(1.2)


def test_output_is_the_same_on_every_wire(make_engine: EngineFactory) -> None:
    ollama_engine, openai_engine, tgi_engine = (make_engine(k) for k in ("ollama", "openai", "tgi"))
    prompt = "one shared prompt"
    texts = [
        httpx.post(
            f"{ollama_engine.url}/api/generate",
            json={
                "model": "fake-llama",
                "prompt": prompt,
                "stream": False,
                "options": {"num_predict": 9},
            },
        ).json()["response"],
        httpx.post(
            f"{openai_engine.url}/v1/completions",
            json={"model": "fake-llama", "prompt": prompt, "max_tokens": 9},
        ).json()["choices"][0]["text"],
        httpx.post(
            f"{tgi_engine.url}/generate",
            json={"inputs": prompt, "parameters": {"max_new_tokens": 9}},
        ).json()["generated_text"],
    ]
    assert texts[0] == texts[1] == texts[2] == plan(0, prompt, 9, 16).text


# -- slots and queue ---------------------------------------------------------------------------

OVERLOAD = {
    "ollama": ("/api/generate", {"model": "fake-llama", "prompt": "x", "stream": False}, 503),
    "openai": ("/v1/completions", {"model": "fake-llama", "prompt": "x", "stream": True}, 429),
    "tgi": ("/generate", {"inputs": "x"}, 429),
}


@pytest.mark.parametrize("kind", ["ollama", "openai", "tgi"])
async def test_slots_bound_concurrency_and_a_full_queue_overloads(
    make_engine: EngineFactory, timing: TimingFactory, kind: str
) -> None:
    path, body, status = OVERLOAD[kind]
    engine = make_engine(kind, slots=2, max_queue=3, timing=timing(ttft_base_s=60.0))
    async with httpx.AsyncClient(base_url=engine.url, timeout=None) as client:
        waiting = [asyncio.create_task(client.post(path, json=body)) for _ in range(5)]
        stats = await engine.await_stats(lambda s: s.in_flight == 2 and s.queued == 3)
        assert stats.max_in_flight == 2
        refused = await client.post(path, json=body)
        assert refused.status_code == status
        assert engine.stats.overloaded == 1
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
    # Clients gone: every slot and queue place is given back.
    stats = await engine.await_stats(lambda s: s.in_flight == 0 and s.queued == 0)
    assert stats.requests_aborted == 5 and stats.max_in_flight == 2


async def test_queued_requests_all_complete_within_the_slots(make_engine: EngineFactory) -> None:
    engine = make_engine("openai", slots=2)
    body = {"model": "fake-llama", "prompt": "a b", "max_tokens": 8}
    async with httpx.AsyncClient(base_url=engine.url) as client:
        replies = await asyncio.gather(
            *(client.post("/v1/completions", json=body) for _ in range(8))
        )
    assert [r.status_code for r in replies] == [200] * 8
    stats = engine.stats
    assert stats.max_in_flight <= 2 and stats.generations == 8 and stats.tokens_generated == 64


def test_slots_can_grow_while_running(make_engine: EngineFactory, timing: TimingFactory) -> None:
    engine = make_engine("ollama", slots=1, timing=timing(ttft_base_s=60.0))
    body = {"model": "fake-llama", "prompt": "x", "stream": False}
    with httpx.Client(base_url=engine.url, timeout=None) as client:

        def post() -> None:
            with contextlib.suppress(httpx.HTTPError):  # dropped when the engine stops
                client.post("/api/generate", json=body)

        threads = [threading.Thread(target=post) for _ in range(3)]
        for thread in threads:
            thread.start()
        engine.wait_stats(lambda s: s.in_flight == 1 and s.queued == 2)
        engine.slots = 3
        engine.wait_stats(lambda s: s.in_flight == 3 and s.queued == 0)
        engine.stop()
        for thread in threads:
            thread.join()


# -- lifecycle ---------------------------------------------------------------------------------


def test_restart_keeps_the_port_and_stop_frees_it(make_engine: EngineFactory) -> None:
    engine = make_engine("openai")
    port, url = engine.port, engine.url
    assert port > 0 and url == f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/health").status_code == 200
    engine.restart()
    assert engine.port == port and httpx.get(f"{url}/health").status_code == 200
    engine.stop()
    assert not engine.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")
    engine.start()
    assert engine.port == port and httpx.get(f"{url}/health").status_code == 200


def test_stop_drops_a_running_stream(make_engine: EngineFactory, timing: TimingFactory) -> None:
    engine = make_engine("ollama", timing=timing(itl_s=0.05))
    body = {"model": "fake-llama", "prompt": "x", "options": {"num_predict": 1000}}

    def read_while_stopping() -> None:
        with httpx.stream("POST", f"{engine.url}/api/generate", json=body) as r:
            for _ in r.iter_lines():
                engine.stop()

    with pytest.raises(httpx.RemoteProtocolError):
        read_while_stopping()
    assert engine.stats.in_flight == 0 and engine.stats.streams_aborted == 0


def test_sync_context_manager_and_repr() -> None:
    with FakeEngine("tgi", models=("m1", "m2")) as engine:
        assert "running" in repr(engine) and engine.models == ("m1", "m2")
        assert httpx.get(f"{engine.url}/info").json()["model_id"] == "m1"
    assert "stopped" in repr(engine)


async def test_async_context_manager() -> None:
    async with FakeEngine("openai") as engine, httpx.AsyncClient() as client:
        assert (await client.get(f"{engine.url}/health")).status_code == 200
    assert not engine.running


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="kind"):
        FakeEngine("vllm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model"):
        FakeEngine(models=())
    with pytest.raises(ValueError, match="slots"):
        FakeEngine(slots=0)


# -- stats and admin ---------------------------------------------------------------------------


def test_stats_counts_and_resets(ollama_engine: FakeEngine) -> None:
    body = {
        "model": "fake-llama",
        "prompt": "a b c",
        "stream": False,
        "options": {"num_predict": 4},
    }
    httpx.post(f"{ollama_engine.url}/api/generate", json=body)
    httpx.post(f"{ollama_engine.url}/api/generate", json={**body, "model": "missing"})
    httpx.get(f"{ollama_engine.url}/api/tags")
    stats = ollama_engine.stats()
    assert isinstance(stats, EngineStats) and stats == ollama_engine.stats
    assert dict(stats.requests) == {"/api/generate": 2, "/api/tags": 1}
    assert dict(stats.responses) == {200: 2, 404: 1}
    assert (stats.prompt_tokens, stats.tokens_generated, stats.generations) == (3, 4, 1)
    assert stats.total_requests == 3 and stats.total_faults == 0
    ollama_engine.reset_stats()
    assert ollama_engine.stats().total_requests == 0


def test_admin_stats_and_timing(ollama_engine: FakeEngine) -> None:
    admin = f"{ollama_engine.url}/_fake"
    httpx.get(ollama_engine.url)
    assert httpx.get(f"{admin}/stats").json()["requests"] == {"/": 1}  # admin is not counted
    changed = httpx.post(f"{admin}/timing", json={"default_max_tokens": 3}).json()
    assert changed["default_max_tokens"] == 3 and ollama_engine.timing.default_max_tokens == 3
    assert httpx.post(f"{admin}/timing", json={"bogus": 1}).status_code == 400
    assert httpx.post(f"{admin}/timing", json={"itl_s": -1}).status_code == 400
    assert httpx.post(f"{admin}/stats/reset").json()["requests"] == {}


def test_timing_can_be_replaced_while_running(
    ollama_engine: FakeEngine, timing: TimingFactory
) -> None:
    ollama_engine.timing = timing(default_max_tokens=2)
    body = {"model": "fake-llama", "prompt": "x", "stream": False}
    assert httpx.post(f"{ollama_engine.url}/api/generate", json=body).json()["eval_count"] == 2


# -- the command line --------------------------------------------------------------------------


def test_module_runs_an_engine_in_a_subprocess() -> None:
    command = [sys.executable, "-m", "shared_ollama.testing", "--kind", "openai", "--port", "0"]
    command += ["--ttft-base-s", "0.001", "--itl-s", "0.0005", "--model", "m"]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{url}/health").status_code == 200
        httpx.post(f"{url}/_fake/faults", json={"action": "fail", "status": 503})
        body = {"model": "m", "prompt": "x", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 503
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
        stats = httpx.get(f"{url}/_fake/stats").json()
        assert stats["faults_fired"] == {"fail": 1} and stats["tokens_generated"] == 2
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_connections_send_small_chunks_at_once(ollama_engine: FakeEngine) -> None:
    # Nagle's algorithm would hold each stream chunk until the client's delayed ACK (~40 ms)
    # and wreck every timing the engine models.
    with httpx.Client(base_url=ollama_engine.url) as client:
        client.get("/")
        server = ollama_engine._server
        assert server is not None
        sockets = [t.get_extra_info("socket") for t in list(server.transports.values())]
        assert sockets
        assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)
