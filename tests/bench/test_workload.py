"""Workloads: length distributions, synthetic prompts, prompt files, mixes, determinism."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from shared_ollama.bench.workload import (
    WORDS,
    LengthDist,
    PromptSizer,
    Workload,
    WorkloadMix,
    load_prompts,
    parse_length,
    request_spec,
    synthetic_prompt,
)


def test_parse_length_forms() -> None:
    assert parse_length("128") == LengthDist(mean=128)
    assert parse_length(64) == LengthDist(mean=64)
    u = parse_length("uniform:64:256")
    assert (u.dist, u.min, u.max) == ("uniform", 64, 256)
    n = parse_length("normal:128:32:16:512")
    assert (n.dist, n.mean, n.stdev, n.min, n.max) == ("normal", 128, 32, 16, 512)
    assert parse_length({"dist": "normal", "mean": 10, "stdev": 2}).stdev == 2
    for text in ("uniform:64:256", "normal:128:32:16:512", "normal:50:5", "7"):
        assert parse_length(text).describe() == text


@pytest.mark.parametrize("bad", ["uniform:5", "normal:1", "poisson:3", "abc", "uniform:9:3", "0"])
def test_parse_length_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_length(bad)


def test_samples_stay_in_bounds() -> None:
    rng = random.Random(1)
    u = parse_length("uniform:3:5")
    assert {u.sample(rng) for _ in range(500)} == {3, 4, 5}
    n = parse_length("normal:10:50:2:20")
    values = [n.sample(rng) for _ in range(2000)]
    assert min(values) == 2 and max(values) == 20  # clipped
    assert parse_length("normal:100:10").sample(rng) >= 1


def test_synthetic_prompt_has_the_target_word_count() -> None:
    rng = random.Random(0)
    for n in (1, 7, 300):
        assert len(synthetic_prompt(n, rng).split()) == n
    assert synthetic_prompt(50, random.Random(1)) != synthetic_prompt(50, random.Random(2))


def test_mix_is_deterministic_and_weighted() -> None:
    workloads = [
        Workload(name="a", weight=3, prompt_tokens="uniform:5:9", max_tokens=16),
        Workload(name="b", weight=1, operation="generate", stream=False, system="be brief"),
    ]
    first = [WorkloadMix(workloads, "m", seed=7).next() for _ in range(1)]
    again = [WorkloadMix(workloads, "m", seed=7).next() for _ in range(1)]
    assert first == again
    mix = WorkloadMix(workloads, "m", seed=3)
    specs = [mix.next() for _ in range(4000)]
    share = Counter(s.workload for s in specs)["a"] / len(specs)
    assert 0.72 < share < 0.78  # 3:1, binomial sd ~0.007
    chat = next(s for s in specs if s.workload == "a")
    assert chat.operation == "chat" and chat.stream and chat.messages is not None
    assert 5 <= len(chat.messages[0]["content"].split()) <= 9
    assert chat.call_options() == {"num_predict": 16}
    gen = next(s for s in specs if s.workload == "b")
    assert gen.prompt is not None and gen.messages is None and gen.system == "be brief"


def test_chat_system_message() -> None:
    spec = WorkloadMix([Workload(system="sys")], "m", 0).next()
    assert spec.messages is not None and spec.messages[0] == {"role": "system", "content": "sys"}


def test_prompt_file(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    lines = [
        {"prompt": "hello there", "max_tokens": 5},
        {"messages": [{"role": "user", "content": "hi"}]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    items = load_prompts(path)
    assert [i.max_tokens for i in items] == [5, None]
    mix = WorkloadMix([Workload(prompts_file=str(path), max_tokens=9)], "m", 0)
    specs = [mix.next() for _ in range(50)]
    assert {s.max_tokens for s in specs} == {5, 9}
    assert all(s.messages for s in specs)  # chat: a prompt line becomes a user message
    gen = WorkloadMix([Workload(operation="generate", prompts_file=str(path))], "m", 0)
    assert all(s.prompt in ("hello there", "hi") for s in (gen.next() for _ in range(20)))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ("[1]", "expected an object"),
        ('{"prompt": "a", "messages": []}', "exactly one"),
        ('{"prompt": 3}', "must be a string"),
        ('{"messages": "x"}', "non-empty list"),
        ('{"prompt": "a", "max_tokens": 0}', "positive integer"),
    ],
)
def test_prompt_file_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        load_prompts(path)
    assert "bad.jsonl:2" in str(info.value)


def test_mix_needs_a_model() -> None:
    with pytest.raises(ValueError, match="no model"):
        WorkloadMix([Workload()], None, 0)


def test_sized_mix_draws_token_targets_and_logs_each_draw(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "from a file"}\n', encoding="utf-8")
    workloads = [
        Workload(name="a", prompt_tokens="uniform:20:40", system="sys"),
        Workload(name="f", prompts_file=str(path)),
    ]
    costs = {w: 1 + i % 3 for i, w in enumerate(WORDS)}
    sizer = PromptSizer({"the": 6, "of": 6}, costs)
    mix = WorkloadMix(workloads, "m", 0)
    mix.use_sizers({"a": sizer})
    specs = [mix.next() for _ in range(200)]
    assert [(d.workload, d.prompt_tokens) for d in mix.drawn] == [
        (s.workload, s.prompt_tokens) for s in specs
    ]
    for s in specs:
        if s.workload == "f":  # a prompt file: no target, nothing predicted
            assert s.prompt_tokens is None and s.expected_prompt_tokens is None
            continue
        assert s.messages is not None and s.messages[0]["role"] == "system"
        words = s.messages[1]["content"].split()
        predicted = sizer.heads[words[0]] + sum(costs[w] for w in words[1:])
        assert s.prompt_tokens is not None and 20 <= s.prompt_tokens <= 40
        assert s.expected_prompt_tokens == predicted == s.prompt_tokens


def test_forced_prompt_length_and_options_then_back() -> None:
    mix = WorkloadMix([Workload(prompt_tokens=16, options={"temperature": 0})], "m", 0)
    mix.force_prompt_tokens(300, {"num_ctx": 400})
    spec = mix.next()
    assert spec.prompt_tokens == 300 and spec.expected_prompt_tokens is None  # no sizer: words
    assert spec.messages is not None and len(spec.messages[0]["content"].split()) == 300
    assert spec.call_options() == {"temperature": 0, "num_ctx": 400, "num_predict": 128}
    mix.force_prompt_tokens(None)
    spec = mix.next()
    assert spec.prompt_tokens == 16 and spec.options == {"temperature": 0}


def test_request_spec_is_what_the_mix_sends() -> None:
    w = Workload(operation="generate", system="sys", options={"seed": 1})
    spec = request_spec(w, "m", prompt="a b c", max_tokens=1)
    assert (spec.prompt, spec.system, spec.messages, spec.model) == ("a b c", "sys", None, "m")
    assert spec.call_options() == {"seed": 1, "num_predict": 1}
    chat = request_spec(Workload(system="sys"), "m", prompt="x", max_tokens=1)
    assert chat.messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "x"},
    ]


def test_prompt_sizer_refuses_empty_or_free_words() -> None:
    with pytest.raises(ValueError):
        PromptSizer({}, {"the": 1})
    with pytest.raises(ValueError):
        PromptSizer({"the": 1}, {"the": 0})
