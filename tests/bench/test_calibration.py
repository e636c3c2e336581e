"""Prompt lengths in server tokens: word costs, sized prompts, the calibration over real HTTP
(FakeEngines of every kind, a server that cannot count, the real llama-server and vLLM),
its disk cache, the context sweep and the CLI's one-line failures."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared_ollama.bench.calibrate import (
    CACHE_ENV,
    TOLERANCE,
    calibrate_run,
    context_points,
    max_output_tokens,
    prompt_token_lines,
    word_costs,
)
from shared_ollama.bench.cli import main
from shared_ollama.bench.result import BenchResult, RunMetadata, load_result, write_json
from shared_ollama.bench.scenario import validate_scenario
from shared_ollama.bench.session import build_result, run_scenario
from shared_ollama.bench.workload import WORDS, PromptSizer, Workload, parse_length
from shared_ollama.config import PoolConfig
from shared_ollama.testing import FakeEngine, TimingModel
from shared_ollama.testing._tokens import CHAT_TOKENS_PER_MESSAGE
from tests.hostile import HostileServer, http_reply
from tests.realservers.fixtures import LLAMA_API_KEY, report_line

MODEL = "fake-llama"
METHODS = {"openai": "tokenize:vllm", "tgi": "tokenize:tgi", "ollama": "generation"}


@pytest.fixture(autouse=True)
def cache_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own calibration cache (never the user's)."""
    path = tmp_path / "calibration.json"
    monkeypatch.setenv(CACHE_ENV, str(path))
    return path


def _scenario(url: str, kind: str, **extra: Any) -> Any:
    data: dict[str, Any] = {
        "model": MODEL,
        "pool": {"endpoints": [{"url": url, "kind": kind}], "health": {"enabled": False}},
        "workloads": [
            {"name": "chat", "prompt_tokens": "uniform:20:300", "max_tokens": 2},
            {
                "name": "gen",
                "operation": "generate",
                "system": "answer in one word",
                "prompt_tokens": 64,
                "max_tokens": 2,
            },
        ],
        "schedules": [{"kind": "concurrency", "levels": [2], "requests": 12}],
        "warmup": {"requests": 1},
        "samplers": {"enabled": False},
    }
    return validate_scenario(data | extra)


# -- pure: costs and sized prompts -----------------------------------------------------------


def _model_counter(costs: dict[str, int], head: int) -> tuple[Any, list[str]]:
    """A server that counts ``head`` for the first word and ``costs`` for each word after."""
    seen: list[str] = []

    async def count(text: str) -> int:
        seen.append(text)
        first, *rest = text.split(" ")
        return head + costs[first] + sum(costs[w] for w in rest)

    return count, seen


async def test_word_costs_are_recovered_and_cheap_when_all_one() -> None:
    rng = random.Random(3)
    costs = {w: rng.choice((1, 1, 2, 3, 5)) for w in WORDS}
    count, seen = _model_counter(costs, head=7)
    assert await word_costs(count, WORDS) == costs
    ones = dict.fromkeys(WORDS, 1)
    count, seen = _model_counter(ones, head=7)
    assert await word_costs(count, WORDS) == ones
    # A real vocabulary (every word one token): the anchor and one request per 32 words.
    assert len(seen) == 1 + -(-len(WORDS) // 32)


async def test_word_costs_refuse_counts_that_do_not_add_up() -> None:
    async def constant(text: str) -> int:
        return 3  # a server whose count ignores the prompt

    with pytest.raises(ValueError, match="not additive"):
        await word_costs(constant, WORDS)


def test_sized_prompts_hit_their_target_exactly() -> None:
    rng = random.Random(0)
    costs = {w: rng.choice((1, 2, 2, 3, 4)) for w in WORDS}
    heads = {"the": 9, "of": 10}
    sizer = PromptSizer(heads, costs)

    def server_count(text: str) -> int:
        first, *rest = text.split(" ")
        return heads[first] + sum(costs[w] for w in rest)

    for target in (9, 10, 11, 17, 64, 128, 1000, 4093):
        text, predicted = sizer.prompt(target, rng)
        assert predicted == server_count(text) == target, target
    text, predicted = sizer.prompt(3, rng)  # below the template itself: the shortest prompt
    assert predicted == server_count(text) == 9 == sizer.shortest
    # No word small enough for the last tokens: as close as the vocabulary allows.
    lumpy = PromptSizer({"the": 5}, dict.fromkeys(WORDS, 4))
    _, predicted = lumpy.prompt(100, rng)
    assert 100 - 3 <= predicted <= 100


def test_sized_prompts_differ_from_each_other() -> None:
    sizer = PromptSizer({"the": 4, "of": 4}, dict.fromkeys(WORDS, 1))
    rng = random.Random(1)
    prompts = {sizer.prompt(64, rng)[0] for _ in range(50)}
    assert len(prompts) == 50
    assert len({p.split()[1] for p in prompts}) > 10  # no shared prefix past the first word


def test_context_points_and_output_bounds() -> None:
    assert context_points(128, 4000, 4) == [128, 403, 1270, 4000]  # ratio 31.25 ** (1/3)
    assert context_points(500, 400, 5) == [400]
    assert max_output_tokens(parse_length("64")) == 64
    assert max_output_tokens(parse_length("uniform:8:40")) == 40
    assert max_output_tokens(parse_length("normal:100:10")) == 140


# -- over real HTTP: every FakeEngine kind ----------------------------------------------------


async def test_prompt_tokens_are_server_tokens_on_every_kind(engine: FakeEngine) -> None:
    result = await run_scenario(_scenario(engine.url, engine.kind))
    assert result.summary.failed == 0 and len(result.requests) == 12
    by_name = {p.workload: p for p in result.prompt_tokens}
    for p in by_name.values():  # every request exactly on its own target
        assert p.requests > 0 and p.max_abs_error_pct == 0.0 and p.within_tolerance == 1.0
        assert p.expected_mean == p.target_mean
        assert p.method == METHODS[engine.kind]
    gen = [r.input_tokens for r in result.requests if r.workload == "gen"]
    assert gen and set(gen) == {64}
    chat = by_name["chat"]
    assert chat.server_min is not None and chat.server_max is not None
    assert 20 <= chat.server_min < chat.server_max <= 300  # the uniform draw, as counted
    methods = {(c.operation, c.system): c for c in result.calibrations}
    assert set(methods) == {("chat", False), ("generate", True)}
    for c in methods.values():
        assert c.check_predicted == c.check_counted and c.method == METHODS[engine.kind]
    # The fake's chat template: 3 tokens a message, now inside the target instead of on top.
    assert methods["chat", False].shortest_prompt == 1 + CHAT_TOKENS_PER_MESSAGE
    lines = prompt_token_lines(result)  # the terminal's account
    assert len(lines) == 2 and lines[0].startswith("prompt tokens chat: asked uniform:20:300 (mean")
    assert all("error max 0.0%, 100% within 2%" in line for line in lines)


async def test_without_calibration_lengths_are_words(engine: FakeEngine) -> None:
    result = await run_scenario(_scenario(engine.url, engine.kind, calibrate="off"))
    assert result.calibrations == []
    assert any("calibration off" in n for n in result.metadata.notes)
    chat = next(p for p in result.prompt_tokens if p.workload == "chat")
    assert chat.method == "words" and chat.expected_mean is None
    # The template's tokens come on top of the words: every chat prompt misses its target.
    assert chat.max_abs_error_pct is not None and chat.max_abs_error_pct > 0
    gen = [r.input_tokens for r in result.requests if r.workload == "chat"]
    assert gen and all(n is not None for n in gen)


async def test_the_disk_cache_skips_the_measurement(cache_file: Path) -> None:
    with FakeEngine(kind="openai", models=(MODEL,), timing=_fast()) as eng:
        first = await run_scenario(_scenario(eng.url, "openai"))
        assert not any(c.cached for c in first.calibrations)
        entries = json.loads(await asyncio.to_thread(cache_file.read_text))["entries"]
        assert {e["operation"] for e in entries} == {"chat", "generate"}
        assert all(e["url"] == eng.url for e in entries)
        second = await run_scenario(_scenario(eng.url, "openai"))
        # One check request each, and prompts still exactly on target.
        assert [(c.cached, c.requests) for c in second.calibrations] == [(True, 1), (True, 1)]
        assert all(p.max_abs_error_pct == 0.0 for p in second.prompt_tokens)
        third = await run_scenario(_scenario(eng.url, "openai", calibrate="refresh"))
        assert not any(c.cached for c in third.calibrations)
        # A damaged cache is measured again, not an error.
        await asyncio.to_thread(cache_file.write_text, "{not json")
        fourth = await run_scenario(_scenario(eng.url, "openai"))
        assert not any(c.cached for c in fourth.calibrations)


def _fast() -> TimingModel:
    return TimingModel(ttft_base_s=0.001, itl_s=0.0005, default_max_tokens=8)


def _no_usage_server(method: str, path: str) -> bytes:
    """An OpenAI-compatible server whose replies carry no token counts and no /tokenize."""
    if path == "/v1/models":
        body: dict[str, Any] = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
    elif path == "/v1/chat/completions":
        message = {"role": "assistant", "content": "hi"}
        body = {"id": "c", "object": "chat.completion", "model": MODEL, "created": 0}
        body["choices"] = [{"index": 0, "message": message, "finish_reason": "length"}]
    elif path == "/health":
        return http_reply(200, b"")
    else:
        return http_reply(404, b'{"detail":"Not Found"}')
    return http_reply(200, json.dumps(body).encode())


async def test_a_server_that_cannot_count_falls_back_to_words_with_a_note() -> None:
    with HostileServer(_no_usage_server) as server:
        scenario = _scenario(server.url, "openai")
        scenario = scenario.model_copy(
            update={
                "workloads": [scenario.workloads[0].model_copy(update={"stream": False})],
                "warmup": scenario.warmup.model_copy(update={"requests": 0}),
                "schedules": [scenario.schedules[0].model_copy(update={"requests": 2})],
            }
        )
        result = await run_scenario(scenario.model_copy(update={"http": "httpx"}))
    (cal,) = result.calibrations
    assert cal.method == "none" and cal.note is not None and "words" in cal.note
    assert any("cannot count prompt tokens" in n for n in result.metadata.notes)
    assert result.prompt_tokens[0].method == "words" and result.summary.completed == 2
    assert ("POST", "/tokenize") in server.requests  # it did look for a way to count


# -- the context sweep -------------------------------------------------------------------------


async def test_context_sweep_climbs_to_the_context_and_reports_ttft_by_length() -> None:
    # Prefill takes time per prompt token, so TTFT must grow with the prompt length.
    timing = TimingModel(ttft_base_s=0.001, ttft_per_prompt_token_s=10e-6, itl_s=0.0005)
    with FakeEngine(kind="openai", models=(MODEL,), timing=timing) as eng:
        scenario = _scenario(
            eng.url,
            "openai",
            workloads=[{"prompt_tokens": 16, "max_tokens": 4}],
            schedules=[{"kind": "context", "points": 3, "start": 64, "requests": 3}],
        )
        result = await run_scenario(scenario)
    limit = 4096 - 4  # the fake's max_model_len, less the output
    tops = [p.prompt_tokens for p in result.phases]
    assert tops[0] == 64 and tops[-1] == limit - max(8, limit // 100) and len(tops) == 3
    assert [p.name for p in result.phases] == [f"ctx={n}" for n in tops]
    assert result.summary.failed == 0
    for phase in result.phases:
        counts = {r.input_tokens for r in result.requests if r.phase == phase.name}
        assert counts == {phase.prompt_tokens}
    ttft = [p.summary.ttft_ms.p50 for p in result.phases if p.summary.ttft_ms]
    assert len(ttft) == 3 and ttft[0] < ttft[1] < ttft[2]
    assert result.calibrations[0].context_tokens == 4096
    # The workload's own length again once the sweep is over: none of the sweep's lengths.
    assert all(p.within_tolerance == 1.0 for p in result.prompt_tokens)


# -- the CLI: flags and one-line failures -------------------------------------------------------


@pytest.fixture
def keyed() -> Iterator[FakeEngine]:
    with FakeEngine(kind="openai", models=(MODEL,), timing=_fast(), api_key="sk-right") as eng:
        yield eng


def test_cli_calibration_failure_is_one_line(
    keyed: FakeEngine, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Health probes off: the calibration's own call meets the 401 (probes would mark the
    # endpoint down first, and the call would wait for it to recover).
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        f'model = "{MODEL}"\n[pool]\nendpoints = [{{ url = "{keyed.url}", kind = "openai", '
        'api_key = "sk-wrong" }]\n[pool.health]\nenabled = false\n'
    )
    argv = ["--scenario", str(scenario), "--requests", "2", "--concurrency", "1"]
    argv += ["--quiet", "--no-samplers", "--out", str(tmp_path / "o")]
    assert main(argv) == 3
    out = capsys.readouterr()
    text = (out.out + out.err).strip()
    assert "credentials refused" in text and "Traceback" not in text
    assert len(text.splitlines()) == 1 and "sk-" not in text


def test_cli_context_sweep_without_room_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with FakeEngine(kind="openai", models=(MODEL,), timing=_fast()) as eng:
        argv = ["--endpoint", f"{eng.url},openai", "--model", MODEL, "--context-sweep", "3"]
        argv += ["--max-tokens", "5000", "--quiet", "--no-samplers", "--out", str(tmp_path)]
        assert main(argv) == 3
    text = capsys.readouterr().out.strip()
    assert "no room for a prompt" in text and len(text.splitlines()) == 1


def test_cli_rejects_contradictory_calibration_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--simulate", "--quiet", "--no-calibrate", "--recalibrate"]) == 2
    err = capsys.readouterr().err
    assert "choose one" in err and "Traceback" not in err


def test_cli_rejects_a_bad_context_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--simulate", "--quiet", "--context-sweep", "x"])
    assert caught.value.code == 2
    assert "POINTS or POINTS:MAX" in capsys.readouterr().err


def test_results_without_calibration_fields_still_load(tmp_path: Path) -> None:
    meta = RunMetadata(started_at="a", finished_at="b", wall_duration_s=1.0, monotonic_origin_ns=0)
    path = write_json(build_result(meta, [], {}, []), tmp_path / "r.json")
    data = json.loads(path.read_text())
    for key in ("calibrations", "prompt_tokens"):
        data.pop(key)
    path.write_text(json.dumps(data))
    loaded = load_result(path)
    assert loaded.calibrations == [] and loaded.prompt_tokens == []


# -- the real servers ---------------------------------------------------------------------------


def _real_scenario(url: str, **extra: Any) -> Any:
    data: dict[str, Any] = {
        "model": "tiny-llama",
        "pool": {"endpoints": [{"url": url, "kind": "openai"}]},
        "workloads": [
            {"name": "chat", "prompt_tokens": 128, "max_tokens": 4},
            {"name": "gen", "operation": "generate", "prompt_tokens": 128, "max_tokens": 4},
        ],
        "schedules": [{"kind": "concurrency", "levels": [2], "requests": 8}],
        "warmup": {"requests": 0},
        "samplers": {"enabled": False},
    }
    return validate_scenario(data | extra)


def _assert_on_target(result: BenchResult, method: str) -> None:
    assert result.summary.failed == 0 and result.requests
    for r in result.requests:  # the server's own usage.prompt_tokens
        assert r.input_tokens is not None
        assert abs(r.input_tokens - 128) <= TOLERANCE * 128, (r.workload, r.input_tokens)
    for p in result.prompt_tokens:
        assert p.within_tolerance == 1.0 and p.method == method, p
    for c in result.calibrations:
        assert c.check_predicted == c.check_counted, c


def _facts(server: str, result: BenchResult) -> None:
    for c in result.calibrations:
        report_line(
            f"calibration {server} {c.operation}: {c.method}, {c.requests} requests, "
            f"{c.seconds:.2f} s, {c.tokens_per_word} tokens/word, shortest prompt "
            f"{c.shortest_prompt}, context {c.context_tokens}"
        )
    for p in result.prompt_tokens:
        report_line(
            f"prompt tokens {server} {p.workload} ({p.method}): asked {p.target}, server "
            f"counted {p.server_min}-{p.server_max} over {p.requests} requests"
        )


async def test_prompt_tokens_128_on_the_real_llama_server(llama_server: Any) -> None:
    result = await run_scenario(_real_scenario(llama_server.url, calibrate="refresh"))
    _assert_on_target(result, "tokenize:llama.cpp")
    # The tiny byte-fallback vocabulary: words are several tokens, so words != tokens.
    assert all((c.tokens_per_word or 0) > 2 for c in result.calibrations)
    _facts("llama.cpp", result)


async def test_calibration_carries_the_endpoints_key(llama_server_keyed: Any) -> None:
    async with httpx.AsyncClient(base_url=llama_server_keyed.url) as http:
        bare = await http.post("/tokenize", json={"content": "the"})
    assert bare.status_code == 401  # /tokenize wants the key: the calibration must send it
    endpoint = {"url": llama_server_keyed.url, "kind": "openai", "api_key": LLAMA_API_KEY}
    pool = PoolConfig.model_validate({"endpoints": [endpoint]})
    out = await calibrate_run(pool, [Workload(prompt_tokens=64)], "tiny-llama", mode="refresh")
    (record,) = out.records
    assert record.method == "tokenize:llama.cpp" and record.note is None
    assert record.check_predicted == record.check_counted
    assert record.context_source == "/props n_ctx"  # /props, with the key too


async def test_context_sweep_on_the_real_llama_server(llama_server: Any) -> None:
    scenario = _real_scenario(
        llama_server.url,
        workloads=[{"prompt_tokens": 64, "max_tokens": 4}],
        schedules=[{"kind": "context", "points": 3, "start": 64, "requests": 2}],
    )
    result = await run_scenario(scenario)
    n_ctx = result.calibrations[0].context_tokens
    assert n_ctx is not None and result.calibrations[0].context_source == "/props n_ctx"
    lengths = [p.prompt_tokens for p in result.phases]
    assert lengths[0] == 64 and lengths[-1] == (n_ctx - 4) - max(8, (n_ctx - 4) // 100)
    assert result.summary.failed == 0
    for phase in result.phases:
        counts = {r.input_tokens for r in result.requests if r.phase == phase.name}
        assert counts == {phase.prompt_tokens}, phase.name
        ttft = phase.summary.ttft_ms
        report_line(f"context sweep llama.cpp {phase.name}: TTFT p50 {ttft and ttft.p50} ms")


def test_prompt_tokens_128_on_the_real_vllm(vllm_server: Any, tmp_path: Path) -> None:
    # The flag itself, as a user types it (the chat workload).
    argv = ["--endpoint", f"{vllm_server.url},openai", "--model", "tiny-llama"]
    argv += ["--prompt-tokens", "128", "--max-tokens", "4", "--concurrency", "2"]
    argv += ["--requests", "8", "--warmup", "0", "--no-samplers", "--no-html", "--quiet"]
    assert main([*argv, "--recalibrate", "--out", str(tmp_path / "a")]) == 0
    result = load_result(tmp_path / "a" / "result.json")
    _assert_on_target(result, "tokenize:vllm")
    _facts("vLLM", result)
    # Both operations; the chat calibration now comes from the disk cache (one check each).
    both = asyncio.run(run_scenario(_real_scenario(vllm_server.url)))
    _assert_on_target(both, "tokenize:vllm")
    assert [c.cached for c in both.calibrations] == [True, False]
    _facts("vLLM", both)
    # The same run in words, as before: the tiny tokenizer's words are several tokens each.
    words = asyncio.run(run_scenario(_real_scenario(vllm_server.url, calibrate="off")))
    for p in words.prompt_tokens:
        assert p.max_abs_error_pct is not None and p.max_abs_error_pct > 100 * TOLERANCE
        report_line(
            f"prompt tokens vLLM {p.workload} uncalibrated: asked {p.target} words, server "
            f"counted {p.server_min}-{p.server_max}"
        )
